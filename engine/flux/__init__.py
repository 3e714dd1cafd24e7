"""Flux model adapter (diffusers FluxTransformer2DModel + AutoencoderKL) and the tiny default."""
from .adapter import FluxAdapter, FluxCond
from .tiny import HashTextEncoder, build_tiny_flux, tiny_transformer_config, tiny_vae_config

__all__ = [
    "FluxAdapter",
    "FluxCond",
    "HashTextEncoder",
    "build_tiny_flux",
    "tiny_transformer_config",
    "tiny_vae_config",
]
