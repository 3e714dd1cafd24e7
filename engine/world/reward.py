"""The world's learned reward (HPSv2.1's role): a small differentiable prompt-image scorer.

Trained by ``scripts/train_world_reward.py`` on renders of the world's training prompts, with
preference pairs whose losing image is a render of a minimally changed prompt (another colour,
shape, count or relation, an object missing or added), so the score has to read the attributes
and their binding; part of the images pass through the world VAE first, so that its score holds on
decoded images and not only on crisp renders. It never sees the judge's verdicts: the judge
(``engine.world.judge``) stays a held-out evaluator.

Architecture: a coordinate-conv stem turns the 64x64 image into 8x8 = 64 patch tokens (the
coordinates let it read positions for "left of" / "above"); the prompt's MiniLM token embeddings
are projected to the same width; a small pre-norm transformer reads [score token, text, image]
and a linear head on the score token gives an unbounded scalar (higher is better, like HPS's
logit). About 0.6 M parameters; ``engine.rewards.world.WorldReward`` wraps it as a frozen reward.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RewardNetConfig", "WorldRewardNet", "REWARD_DIR", "load_reward_net", "save_reward_net"]

REWARD_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "reward")
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclass
class RewardNetConfig:
    dim: int = 96
    depth: int = 2
    heads: int = 4
    text_dim: int = 384       # MiniLM-L6's width
    text_len: int = 16        # the world text encoder's max_length
    image_size: int = 64


class WorldRewardNet(nn.Module):
    def __init__(self, cfg: RewardNetConfig = RewardNetConfig()):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.stem = nn.Sequential(
            nn.Conv2d(5, 48, 4, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(48, 96, 4, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(96, d, 4, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(d, d, 3, padding=1),
        )
        n_img = (cfg.image_size // 8) ** 2
        self.img_pos = nn.Parameter(torch.randn(1, n_img, d) * 0.02)
        self.txt_proj = nn.Linear(cfg.text_dim, d)
        self.txt_pos = nn.Parameter(torch.randn(1, cfg.text_len, d) * 0.02)
        self.score_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, cfg.heads, 4 * d, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 1))

    def image_tokens(self, images: Tensor) -> Tensor:
        s = self.cfg.image_size
        if images.shape[-2:] != (s, s):
            images = F.interpolate(images, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        b = images.shape[0]
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, s, device=images.device, dtype=images.dtype),
                                torch.linspace(-1, 1, s, device=images.device, dtype=images.dtype), indexing="ij")
        coords = torch.stack([xs, ys]).expand(b, 2, s, s)
        x = self.stem(torch.cat([images * 2 - 1, coords], 1))
        return x.flatten(2).transpose(1, 2) + self.img_pos

    def score_tokens(self, img: Tensor, text_tokens: Tensor, text_mask: Tensor) -> Tensor:
        """Scores from image tokens already computed (training pairs one image with many prompts
        and runs its conv stem once)."""
        txt = self.txt_proj(text_tokens.to(img.dtype)) + self.txt_pos[:, : text_tokens.shape[1]]
        b = img.shape[0]
        x = torch.cat([self.score_token.expand(b, -1, -1), txt, img], 1)
        keep = torch.ones(b, x.shape[1], dtype=torch.bool, device=x.device)
        keep[:, 1: 1 + txt.shape[1]] = text_mask
        x = self.encoder(x, src_key_padding_mask=~keep)
        return self.head(x[:, 0]).squeeze(-1)

    def forward(self, images: Tensor, text_tokens: Tensor, text_mask: Tensor) -> Tensor:
        """images (B, 3, H, W) in [0, 1]; text_tokens (B, L, text_dim); text_mask (B, L) bool, True
        on real tokens -> (B,) scores."""
        return self.score_tokens(self.image_tokens(images), text_tokens, text_mask)


def save_reward_net(net: WorldRewardNet, folder: str | os.PathLike) -> None:
    from engine.checkpoint import save_atomic

    os.makedirs(folder, exist_ok=True)
    save_atomic(os.path.join(folder, WEIGHTS_NAME), net.state_dict(), {})
    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        json.dump(asdict(net.cfg), f, indent=2)


def load_reward_net(folder: str | os.PathLike = REWARD_DIR) -> WorldRewardNet:
    from safetensors.torch import load_file

    folder = os.fspath(folder)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(folder, name)):
            raise FileNotFoundError(f"missing world reward file: {os.path.join(folder, name)}")
    with open(os.path.join(folder, CONFIG_NAME)) as f:
        cfg = RewardNetConfig(**json.load(f))
    net = WorldRewardNet(cfg)
    file = os.path.join(folder, WEIGHTS_NAME)
    state = load_file(file)
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: {list(state[k].shape)} vs {list(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{file} does not fit the world reward net of {os.path.join(folder, CONFIG_NAME)}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}, shapes (file vs net) {wrong[:5]}")
    net.load_state_dict(state)
    return net
