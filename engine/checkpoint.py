"""Training checkpoints as one safetensors file, written atomically and validated before use.

Layout: ``model.<name>`` trainable weights, ``ema.<name>`` fp32 EMA, ``optim.<name>.<key>``
AdamW state, ``rng.<name>`` generator states; metadata holds the step, the run config and a
fingerprint of the model (its config plus the names and shapes of the trainable weights).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT = "leapalign-checkpoint-1"


def fingerprint(model_config: dict, shapes: dict[str, list[int]]) -> str:
    blob = json.dumps({"config": model_config, "shapes": shapes}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def save_atomic(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename over it: a crash mid-write
    leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": FORMAT, **metadata})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"corrupt or unreadable checkpoint {path}: {e}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a LeapAlign checkpoint (format {meta.get('format')!r}, expected {FORMAT!r})")
    return meta


def load(path: str | Path, model_config: dict, expected_shapes: dict[str, list[int]]):
    """Read and fully validate a checkpoint against the model it is meant for; returns
    (tensors, metadata). Touches no training state, so a bad file changes nothing."""
    path = Path(path)
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"corrupt or unreadable checkpoint {path}: {e}") from None
    if meta.get("fingerprint") != fingerprint(model_config, expected_shapes):
        saved = json.loads(meta.get("shapes", "{}"))
        diff = _first_difference(saved, expected_shapes)
        if diff is None:
            saved_cfg = json.loads(meta.get("model_config", "{}"))
            cfg = json.loads(json.dumps(model_config, default=str))
            diff = "the model config differs"
            for key in sorted(set(saved_cfg) | set(cfg)):
                if saved_cfg.get(key) != cfg.get(key):
                    diff = f"model config key {key!r}: checkpoint has {saved_cfg.get(key)!r}"
                    break
        raise ValueError(f"checkpoint {path} was written for another model ({diff})")
    for name, shape in expected_shapes.items():
        for prefix in ("model.", "ema."):
            t = tensors.get(prefix + name)
            if t is None:
                raise ValueError(f"checkpoint {path} lacks tensor {prefix + name}")
            if list(t.shape) != list(shape):
                raise ValueError(f"checkpoint {path}: {prefix + name} has shape {list(t.shape)}, model expects {list(shape)}")
            if not torch.isfinite(t).all():
                raise ValueError(f"checkpoint {path}: {prefix + name} holds non-finite values")
    return tensors, meta


def _first_difference(saved: dict, expected: dict) -> str | None:
    for name in sorted(set(saved) | set(expected)):
        if name not in expected:
            return f"it has weight {name!r} that this model lacks"
        if name not in saved:
            return f"it lacks weight {name!r}"
        if list(saved[name]) != list(expected[name]):
            return f"weight {name!r} has shape {list(saved[name])}, this model has {list(expected[name])}"
    return None
