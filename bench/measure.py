"""Measuring tools shared by the benches: bytes saved for backward, peak live bytes, FLOPs, and a
full-size FLUX.1-dev built on fake tensors (no RAM, no GPU), as design.md's "Measuring without
a GPU" describes.
"""
from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from engine.memory import PeakLiveBytes, SavedBytes  # noqa: F401  (re-exported for the benches)

# FLUX.1-dev's published transformer / VAE configs live with the planner that sizes them
from engine.plan import FLUX_DEV_TRANSFORMER as FLUX_DEV_CONFIG  # noqa: E402,F401
from engine.plan import FLUX_DEV_VAE as FLUX_VAE_CONFIG  # noqa: E402,F401


def device_name(device: str) -> str:
    """The GPU's name, or the CPU model with its core count, for result files."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "CPU"


def attention_flops(batch: int, tokens: int, width: int, blocks: int, backward: bool = False) -> int:
    """Attention matmul FLOPs FlopCounterMode misses on CPU: QK^T and PV, 4 N^2 D per block
    forward (2 matmuls x 2 FLOPs per MAC), twice that for the backward."""
    f = 4 * batch * tokens * tokens * width * blocks
    return f * 3 if backward else f


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@contextlib.contextmanager
def fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


def build_fake_flux(config: dict | None = None, dtype=torch.bfloat16):
    """FLUX.1-dev's transformer on fake tensors: built under FakeTensorMode with the default dtype
    set around the constructor (calling .to(dtype) on a fake module fails)."""
    from diffusers import FluxTransformer2DModel

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return FluxTransformer2DModel(**(config or FLUX_DEV_CONFIG))
    finally:
        torch.set_default_dtype(old)


def flux_inputs(model, batch: int, image_tokens: int, text_tokens: int = 512, dtype=torch.bfloat16):
    c = model.config
    return dict(
        hidden_states=torch.randn(batch, image_tokens, c.in_channels, dtype=dtype),
        encoder_hidden_states=torch.randn(batch, text_tokens, c.joint_attention_dim, dtype=dtype),
        pooled_projections=torch.randn(batch, c.pooled_projection_dim, dtype=dtype),
        timestep=torch.full((batch,), 0.5, dtype=dtype),
        img_ids=torch.zeros(image_tokens, 3, dtype=dtype),
        txt_ids=torch.zeros(text_tokens, 3, dtype=dtype),
        guidance=torch.full((batch,), 3.5, dtype=torch.float32) if c.guidance_embeds else None,
        return_dict=False,
    )


GiB = 1024 ** 3
