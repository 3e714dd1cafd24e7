"""Differentiable rewards behind one interface: ``reward(images, prompts) -> (B,) scores``.

``images`` are (B, 3, H, W) in [0, 1] and carry the graph back to the latents; a reward model's
own parameters are frozen. ``build_reward(name, **params)`` makes one from a config.
"""
from __future__ import annotations

from engine.rewards.base import ImageReward
from engine.rewards.colour import ColourReward

REWARDS = {"colour": ColourReward}


def build_reward(name: str, **params) -> ImageReward:
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; choose one of {sorted(REWARDS)}")
    return REWARDS[name](**params).requires_grad_(False).eval()


__all__ = ["ImageReward", "ColourReward", "REWARDS", "build_reward"]
