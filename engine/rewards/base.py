from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def resolve_weight_file(path, names, what: str = "checkpoint") -> Path:
    """``path`` itself if it is a file, else the first of ``names`` inside the folder ``path``;
    a clear FileNotFoundError naming the path otherwise (reward weights are only ever local)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p}")
    if p.is_dir():
        found = [p / n for n in names if (p / n).is_file()]
        if not found:
            raise FileNotFoundError(f"{what} not found: {p} holds none of {list(names)}")
        p = found[0]
    return p


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
