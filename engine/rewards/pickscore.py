"""PickScore v1 (Kirstain et al. 2023) as a differentiable reward.

PickScore_v1 is a transformers ``CLIPModel`` (a fine-tuned CLIP-ViT-H-14); its official scoring
takes the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` and returns
``logit_scale.exp() * cosine(image, text)`` (about 18-24 for typical images). Both come from local
folders: ``path`` (the PickScore_v1 folder) and ``processor_path`` (the CLIP-ViT-H-14 folder;
defaults to ``path`` when that folder holds the processor files too).

``scale`` multiplies the score: 1.0 (default) is PickScore as published; FlowBP's evaluation
reports ``score / 26`` (``scale=1/26``).
"""
from __future__ import annotations

import torch

from engine.rewards.clip import HFCLIPReward


class PickScoreReward(HFCLIPReward):
    def __init__(self, path, processor_path=None, scale: float = 1.0):
        super().__init__(path, processor_path, what="PickScore model")
        self.scale = float(scale)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        logit_scale = self.model.logit_scale.exp().float()
        return self.scale * logit_scale * self.cosine(images, prompts)
