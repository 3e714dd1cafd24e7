"""The small world's learned reward as an engine reward (``reward.name: world``); the net, its
training and its files are in engine/world/reward.py and scripts/train_world_reward.py."""
from __future__ import annotations

import torch
from torch import Tensor

from engine.rewards.base import ImageReward
from engine.world.reward import REWARD_DIR, load_reward_net


class WorldReward(ImageReward):
    """``reward(images, prompts)`` with the shipped (or a given) world reward net; the prompts'
    MiniLM tokens are computed once per prompt and kept."""

    def __init__(self, path: str = "", text_encoder=None):
        super().__init__()
        self.net = load_reward_net(path or REWARD_DIR)
        self._text = text_encoder
        self._tokens: dict[str, tuple[Tensor, Tensor]] = {}

    def _encoder(self):
        if self._text is None:
            from engine.world.text import MiniLMTextEncoder

            self._text = MiniLMTextEncoder(max_length=self.net.cfg.text_len, cache=False)
        return self._text

    def text(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        todo = list(dict.fromkeys(p for p in prompts if p not in self._tokens))
        if todo:
            tokens, _, mask = self._encoder().encode_with_mask(todo)
            for i, p in enumerate(todo):
                self._tokens[p] = (tokens[i].cpu(), mask[i].cpu())
        dev = self.net.img_pos.device
        return (torch.stack([self._tokens[p][0] for p in prompts]).to(dev),
                torch.stack([self._tokens[p][1] for p in prompts]).to(dev))

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        tokens, mask = self.text(prompts)
        dtype = self.net.img_pos.dtype
        return self.net(images.to(dtype), tokens.to(dtype), mask).float()
