"""Resident bytes of FLUX.1-dev's frozen transformer base, as loaded (bf16) and stored in fp8
(``model.base_precision=fp8``: engine.build.apply_fp8_base), measured on fake tensors on a CPU.

    python bench/fp8_base.py [--rank 64]

The model is bench/measure.py's FLUX_DEV_CONFIG built under FakeTensorMode (no RAM), LoRA applied
with the engine's own targets (engine/config.py LoraConfig) as a run does, then converted; "base"
is every parameter and buffer that is not a LoRA weight (the fp8 codes, their fp32 scales, and the
layers kept in bf16: embedders, final norm and projection, RMSNorm weights).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GiB = 1024 ** 3


def base_bytes(transformer: torch.nn.Module) -> int:
    """Bytes of the transformer's non-LoRA parameters and buffers (fake or real tensors)."""
    ts = [t for n, t in [*transformer.named_parameters(), *transformer.named_buffers()] if "lora_" not in n]
    return sum(t.numel() * t.element_size() for t in ts)


def measure(config: dict | None = None, rank: int = 64, mode: str = "weight") -> dict:
    """{"bf16": bytes before, "fp8": bytes after, "converted": linears, "lora": LoRA bytes}."""
    from engine.plan import fake_safe_to   # peft's no-op Module.to on fake modules
    from bench.measure import FLUX_DEV_CONFIG, build_fake_flux, fake_mode
    from engine import build
    from engine.config import LoraConfig

    old = torch.get_default_dtype()
    with fake_mode(), fake_safe_to():
        tr = build_fake_flux(config or FLUX_DEV_CONFIG, torch.bfloat16)
        torch.set_default_dtype(torch.bfloat16)   # LoRA layers born bf16: no cast of a fake module
        try:
            build.apply_lora(tr, LoraConfig(enabled=True, rank=rank, alpha=float(rank)), seed=0)
        finally:
            torch.set_default_dtype(old)
        before = base_bytes(tr)
        info = build.apply_fp8_base(tr, mode)
        after = base_bytes(tr)
        lora = sum(p.numel() * p.element_size() for n, p in tr.named_parameters() if "lora_" in n)
    return {"bf16": before, "fp8": after, "converted": info["converted"], "lora": lora}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=64, help="LoRA rank (the adapter is not part of the base)")
    args = ap.parse_args(argv)
    r = measure(rank=args.rank)
    print(json.dumps(r))
    print(f"FLUX.1-dev transformer base: bf16 {r['bf16'] / GiB:.2f} GiB -> fp8 {r['fp8'] / GiB:.2f} GiB "
          f"({r['converted']} linears converted; LoRA rank {args.rank}: {r['lora'] / GiB:.2f} GiB, unchanged)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
