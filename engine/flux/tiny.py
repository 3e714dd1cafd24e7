"""The embedded default model: a tiny Flux transformer + VAE + hash text encoder, built from a seed.

No downloads. Same classes as FLUX.1-dev (diffusers' FluxTransformer2DModel and AutoencoderKL with
Flux's latent scaling/shift and no quant convs), just small: the whole engine runs on it on CPU.
"""
from __future__ import annotations

import zlib

import torch
from torch import Tensor, nn

from diffusers import AutoencoderKL, FluxTransformer2DModel

from .adapter import FluxAdapter

__all__ = ["tiny_transformer_config", "tiny_vae_config", "build_tiny_flux", "HashTextEncoder"]


def tiny_transformer_config() -> dict:
    """A small FluxTransformer2DModel: 1 double + 2 single blocks, width 32, 4 latent channels."""
    return dict(
        patch_size=1,
        in_channels=16,  # 4 latent channels * 2x2 packing
        out_channels=None,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=[4, 6, 6],  # sums to attention_head_dim
    )


def tiny_vae_config() -> dict:
    """A small AutoencoderKL with Flux's latent conventions; 4 blocks -> vae_scale_factor 8 as Flux.

    64x64 images <-> 8x8x4 latents <-> 16 packed tokens of 16 channels.
    """
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 16, 16, 16],
        layers_per_block=1,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        latents_mean=None,
        latents_std=None,
        force_upcast=True,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )


def build_tiny_flux(seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu",
                    guidance_scale: float = 3.5) -> FluxAdapter:
    """Deterministic for a seed, independent of (and not disturbing) the global RNG state.

    Weights are initialised on CPU in float32 and then moved/cast, so the values do not depend on
    the device or dtype asked for.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**tiny_transformer_config())
        vae = AutoencoderKL(**tiny_vae_config())
    transformer, vae = transformer.to(device), vae.to(device)
    if dtype != torch.float32:  # (diffusers warns on any .to(dtype), even a no-op one)
        transformer, vae = transformer.to(dtype), vae.to(dtype)
    return FluxAdapter(transformer, vae, guidance_scale=guidance_scale)


def _stable_hash(token: str) -> int:
    return zlib.crc32(token.encode("utf-8")) & 0xFFFFFFFF


class HashTextEncoder(nn.Module):
    """A real but trivial text encoder for the tiny default model.

    Lower-cased whitespace tokens are hashed (crc32, stable across processes) into a fixed random
    table built from `seed`; sequences are padded with a fixed pad vector / truncated to
    `max_length`. Each table row has a `joint_dim` token part and a `pooled_dim` pooled part;
    `pooled` is the mean of the pooled parts over the real (non-pad) tokens (the pad row's pooled
    part for an empty prompt).
    """

    def __init__(self, joint_dim: int, pooled_dim: int, max_length: int = 16, seed: int = 0,
                 vocab_size: int = 4096):
        super().__init__()
        self.joint_dim = int(joint_dim)
        self.pooled_dim = int(pooled_dim)
        self.max_length = int(max_length)
        self.vocab_size = int(vocab_size)
        self.seed = int(seed)
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        # row vocab_size is the pad row; deterministic from the seed, not saved in state_dicts
        table = torch.randn(self.vocab_size + 1, self.joint_dim + self.pooled_dim, generator=g)
        self.register_buffer("table", table, persistent=False)

    @property
    def pad_id(self) -> int:
        return self.vocab_size

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """(ids (B, L) long, mask (B, L) bool of real tokens)."""
        ids = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), self.max_length), dtype=torch.bool)
        for i, p in enumerate(prompts):
            toks = p.lower().split()[: self.max_length]
            for j, t in enumerate(toks):
                ids[i, j] = _stable_hash(t) % self.vocab_size
                mask[i, j] = True
        return ids, mask

    @torch.no_grad()
    def encode(self, prompts: list[str] | str) -> tuple[Tensor, Tensor]:
        """-> prompt_embeds (B, max_length, joint_dim), pooled (B, pooled_dim), on the table's device."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids, mask = self.tokenize(list(prompts))
        ids, mask = ids.to(self.table.device), mask.to(self.table.device)
        rows = self.table[ids]  # (B, L, joint + pooled)
        prompt_embeds = rows[..., : self.joint_dim]
        pooled_rows = rows[..., self.joint_dim:]
        m = mask.unsqueeze(-1).to(pooled_rows.dtype)
        n = m.sum(dim=1)
        pad_pooled = self.table[self.pad_id, self.joint_dim:].expand_as(pooled_rows[:, 0])
        pooled = torch.where(n > 0, (pooled_rows * m).sum(dim=1) / n.clamp(min=1), pad_pooled)
        return prompt_embeds.contiguous(), pooled.contiguous()

    def forward(self, prompts: list[str] | str) -> tuple[Tensor, Tensor]:
        return self.encode(prompts)
