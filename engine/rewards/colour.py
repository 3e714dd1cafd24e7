"""A small but real differentiable reward: how close an image's pixels are to the colour its
prompt names. It is the embedded default until the learned reward of the small-world study
replaces it; it needs no weights, so the default job runs with no downloads."""
from __future__ import annotations

import re

import torch

from engine.rewards.base import ImageReward

COLOURS = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0), "cyan": (0.0, 1.0, 1.0), "magenta": (1.0, 0.0, 1.0),
    "orange": (1.0, 0.5, 0.0), "purple": (0.5, 0.0, 0.5), "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0), "gray": (0.5, 0.5, 0.5), "grey": (0.5, 0.5, 0.5),
}


def prompt_colour(prompt: str) -> tuple[float, float, float]:
    """The RGB target of the first colour word in ``prompt``."""
    for word in re.findall(r"[a-z]+", prompt.lower()):
        if word in COLOURS:
            return COLOURS[word]
    raise ValueError(f"prompt {prompt!r} names no colour the colour reward knows ({sorted(COLOURS)})")


class ColourReward(ImageReward):
    """r = 1 - mean over pixels of ||pixel - target||_2 / sqrt(3), in [0, 1].

    A per-pixel distance (not only the image mean) so that the reward asks for the whole
    image to take the colour; ``eps`` keeps the gradient finite where a pixel hits the target.
    """

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def check_prompts(self, prompts: list[str]) -> None:
        """Every prompt must name a colour (checked before training, not at the first evaluation)."""
        for p in prompts:
            prompt_colour(p)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        target = torch.tensor([prompt_colour(p) for p in prompts], dtype=torch.float32, device=images.device)
        diff = images.float() - target[:, :, None, None]
        dist = (diff.square().sum(1) + self.eps).sqrt()
        return 1.0 - dist.flatten(1).mean(1) / 3 ** 0.5
