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
from pathlib import Path

import torch

__all__ = ["has_lora", "export_lora", "export_transformer", "export_checkpoint", "write_folder"]


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
    from kernels.fp8_linear import Fp8Linear

    if any(isinstance(m, Fp8Linear) for m in transformer.modules()):
        raise ValueError("this transformer's base is stored in fp8 (model.base_precision); a merged export "
                         "needs the bf16 base: export the LoRA, or rebuild with model.base_precision=bf16")
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


def write_folder(out_dir: str | Path, write) -> Path:
    """``write(folder)`` into a fresh temporary folder beside ``out_dir``, then renamed into place:
    a folder left by an earlier export is replaced whole (no stale shards or index survive), a
    crash leaves the old one intact, and nothing is written through a link already in the target.
    A target that is a file or a symbolic link is refused."""
    import os
    import shutil
    import tempfile

    out = Path(out_dir)
    if out.is_symlink():
        raise ValueError(f"export target {out} is a symbolic link; give a real folder path")
    if out.exists() and not out.is_dir():
        raise ValueError(f"export target {out} exists and is a file, not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        write(tmp)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.rmdir(old)
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, lora: bool = False, ema: bool = False,
                      overrides: list[str] = ()) -> Path:
    """Export a training checkpoint's transformer, without building a trainer: the model is built
    as the run built it (``engine.build.build_trainable``), the checkpoint validated and loaded
    into it; then the LoRA adapter (``lora=True``) or the whole model (``ema``: the EMA weights)
    is written to ``out_dir`` (``write_folder``). Paths stored in the checkpoint are not read: a
    folder model's ``model.source`` comes from ``overrides``."""
    from engine import build
    from engine import checkpoint as ckpt

    cfg, _ = ckpt.read_config(checkpoint, list(overrides), need=("model",))
    if lora and not cfg.lora.enabled:
        raise ValueError(f"checkpoint {checkpoint} was trained without LoRA (lora.enabled=false); "
                         f"export the full model instead (drop --lora)")
    device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    if not lora:   # LoRA merged into the bf16 base it exports for, not into the run's fp8 copy
        cfg.model.base_precision = "bf16"
    adapter = build.build_trainable(cfg, device, load_vae=False)
    ckpt.load_weights(checkpoint, adapter.transformer, ema=ema)
    writer = export_lora if lora else export_transformer
    return write_folder(out_dir, lambda folder: writer(adapter.transformer, folder))
