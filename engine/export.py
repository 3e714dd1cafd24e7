"""Export a fine-tuned transformer in diffusers' own formats.

- LoRA: ``FluxPipeline.save_lora_weights`` over peft's ``get_peft_model_state_dict`` (with the
  adapter's LoraConfig as metadata, so ``lora_alpha != r`` loads with the right scale), i.e. the
  folder ``FluxPipeline.load_lora_weights(folder)`` reads.
- Full model: ``save_pretrained`` (safetensors) of the transformer; with LoRA on, the adapters are
  merged into a deep copy first (diffusers' ``fuse_lora`` + ``unload_lora``), so the folder is a
  plain ``FluxTransformer2DModel`` and the training model is left untouched.

``export_checkpoint`` does either from a training checkpoint (``python -m engine export``).
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path

import torch

__all__ = ["has_lora", "export_lora", "export_transformer", "export_checkpoint"]


def has_lora(transformer: torch.nn.Module) -> bool:
    return bool(getattr(transformer, "_hf_peft_config_loaded", False)) and bool(getattr(transformer, "peft_config", None))


def export_lora(transformer: torch.nn.Module, out_dir: str | Path) -> Path:
    """Write the transformer's LoRA adapter as ``out_dir/pytorch_lora_weights.safetensors``."""
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    if not has_lora(transformer):
        raise ValueError("the transformer has no LoRA adapter to export (trained with lora.enabled=false?)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}
    metadata = transformer.peft_config["default"].to_dict()
    FluxPipeline.save_lora_weights(out_dir, transformer_lora_layers=state,
                                   transformer_lora_adapter_metadata=metadata, safe_serialization=True)
    return out_dir


def export_transformer(transformer: torch.nn.Module, out_dir: str | Path) -> Path:
    """Write a plain diffusers ``FluxTransformer2DModel`` folder (LoRA, if any, fused into a copy)."""
    out_dir = Path(out_dir)
    model = transformer
    if has_lora(transformer):
        model = copy.deepcopy(transformer)
        model.fuse_lora()
        model.unload_lora()
        left = [n for n, _ in model.named_parameters() if "lora_" in n or "base_layer" in n]
        if left:
            raise RuntimeError(f"LoRA layers left after fusing: {left[:3]}")
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


class _NoTextEncoder:
    def encode(self, prompts):
        raise RuntimeError("export builds the model without text encoders")


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, lora: bool = False, ema: bool = False) -> Path:
    """Load a training checkpoint (validated as for resuming) and export its transformer: the LoRA
    adapter (``lora=True``) or the whole model; ``ema=True`` exports the EMA weights."""
    from engine.flux.adapter import FluxAdapter
    from engine.flux.tiny import build_tiny_flux
    from engine.trainer import DTYPES, LeapTrainer

    cfg = LeapTrainer.config_from_checkpoint(checkpoint)
    if lora and not cfg.lora.enabled:
        raise ValueError(f"checkpoint {checkpoint} was trained without LoRA (lora.enabled=false); "
                         f"export the full model instead (drop --lora)")
    # only the transformer is needed: no prompts, no cache, no text encoders, VAE or reward model
    cfg = dataclasses.replace(cfg, prompt_file="", test_fraction=0.0, embed_cache_dir="", prompts=["-"],
                              eval_prompts=[], model=dataclasses.replace(cfg.model, policy="none"))
    m = cfg.model
    device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    cfg = dataclasses.replace(cfg, device=device.type)
    if m.source == "tiny":
        adapter = build_tiny_flux(m.seed, DTYPES[m.dtype], device, m.guidance_scale)
    else:
        adapter = FluxAdapter.from_pretrained(m.source, DTYPES[m.dtype], device, m.guidance_scale, load_vae=False)
    trainer = LeapTrainer(cfg, adapter=adapter, text_encoder=_NoTextEncoder(), reward=torch.nn.Identity())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*another prompt list.*")
        trainer.load_checkpoint(checkpoint)
    write = export_lora if lora else export_transformer
    if ema:
        with trainer.ema_weights():
            return write(trainer.transformer, out_dir)
    return write(trainer.transformer, out_dir)
