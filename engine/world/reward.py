"""The world's learned reward (HPSv2.1's role): a small differentiable prompt-image scorer.

Trained by ``scripts/train_world_reward.py`` on renders of the world's TRAINING prompts only:
preference pairs (a true render above renders of one-edit near misses, engine/world/pairs.py, and
above the world model's own samples and fine-tuning exploits), plus dense supervision the renderer
gives for free (where each object's centre is, its colour and its shape). It never sees the
judge's verdicts: the judge (``engine.world.judge``) stays a held-out evaluator.

Architecture (about 0.1 M parameters):
  perception  an anti-aliased conv net: the image is low-passed before anything else and blurred
              before every downsampling (64 -> 32 -> 16), so a high-frequency texture has nothing
              to alias into. Where the objects are and their shapes are read from a colour-blind
              view (the brightest channel), colours from a per-pixel branch; on the 16x16 grid
              (with coordinate channels) 1x1 heads give an object-centre density D(p) >= 0 (each
              object integrates to ~1), shape probabilities P(shape | p) and colour
              probabilities P(colour | p). Colour and shape are factorised, and the shape cannot
              depend on the colour, so a colour-shape pair never seen in training is read from
              its parts.
  prompt      the prompt is read through the world's grammar (``engine.world.scene.parse``) into
              slots: per named group (colour, shape, count), and the relation.
  score       per group g, N_g = sum_p D(p) P(c_g|p) P(s_g|p) (a soft count of matching objects)
              and its centre of mass; the score is a sum of learned-weight penalties, all <= 0:
                count    |log((N_g + e) / (n_g + e))| (Huber) per group: a missing, wrongly
                         coloured or shaped or miscounted object; in log space so that the
                         gradient does not vanish when an object is clearly wrong
                extra    the same for the total density sum_p D(p) against sum_g n_g: objects the
                         prompt does not name
                relation soft hinges on the offset of the two centres along the relation's axis
                         (>= a margin, and larger than the offset across it)
              so a true render scores near the maximum 0 and no image can score above it: there is
              no direction in which "more" keeps paying, which is what fine-tuning exploits.
The score is differentiable w.r.t. the pixels. ``engine.rewards.world.WorldReward`` wraps it as a
frozen reward.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .scene import COLOURS, RELATIONS, SHAPES, parse

__all__ = ["RewardNetConfig", "WorldRewardNet", "REWARD_DIR", "load_reward_net", "save_reward_net",
           "encode_prompts", "REL_AXES"]

REWARD_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "reward")
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_COLOUR_INDEX = {c: i for i, c in enumerate(COLOURS)}
_SHAPE_INDEX = {s: i for i, s in enumerate(SHAPES)}
# (axis, sign): the second object's offset from the first along ``axis`` times ``sign`` must be
# large and positive ("a left of b": b is to the right; y grows downwards)
REL_AXES = {"left of": (0, 1.0), "right of": (0, -1.0), "above": (1, 1.0), "below": (1, -1.0)}


def encode_prompts(prompts: list[str]) -> Tensor:
    """(B, 7) long codes of grammar prompts: colour, shape, count of group 1, the same of group 2
    (count 0: no second group), relation (0: none, 1 + index in RELATIONS)."""
    rows = []
    for p in prompts:
        spec = parse(p)
        g = spec.groups
        row = [_COLOUR_INDEX[g[0].colour], _SHAPE_INDEX[g[0].shape], g[0].count]
        if len(g) == 2:
            row += [_COLOUR_INDEX[g[1].colour], _SHAPE_INDEX[g[1].shape], g[1].count]
        else:
            row += [0, 0, 0]
        row.append(0 if spec.relation is None else 1 + RELATIONS.index(spec.relation))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long).view(len(rows), 7)


@dataclass
class RewardNetConfig:
    width: int = 32           # channels at 32x32; 2x that at 16x16
    image_size: int = 64
    margin: float = 0.25      # minimum centre offset along a relation's axis, in [-1, 1] units
    count_eps: float = 1e-3   # soft counts are compared as log((N + eps) / (n + eps))
    total_eps: float = 0.1
    blur_taps: int = 3


def _blur_kernel(taps: int) -> Tensor:
    k = {3: [1.0, 2.0, 1.0], 5: [1.0, 4.0, 6.0, 4.0, 1.0]}[taps]
    k = torch.tensor(k)
    k2 = k[:, None] * k[None, :]
    return k2 / k2.sum()


class Blur(nn.Module):
    """Depthwise binomial low-pass (zero response at the Nyquist frequency), optional stride-2
    subsampling after it: the anti-aliased downsampling of Zhang (2019)."""

    def __init__(self, channels: int, taps: int = 3, stride: int = 1):
        super().__init__()
        self.register_buffer("kernel", _blur_kernel(taps).expand(channels, 1, taps, taps).clone(), persistent=False)
        self.stride, self.pad, self.channels = stride, taps // 2, channels

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x, (self.pad,) * 4, mode="replicate")
        return F.conv2d(x, self.kernel.to(x.dtype), stride=self.stride, groups=self.channels)


def _huber(x: Tensor, d: float = 0.25) -> Tensor:
    a = x.abs()
    return torch.where(a < d, 0.5 * a * a / d, a - 0.5 * d)


class WorldRewardNet(nn.Module):
    def __init__(self, cfg: RewardNetConfig = RewardNetConfig()):
        super().__init__()
        self.cfg = cfg
        w, t = cfg.width, cfg.blur_taps
        # where objects are and what shape they are: read from a colour-blind view of the image
        # (the brightest channel; every palette colour is ~1 there, the background 0), so a
        # shape is the same shape in any colour, e.g. in a colour-shape pair never trained on
        self.lowpass = Blur(3, t)                         # the input itself, before anything else
        self.features = nn.Sequential(
            nn.Conv2d(1, w // 2, 3, padding=1), nn.GELU(),
            Blur(w // 2, t, stride=2),                    # 64 -> 32
            nn.Conv2d(w // 2, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, w, 3, padding=1), nn.GELU(),
            Blur(w, t, stride=2),                         # 32 -> 16
        )
        self.mid = nn.Sequential(
            nn.Conv2d(w + 2, 2 * w, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=2, dilation=2), nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU(),
        )
        self.density = nn.Conv2d(2 * w, 1, 1)
        self.shape = nn.Conv2d(2 * w, len(SHAPES), 1)
        nn.init.constant_(self.density.bias, -3.0)    # start from an almost empty density map
        # colour: per pixel (1x1 convs on the low-passed image), then pooled to the 16x16 grid
        self.colour_net = nn.Sequential(
            nn.Conv2d(3, w // 2, 1), nn.GELU(),
            nn.Conv2d(w // 2, w // 2, 1), nn.GELU(),
            Blur(w // 2, t, stride=2), Blur(w // 2, t, stride=2),
        )
        # the palette's colours and one more: "none of them" (mixed, striped, off-palette pixels),
        # so that an object painted in several colours counts for none of them
        self.colour = nn.Conv2d(w // 2, len(COLOURS) + 1, 1)
        # learned weights of the penalties (softplus keeps them positive) and relation sharpness
        self.log_w = nn.Parameter(torch.tensor([1.0, 1.0, 1.0]))   # count, extra, relation
        self.log_temp = nn.Parameter(torch.tensor(-3.0))

    # ------------------------------------------------------------------ perception
    def maps(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """images (B, 3, H, W) in [0, 1] -> density (B, G, G) >= 0, log P(colour) (B, 8, G, G; the
        last: none of the palette's),
        log P(shape) (B, 3, G, G) on the G = image_size / 4 grid."""
        s = self.cfg.image_size
        if images.shape[-2:] != (s, s):
            images = F.interpolate(images, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        x = self.lowpass(images * 2 - 1)
        f = self.features(x.amax(1, keepdim=True))
        b, _, g, _ = f.shape
        coords = self.grid(g, f.device, f.dtype)
        f = self.mid(torch.cat([f, coords.permute(2, 0, 1).expand(b, 2, g, g)], 1))
        dens = F.softplus(self.density(f)[:, 0] - 2.0)
        col = self.colour(self.colour_net(x))
        return dens, F.log_softmax(col, 1), F.log_softmax(self.shape(f), 1)

    @staticmethod
    def grid(g: int, device=None, dtype=None) -> Tensor:
        """(G, G, 2) cell centres as (x, y) in [-1, 1] (x to the right, y downwards)."""
        c = (torch.arange(g, device=device, dtype=dtype) + 0.5) / g * 2 - 1
        ys, xs = torch.meshgrid(c, c, indexing="ij")
        return torch.stack([xs, ys], -1)

    # ------------------------------------------------------------------ scoring
    def terms(self, images: Tensor, codes: Tensor) -> dict[str, Tensor]:
        """The score's parts, each (B,) and >= 0 (penalties), plus the soft counts."""
        dens, lc, ls = self.maps(images)
        b, g, _ = dens.shape
        codes = codes.to(dens.device)
        grid = self.grid(g, dens.device, dens.dtype).view(1, g * g, 2)
        d = dens.flatten(1)                                            # (B, P)
        lc, ls = lc.flatten(2), ls.flatten(2)                          # (B, 7, P), (B, 3, P)
        ar = torch.arange(b, device=dens.device)
        counts, centres, want = [], [], []
        for gi in range(2):
            c, s, n = codes[:, 3 * gi], codes[:, 3 * gi + 1], codes[:, 3 * gi + 2]
            w = d * torch.exp(lc[ar, c] + ls[ar, s])                    # (B, P)
            N = w.sum(1)
            counts.append(N)
            centres.append((w[..., None] * grid).sum(1) / (N[:, None] + 1e-3))
            want.append(n.to(d.dtype))
        # in log space: a missing object (N ~ 0) still has a gradient (d log N = dN / N), where
        # a squared error on N would vanish with the product of saturated probabilities
        d1, d2 = self.cfg.count_eps, self.cfg.total_eps
        count_pen = _huber(torch.log((counts[0] + d1) / (want[0] + d1))) + torch.where(
            want[1] > 0, _huber(torch.log((counts[1] + d1) / (want[1] + d1))), torch.zeros_like(want[1]))
        extra_pen = _huber(torch.log((d.sum(1) + d2) / (want[0] + want[1] + d2)))
        rel = codes[:, 6]
        off = centres[1] - centres[0]                                   # (B, 2): b relative to a
        axis = torch.where((rel == 3) | (rel == 4), 1, 0)               # above / below: the y axis
        sign = torch.where((rel == 2) | (rel == 4), -1.0, 1.0).to(d.dtype)
        along = off[ar, axis] * sign
        across = off[ar, 1 - axis].abs()
        temp = torch.exp(self.log_temp)
        hinge = temp * (F.softplus((self.cfg.margin - along) / temp) + F.softplus((across - along) / temp))
        rel_pen = torch.where(rel > 0, hinge, torch.zeros_like(hinge))
        return {"count": count_pen, "extra": extra_pen, "relation": rel_pen,
                "n1": counts[0], "n2": counts[1], "total": d.sum(1)}

    def score_terms(self, t: dict[str, Tensor]) -> Tensor:
        w = F.softplus(self.log_w)
        return -(w[0] * t["count"] + w[1] * t["extra"] + w[2] * t["relation"])

    def forward(self, images: Tensor, codes: Tensor) -> Tensor:
        """images (B, 3, H, W) in [0, 1]; codes (B, 7) from ``encode_prompts`` -> (B,) scores <= 0."""
        return self.score_terms(self.terms(images, codes))


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
