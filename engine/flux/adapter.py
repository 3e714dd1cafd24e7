"""Adapter over diffusers' FluxTransformer2DModel (+ its AutoencoderKL).

Everything that is a diffusers convention comes from diffusers itself: packing / unpacking /
image ids are FluxPipeline's static methods, the noise is `randn_tensor`, the image mapping is
`VaeImageProcessor.denormalize`. What is written here is only the glue the trainer needs:
a velocity callable `v(x, sigma)` over packed latents, a differentiable decode, and a plain
Euler rollout that matches `FluxPipeline(..., output_type="latent")` bit for bit in fp32.

Conventions copied from `diffusers/pipelines/flux/pipeline_flux.py`:
- the scheduler's timesteps are `sigmas * 1000` in float32; the pipeline passes
  `t.expand(B).to(latents.dtype) / 1000` and the transformer multiplies by 1000 again. We do the
  same round trip (in the transformer's dtype) so the embedding sees identical values.
- guidance: `torch.full([1], g, float32).expand(B)` when `transformer.config.guidance_embeds`.
- txt_ids: zeros (L, 3); img_ids: `_prepare_latent_image_ids(h // 2, w // 2)` in latent units.
- Euler update in FlowMatchEulerDiscreteScheduler.step: `x.float() + (s_next - s) * v`, cast back
  to v's dtype.
- decode: unpack, `latents / scaling_factor + shift_factor`, `vae.decode`, `(x * 0.5 + 0.5).clamp(0, 1)`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

__all__ = ["FluxCond", "FluxAdapter"]

# weight files diffusers' ModelMixin.from_pretrained accepts (single file or sharded index)
_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.bin.index.json",
)


@dataclass
class FluxCond:
    """Everything the transformer needs besides x and sigma."""

    prompt_embeds: Tensor  # (B, L, joint_attention_dim), transformer dtype/device
    pooled: Tensor  # (B, pooled_projection_dim)
    txt_ids: Tensor  # (L, 3)
    img_ids: Tensor  # (N, 3)
    guidance: Tensor | None  # (B,) float32, None when the model has no guidance embedding
    height: int  # pixel size
    width: int

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]


def _param_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in module.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


class FluxAdapter:
    """Packed-latent velocity field, decode and rollout for a diffusers Flux transformer."""

    def __init__(self, transformer: FluxTransformer2DModel, vae: AutoencoderKL | None = None,
                 guidance_scale: float = 3.5):
        self.transformer = transformer
        self.vae = vae
        self.guidance_scale = float(guidance_scale)
        if vae is not None:
            # the VAE is a frozen decoder here: gradients flow through it to x, never into it
            vae.requires_grad_(False)
            vae.eval()
        # same expression as FluxPipeline.__init__
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8

    # ------------------------------------------------------------------ shapes
    @property
    def num_channels_latents(self) -> int:
        return self.transformer.config.in_channels // 4

    @property
    def device(self) -> torch.device:
        return _param_device_dtype(self.transformer)[0]

    @property
    def dtype(self) -> torch.dtype:
        return _param_device_dtype(self.transformer)[1]

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """Unpacked latent (h, w), as FluxPipeline.prepare_latents computes it."""
        f = self.vae_scale_factor * 2
        return 2 * (int(height) // f), 2 * (int(width) // f)

    def image_seq_len(self, height: int, width: int) -> int:
        h, w = self.latent_size(height, width)
        return (h // 2) * (w // 2)

    # ------------------------------------------------------------------ inputs
    def noise(self, batch: int, height: int, width: int, generator=None,
              dtype: torch.dtype = torch.float32, device=None) -> Tensor:
        """Packed (B, N, C*4) Gaussian latents, the same values as FluxPipeline.prepare_latents."""
        device = self.device if device is None else torch.device(device)
        h, w = self.latent_size(height, width)
        c = self.num_channels_latents
        latents = randn_tensor((batch, c, h, w), generator=generator, device=device, dtype=dtype)
        return FluxPipeline._pack_latents(latents, batch, c, h, w)

    def condition(self, prompt_embeds: Tensor, pooled: Tensor, height: int, width: int) -> FluxCond:
        device, dtype = _param_device_dtype(self.transformer)
        b = prompt_embeds.shape[0]
        if pooled.shape[0] != b:
            raise ValueError(f"prompt_embeds batch {b} != pooled batch {pooled.shape[0]}")
        h, w = self.latent_size(height, width)
        # FluxPipeline.encode_prompt: zeros(L, 3) in the transformer's dtype when no text encoder
        txt_ids = torch.zeros(prompt_embeds.shape[1], 3).to(device=device, dtype=dtype)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([1], self.guidance_scale, device=device, dtype=torch.float32).expand(b)
        else:
            guidance = None
        return FluxCond(
            prompt_embeds=prompt_embeds.to(device=device, dtype=dtype),
            pooled=pooled.to(device=device, dtype=dtype),
            txt_ids=txt_ids, img_ids=img_ids, guidance=guidance,
            height=int(height), width=int(width),
        )

    # ------------------------------------------------------------------ velocity
    def velocity(self, x: Tensor, sigma: Tensor | float, cond: FluxCond) -> Tensor:
        """v(x, sigma) for packed x (B, N, C). No host/device sync; differentiable in x and weights."""
        _, dtype = _param_device_dtype(self.transformer)
        b = x.shape[0]
        if not torch.is_tensor(sigma):
            sigma = torch.tensor(sigma, dtype=torch.float32)
        sigma = sigma.to(device=x.device, dtype=torch.float32, non_blocking=True)
        # scheduler.timesteps = sigmas * num_train_timesteps (float32); the pipeline then passes
        # t.expand(B).to(latents.dtype) / 1000 and the transformer multiplies by 1000 again.
        t = (sigma * 1000).reshape(-1)
        if t.numel() == 1:
            t = t.expand(b)
        timestep = t.to(dtype) / 1000
        guidance = cond.guidance
        if guidance is not None and guidance.shape[0] != b:
            guidance = guidance[:1].expand(b)
        out = self.transformer(
            hidden_states=x.to(dtype),
            timestep=timestep,
            guidance=guidance,
            pooled_projections=cond.pooled,
            encoder_hidden_states=cond.prompt_embeds,
            txt_ids=cond.txt_ids,
            img_ids=cond.img_ids,
            return_dict=False,
        )[0]
        return out.to(x.dtype)

    def velocity_fn(self, cond: FluxCond) -> Callable[[Tensor, Tensor], Tensor]:
        def v(x: Tensor, sigma: Tensor) -> Tensor:
            return self.velocity(x, sigma, cond)

        return v

    # ------------------------------------------------------------------ decode
    def unpack(self, x: Tensor, height: int, width: int) -> Tensor:
        return FluxPipeline._unpack_latents(x, height, width, self.vae_scale_factor)

    def decode(self, x: Tensor, height: int, width: int) -> Tensor:
        """Packed latents -> images (B, 3, H, W) in [0, 1], in the VAE's dtype; differentiable in x."""
        if self.vae is None:
            raise RuntimeError("FluxAdapter has no VAE (built or loaded with load_vae=False)")
        device, dtype = _param_device_dtype(self.vae)
        latents = self.unpack(x, height, width)
        latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
        image = self.vae.decode(latents.to(device=device, dtype=dtype), return_dict=False)[0]
        return VaeImageProcessor.denormalize(image)

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def rollout(self, x: Tensor, sigmas, cond: FluxCond) -> Tensor:
        """Plain Euler rollout over sigmas (T+1 values ending in 0), as FlowMatchEulerDiscreteScheduler."""
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32).to(x.device)
        for i in range(sigmas.shape[0] - 1):
            s, s_next = sigmas[i], sigmas[i + 1]
            v = self.velocity(x, s, cond)
            # scheduler.step: upcast the sample, dt (float32 0-dim) * model_output, cast back
            x = (x.to(torch.float32) + (s_next - s) * v).to(v.dtype)
        return x

    # ------------------------------------------------------------------ loading
    @staticmethod
    def _check_folder(folder: str) -> None:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"missing model folder: {folder}")
        cfg = os.path.join(folder, "config.json")
        if not os.path.isfile(cfg):
            raise FileNotFoundError(f"missing config file: {cfg}")
        if not any(os.path.isfile(os.path.join(folder, f)) for f in _WEIGHT_FILES):
            raise FileNotFoundError(
                f"missing weights file: {os.path.join(folder, _WEIGHT_FILES[0])} "
                f"(or one of {', '.join(_WEIGHT_FILES[1:])})"
            )

    @classmethod
    def from_pretrained(cls, path, torch_dtype: torch.dtype = torch.float32, device="cpu",
                        guidance_scale: float = 3.5, load_vae: bool = True,
                        transformer_file: str | None = None) -> "FluxAdapter":
        """Load a LOCAL diffusers folder (path/transformer, path/vae). Never contacts a hub.

        With `transformer_file` the transformer weights come from that one file instead (BFL's
        original `flux1-dev.safetensors` layout or a diffusers-format state dict); the folder then
        only has to provide `transformer/config.json` (and the VAE).
        """
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"missing model folder: {path}")
        if load_vae:
            cls._check_folder(os.path.join(path, "vae"))
        if transformer_file:
            transformer = load_transformer_file(transformer_file, path, torch_dtype)
        else:
            cls._check_folder(os.path.join(path, "transformer"))
            transformer = FluxTransformer2DModel.from_pretrained(
                path, subfolder="transformer", torch_dtype=torch_dtype, local_files_only=True
            )
        transformer = transformer.to(device)
        vae = None
        if load_vae:
            vae = AutoencoderKL.from_pretrained(
                path, subfolder="vae", torch_dtype=torch_dtype, local_files_only=True
            ).to(device)
        return cls(transformer, vae, guidance_scale=guidance_scale)


# ---------------------------------------------------------------------- single-file checkpoints
# BFL's original module names -> diffusers' (parameter suffix kept; BFL's RMSNorm `scale` is
# diffusers' `weight`). diffusers' own convert_flux_transformer_checkpoint_to_diffusers hard-codes
# FLUX.1's width (3072) when it splits the single blocks' fused linear1, so it cannot load any
# other width (our tiny model included); this table takes the widths from the config instead.
_BFL_TOP = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder",
    "img_in": "x_embedder",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # (shift, scale) -> (scale, shift)
}
_BFL_DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_BFL_SINGLE = {
    "modulation.lin": "norm.linear",
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),  # rows: inner x3, then the MLP
    "norm.query_norm": "attn.norm_q",
    "norm.key_norm": "attn.norm_k",
    "linear2": "proj_out",
}
_BFL_BLOCKS = {"double_blocks": ("transformer_blocks", _BFL_DOUBLE),
               "single_blocks": ("single_transformer_blocks", _BFL_SINGLE)}
# ComfyUI-style all-in-one checkpoints keep the transformer under this prefix next to VAE/encoders
_BFL_PREFIX = "model.diffusion_model."


def is_bfl_state_dict(state_dict: dict) -> bool:
    return any(k.startswith(("double_blocks.", "single_blocks.", _BFL_PREFIX)) for k in state_dict)


def bfl_to_diffusers(state_dict: dict, config) -> dict:
    """BFL-layout Flux transformer state dict -> diffusers FluxTransformer2DModel keys.

    Keys it does not know keep their BFL name, so the caller's key check reports them instead of
    loading a file whose extra tensors (fp8 scales, merged LoRA deltas) would be quietly ignored.
    """
    if any(k.startswith(_BFL_PREFIX) for k in state_dict):
        state_dict = {k[len(_BFL_PREFIX):]: v for k, v in state_dict.items() if k.startswith(_BFL_PREFIX)}
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    out = {}
    for key, t in state_dict.items():
        module, _, param = key.rpartition(".")
        param = "weight" if param == "scale" else param
        block, _, rest = module.partition(".")
        index, _, name = rest.partition(".")
        if block in _BFL_BLOCKS and index.isdigit():
            block, table = _BFL_BLOCKS[block]
            prefix, target = f"{block}.{index}.", table.get(name)
        else:
            prefix, target = "", _BFL_TOP.get(module)
        if target is None:
            out[key] = t
        elif isinstance(target, tuple):
            # fused projections stack q, k, v (and the single blocks' MLP input) along the rows
            sizes = [inner] * 3 + ([t.shape[0] - 3 * inner] if len(target) == 4 else [])
            if sum(sizes) != t.shape[0] or min(sizes) <= 0:
                out[key] = t  # a width the config does not have: reported by the shape check
                continue
            for name, part in zip(target, torch.split(t, sizes, dim=0)):
                out[f"{prefix}{name}.{param}"] = part
        else:
            if module == "final_layer.adaLN_modulation.1":
                shift, scale = t.chunk(2, dim=0)
                t = torch.cat([scale, shift], dim=0)
            out[f"{prefix}{target}.{param}"] = t
    return out


def _check_state_dict(state_dict: dict, expected: dict, file: str, config_file: str) -> None:
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs config {tuple(v.shape)}"
              for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"{n} {what} (e.g. {', '.join(items[:3])})"
                 for n, what, items in ((len(missing), "missing keys", missing),
                                        (len(unexpected), "unexpected keys", unexpected),
                                        (len(shapes), "shape mismatches", shapes)) if n]
        raise ValueError(f"{file} is not a Flux transformer checkpoint for {config_file}: " + "; ".join(parts))


def load_transformer_file(file, folder, torch_dtype: torch.dtype = torch.float32) -> FluxTransformer2DModel:
    """A FluxTransformer2DModel from one weights file, shaped by folder/transformer/config.json."""
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    file, folder = os.fspath(file), os.fspath(folder)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"missing transformer weights file: {file}")
    config_file = os.path.join(folder, "transformer", "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"missing config file: {config_file}")
    config = FluxTransformer2DModel.load_config(folder, subfolder="transformer", local_files_only=True)
    try:
        state_dict = load_single_file_checkpoint(file, local_files_only=True)
    except Exception as e:  # a truncated or non-weights file: say which one
        raise ValueError(f"could not read weights from {file}: {e}") from e
    if is_bfl_state_dict(state_dict):
        state_dict = bfl_to_diffusers(state_dict, config)
    with torch.device("meta"):
        expected = FluxTransformer2DModel.from_config(config).state_dict()
    _check_state_dict(state_dict, expected, file, config_file)
    # the keys now match the model exactly, so from_single_file loads them as they are; `config`
    # is the local folder, which keeps it from looking the architecture up on a hub
    return FluxTransformer2DModel.from_single_file(
        state_dict, config=folder, subfolder="transformer", torch_dtype=torch_dtype, local_files_only=True
    )
