"""Differentiable rewards behind one interface: ``reward(images, prompts) -> (B,) scores``.

``images`` are (B, 3, H, W) in [0, 1] and carry the graph back to the latents; a reward model's
own parameters are frozen. ``build_reward(name, **params)`` makes one from a config.
"""
from __future__ import annotations

from engine.rewards.base import ImageReward
from engine.rewards.clip import CLIPScoreReward
from engine.rewards.colour import ColourReward
from engine.rewards.hps import HPSv21Reward
from engine.rewards.hpsv3 import HPSv3Reward
from engine.rewards.mix import MixReward
from engine.rewards.pickscore import PickScoreReward
from engine.rewards.world import WorldReward

REWARDS = {
    "colour": ColourReward,
    "hpsv21": HPSv21Reward,
    "hpsv3": HPSv3Reward,
    "pickscore": PickScoreReward,
    "clip": CLIPScoreReward,
    "mix": MixReward,
    "world": WorldReward,   # the small world's learned reward (engine/world/reward.py)
}


def build_reward(name: str, **params) -> ImageReward:
    """A frozen reward by name; its parameters typed and checked (``engine.params``) first."""
    import dataclasses

    from engine.params import reward_params

    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; choose one of {sorted(REWARDS)}")
    typed = reward_params(name, params, f"reward {name!r} parameter ")
    given = {f.name: getattr(typed, f.name) for f in dataclasses.fields(typed) if f.name in params}
    return REWARDS[name](**given).requires_grad_(False).eval()


__all__ = ["ImageReward", "ColourReward", "HPSv21Reward", "HPSv3Reward", "PickScoreReward", "CLIPScoreReward",
           "MixReward", "WorldReward", "REWARDS", "build_reward"]
