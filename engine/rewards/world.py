"""The small world's learned reward as an engine reward (``reward.name: world``); the net, its
training and its files are in engine/world/reward.py and scripts/train_world_reward.py."""
from __future__ import annotations

from torch import Tensor

from engine.rewards.base import ImageReward
from engine.world.reward import REWARD_DIR, encode_prompts, load_reward_net


class WorldReward(ImageReward):
    """``reward(images, prompts)`` with the shipped (or a given) world reward net. Prompts must be
    of the world's grammar (the net reads them as slots: colours, shapes, counts, relation); their
    codes are computed once per prompt and kept. Scores are <= 0, a true render scoring near 0."""

    def __init__(self, path: str = ""):
        super().__init__()
        self.net = load_reward_net(path or REWARD_DIR)
        self._codes: dict[str, Tensor] = {}

    def codes(self, prompts: list[str]) -> Tensor:
        todo = list(dict.fromkeys(p for p in prompts if p not in self._codes))
        if todo:
            for p, c in zip(todo, encode_prompts(todo)):
                self._codes[p] = c
        import torch

        return torch.stack([self._codes[p] for p in prompts])

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        dtype = self.net.density.weight.dtype
        return self.net(images.to(dtype), self.codes(prompts).to(images.device)).float()
