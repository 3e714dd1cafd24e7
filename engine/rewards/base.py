from __future__ import annotations

import torch
from torch import nn


class ImageReward(nn.Module):
    """Base class: subclasses implement ``score(images, prompts)``; inputs are checked here."""

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError  # abstract: every concrete reward overrides it

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {len(prompts)} prompts for {images.shape[0]} images")
        return self.score(images, prompts)
