"""A weighted sum of rewards:

    build_reward("mix", rewards={"hpsv21": {"path": ".../HPS_v2.1_compressed.pt", "weight": 1.0},
                                 "clip": {"path": ".../clip-vit-large-patch14", "weight": 0.5}})

Each entry's key is the reward's name in ``REWARDS`` and its value that reward's parameters plus
an optional ``weight`` (default 1.0). To use one reward twice, give the entries any keys and the
reward's name as ``"name"``: ``{"clip_a": {"name": "clip", ...}, "clip_b": {"name": "clip", ...}}``.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.rewards.base import ImageReward


class MixReward(ImageReward):
    def __init__(self, rewards: dict):
        super().__init__()
        from engine.rewards import build_reward  # late: the registry imports this module

        if not isinstance(rewards, dict) or not rewards:
            raise ValueError("mix needs rewards={name: {params..., 'weight': w}, ...} with at least one entry")
        self.rewards = nn.ModuleDict()
        self.weights: dict[str, float] = {}
        self.names: dict[str, str] = {}
        for key, params in rewards.items():
            params = dict(params or {})
            weight = float(params.pop("weight", 1.0))
            name = params.pop("name", key)
            if name == "mix":
                raise ValueError("a mix cannot contain another mix")
            slot = str(key).replace(".", "_")
            if slot in self.rewards:
                raise ValueError(f"duplicate mix entry {key!r}")
            self.rewards[slot] = build_reward(name, **params)
            self.weights[slot], self.names[slot] = weight, str(key)

    def components(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Each reward's (unweighted) scores, by entry key."""
        return {self.names[slot]: r(images, prompts) for slot, r in self.rewards.items()}

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        total = None
        for slot, reward in self.rewards.items():
            s = self.weights[slot] * reward(images, prompts).float()
            total = s if total is None else total + s
        return total
