"""Differentiable image preprocessing for CLIP-family reward models.

The official pipelines (open_clip's ``preprocess_val``, HPSv2's ``ResizeMaxSize``, transformers'
``CLIPImageProcessor``) run on PIL images or detached tensors. Here the same steps run on a
(B, 3, H, W) float tensor in [0, 1] so that the reward's gradient reaches the decoded image:

- resize with ``F.interpolate(mode="bicubic", antialias=True)``: the same cubic kernel (a = -0.5)
  and the same support widening on downsampling as PIL's ``Image.resize(BICUBIC)`` and torchvision's
  tensor ``resize(antialias=True)``; an image already at the target size is left untouched (PIL
  and torchvision do the same);
- centre crop / pad to a square;
- normalise with the model's mean and std.

What cannot match exactly: the PIL path works on uint8 images, so its result is rounded to 1/255
and clamped to [0, 255] after resizing. ``clamp=True`` reproduces the clamp (the cubic kernel
overshoots at edges); the rounding (at most 0.5/255 in [0, 1] units) is the residual difference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

RESIZE_MODES = ("shortest_crop", "longest_pad", "stretch")


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def resize(images: torch.Tensor, size: tuple[int, int], interpolation: str = "bicubic",
           antialias: bool = True, clamp: bool = False) -> torch.Tensor:
    """Resize (B, C, H, W) to ``size`` = (h, w); identity when the size already matches."""
    h, w = size
    if tuple(images.shape[-2:]) == (h, w):
        return images
    if interpolation not in ("bicubic", "bilinear"):
        raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got {interpolation!r}")
    dtype = images.dtype
    out = F.interpolate(images.float(), size=(h, w), mode=interpolation, align_corners=False,
                        antialias=antialias)
    if clamp:
        out = out.clamp(0.0, 1.0)
    return out.to(dtype)


def shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """The (h, w) after resizing the shorter side to ``shortest_edge`` keeping the aspect ratio.

    The long side is truncated, ``int(s * long / short)``, as both torchvision's
    ``Resize(int)`` and transformers' ``get_resize_output_image_size`` do."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop(images: torch.Tensor, size: tuple[int, int], offset: str = "round") -> torch.Tensor:
    """Crop the centre (h, w). ``offset``: "round" is torchvision's ``int(round((H - h) / 2))``,
    "floor" is transformers' ``(H - h) // 2``; they differ only when H - h is odd. An image smaller
    than the crop is zero-padded first (as torchvision does)."""
    h, w = size
    H, W = images.shape[-2:]
    if H < h or W < w:
        ph, pw = max(h - H, 0), max(w - W, 0)
        images = F.pad(images, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        H, W = images.shape[-2:]
    if offset == "round":
        top, left = int(round((H - h) / 2.0)), int(round((W - w) / 2.0))
    elif offset == "floor":
        top, left = (H - h) // 2, (W - w) // 2
    else:
        raise ValueError(f"offset must be 'round' or 'floor', got {offset!r}")
    return images[..., top:top + h, left:left + w]


def resize_longest_pad(images: torch.Tensor, size: int, fill: float = 0.0, interpolation: str = "bicubic",
                       antialias: bool = True, clamp: bool = False) -> torch.Tensor:
    """HPSv2's ``ResizeMaxSize``: scale the longer side to ``size`` (new sides ``round(d * scale)``)
    and pad the shorter one symmetrically with ``fill`` to a ``size`` square."""
    H, W = images.shape[-2:]
    scale = size / float(max(H, W))
    nh, nw = round(H * scale), round(W * scale)
    images = resize(images, (nh, nw), interpolation, antialias, clamp)
    ph, pw = size - nh, size - nw
    if ph or pw:
        images = F.pad(images, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2], value=fill)
    return images


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


@dataclass(frozen=True)
class ImagePreprocess:
    """One model's preprocessing, on (B, 3, H, W) tensors in [0, 1], differentiable.

    mode:
      "shortest_crop": resize the shorter side to ``resize_to`` then centre-crop ``size`` (open_clip's
                       ``preprocess_val``, transformers' ``CLIPImageProcessor``);
      "longest_pad":   resize the longer side to ``size`` then pad to a square with ``fill`` (HPSv2's
                       official ``preprocess_val``, ``ResizeMaxSize``);
      "stretch":       resize straight to ``size`` (a processor whose ``size`` has height and width).
    For square inputs the first two are the same thing.
    """

    size: tuple[int, int]
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    mode: str = "shortest_crop"
    resize_to: int | None = None          # shortest edge for "shortest_crop" (default: min(size))
    interpolation: str = "bicubic"
    antialias: bool = True
    clamp: bool = False                   # clamp to [0, 1] after resizing (as the uint8 PIL path does)
    crop_offset: str = "round"            # "round" torchvision, "floor" transformers
    fill: float = 0.0                     # pad value for "longest_pad", in [0, 1] units (before normalising)

    def __post_init__(self):
        object.__setattr__(self, "size", _pair(self.size))
        if self.mode not in RESIZE_MODES:
            raise ValueError(f"mode must be one of {RESIZE_MODES}, got {self.mode!r}")
        if self.mode == "longest_pad" and self.size[0] != self.size[1]:
            raise ValueError(f"mode 'longest_pad' needs a square size, got {self.size}")

    def geometry(self, images: torch.Tensor) -> torch.Tensor:
        """Resize / crop / pad only (values stay in [0, 1] units)."""
        if self.mode == "stretch":
            return resize(images, self.size, self.interpolation, self.antialias, self.clamp)
        if self.mode == "longest_pad":
            return resize_longest_pad(images, self.size[0], self.fill, self.interpolation, self.antialias,
                                      self.clamp)
        short = self.resize_to if self.resize_to is not None else min(self.size)
        H, W = images.shape[-2:]
        images = resize(images, shortest_edge_size(H, W, short), self.interpolation, self.antialias, self.clamp)
        return center_crop(images, self.size, self.crop_offset)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        return normalize(self.geometry(images.float()), self.mean, self.std)
