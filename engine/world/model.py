"""The world's pretrained tiny Flux: the model that reward fine-tuning starts from.

``engine/world/weights`` holds two diffusers folders trained by ``scripts/pretrain_world.py``
(its log: ``weights/train_log.txt``, samples: ``weights/samples.png``):

  vae/          AutoencoderKL with Flux's conventions (no quant convs, 4 latent channels,
                shift/scaling factors from its latents' statistics); vae_scale_factor 4, so a
                64x64 image is 16x16x4 latents, 64 packed tokens of 16 channels
  transformer/  FluxTransformer2DModel (in_channels 16, text widths 384 = the world's MiniLM
                encoder, guidance embedding trained at a constant 3.5), pretrained with
                rectified flow on world renders

It draws the colours, shapes and places of the world's prompts apart but gets a prompt wholly
right only about a quarter of the time (the judge's accuracy on test prompts): something to
align. Prompts
are encoded with ``engine.world.text.load_text_encoder("minilm")``.
"""
from __future__ import annotations

import os

import torch

from engine.flux.adapter import FluxAdapter

__all__ = ["WEIGHTS_DIR", "IMAGE_SIZE", "load_world_flux"]

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
IMAGE_SIZE = 64  # the resolution it was trained at (the world's default render size)


def load_world_flux(device="cpu", dtype: torch.dtype = torch.float32, guidance_scale: float = 3.5,
                    path: str | os.PathLike | None = None) -> FluxAdapter:
    """The shipped pretrained world model as a FluxAdapter (transformer + VAE), from local files."""
    return FluxAdapter.from_pretrained(WEIGHTS_DIR if path is None else path, torch_dtype=dtype,
                                       device=device, guidance_scale=guidance_scale)
