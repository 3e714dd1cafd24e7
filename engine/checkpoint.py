"""Training checkpoints as one safetensors file, written atomically and validated before use.

Layout: ``model.<name>`` trainable weights, ``ema.<name>`` fp32 EMA, ``optim.<name>.<key>``
AdamW state, ``rng.<name>`` generator states; metadata holds the step, the run config, and the
model's portable config and the names and shapes of its trainable weights, which loading compares.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT = "leapalign-checkpoint-1"


def portable_config(model_config: dict) -> dict:
    """The model config as a checkpoint compares it: diffusers' private keys (``_name_or_path``,
    the absolute folder the weights came from; ``_diffusers_version``) say where and by what the
    model was loaded, not what it is, and must not stop a checkpoint from moving between machines."""
    return {k: v for k, v in json.loads(json.dumps(model_config, default=str)).items() if not k.startswith("_")}


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
    """Read and fully validate a checkpoint's weights against the model it is meant for; returns
    (tensors, metadata). Touches no training state, so a bad file changes nothing."""
    path = Path(path)
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"corrupt or unreadable checkpoint {path}: {e}") from None
    saved = _json_meta(path, meta, "shapes")
    diff = _first_difference(saved, expected_shapes)
    if diff is None:
        saved_cfg = portable_config(_json_meta(path, meta, "model_config"))
        cfg = portable_config(model_config)
        for key in sorted(set(saved_cfg) | set(cfg)):
            if saved_cfg.get(key) != cfg.get(key):
                diff = f"model config key {key!r}: checkpoint has {saved_cfg.get(key)!r}, this model {cfg.get(key)!r}"
                break
    if diff is not None:
        raise ValueError(f"checkpoint {path} was written for another model ({diff})")
    for name, shape in expected_shapes.items():
        for prefix in ("model.", "ema."):
            _check_tensor(path, tensors, prefix + name, shape)
    return tensors, meta


def _json_meta(path: Path, meta: dict, key: str) -> dict:
    try:
        value = json.loads(meta.get(key, "{}"))
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise ValueError(f"checkpoint {path}: metadata {key!r} is not a JSON mapping")
    return value


def _check_tensor(path: Path, tensors: dict, key: str, shape=None) -> torch.Tensor:
    t = tensors.get(key)
    if t is None:
        raise ValueError(f"checkpoint {path} lacks tensor {key}")
    if shape is not None and list(t.shape) != list(shape):
        raise ValueError(f"checkpoint {path}: {key} has shape {list(t.shape)}, model expects {list(shape)}")
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise ValueError(f"checkpoint {path}: {key} holds non-finite values")
    return t


def _first_difference(saved: dict, expected: dict) -> str | None:
    for name in sorted(set(saved) | set(expected)):
        if name not in expected:
            return f"it has weight {name!r} that this model lacks"
        if name not in saved:
            return f"it lacks weight {name!r}"
        if list(saved[name]) != list(expected[name]):
            return f"weight {name!r} has shape {list(saved[name])}, this model has {list(expected[name])}"
    return None


# ---------------------------------------------------------------------- the training state
OPTIM_KEYS = ("step", "exp_avg", "exp_avg_sq")    # AdamW's per-parameter state


def state_tensors(params: dict, ema: dict, optimizer, full=lambda t: t) -> dict[str, torch.Tensor]:
    """The layout: ``model.<n>``, ``ema.<n>``, ``optim.<n>.<key>``; ``full`` gathers a sharded
    tensor (every rank walks the same order, as gathers are collective)."""
    tensors = {}
    for n, p in params.items():
        tensors[f"model.{n}"] = full(p)
        tensors[f"ema.{n}"] = full(ema[n])
    for n, p in params.items():
        for key, val in optimizer.state.get(p, {}).items():
            tensors[f"optim.{n}.{key}"] = full(val if torch.is_tensor(val) else torch.tensor(val))
    return tensors


@dataclass
class TrainState:
    """A checkpoint's training state, read and validated in full (``read_state``); applying it
    (``apply_state``) can no longer fail on the file's contents."""

    weights: dict
    ema: dict
    optim: dict          # name -> {step, exp_avg, exp_avg_sq}; empty before the first update
    rng: torch.Tensor
    step: int
    skipped: int
    global_batch: int | None
    prompts_sha256: str | None


def _meta_int(path: Path, meta: dict, key: str, default=None) -> int:
    if key not in meta and default is not None:
        return default
    try:
        value = int(meta[key])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"checkpoint {path}: metadata {key!r} must be an integer >= 0, got {meta.get(key)!r}") from None
    if value < 0:
        raise ValueError(f"checkpoint {path}: metadata {key!r} must be an integer >= 0, got {value}")
    return value


def read_state(path: str | Path, model_config: dict, shapes: dict[str, list[int]]) -> TrainState:
    """Everything a resume needs, validated before anything is applied: weights and EMA (shapes,
    finite), AdamW's state for every parameter (all of it or none of it, finite), the RNG state
    (set on a scratch generator), step and skip counts."""
    path = Path(path)
    tensors, meta = load(path, model_config, shapes)
    step, skipped = _meta_int(path, meta, "step"), _meta_int(path, meta, "skipped")
    if "rng.generator" not in tensors:
        raise ValueError(f"checkpoint {path} lacks the RNG state (rng.generator)")
    try:
        torch.Generator().set_state(tensors["rng.generator"])
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"checkpoint {path}: rng.generator is not a generator state ({str(e).splitlines()[0]})") from None
    optim = {}
    has_optim = any(k.startswith("optim.") for k in tensors)
    if step - skipped > 0 and not has_optim:
        raise ValueError(f"checkpoint {path} lacks the optimizer state (optim.*) after {step - skipped} update(s); "
                         f"resuming would restart AdamW's moments silently")
    if has_optim:
        for n, shape in shapes.items():
            st = {}
            for key in OPTIM_KEYS:
                t = _check_tensor(path, tensors, f"optim.{n}.{key}", shape if key != "step" else None)
                st[key] = t
            if st["step"].numel() != 1 or not float(st["step"]) >= 0:
                raise ValueError(f"checkpoint {path}: optim.{n}.step must be one count >= 0, got {st['step'].tolist()}")
            optim[n] = st
    return TrainState(weights={n: tensors[f"model.{n}"] for n in shapes}, ema={n: tensors[f"ema.{n}"] for n in shapes},
                      optim=optim, rng=tensors["rng.generator"], step=step, skipped=skipped,
                      global_batch=_meta_int(path, meta, "global_batch", -1) if "global_batch" in meta else None,
                      prompts_sha256=meta.get("prompts_sha256"))


def apply_state(state: TrainState, params: dict, ema: dict, optimizer, generator: torch.Generator,
                shard_like=lambda full, like: full) -> None:
    """Put a validated ``TrainState`` into the live objects (``shard_like`` cuts a full tensor to a
    parameter's sharding under FSDP2)."""
    sd = optimizer.state_dict()
    sd["state"] = {i: {k: (v if k == "step" else shard_like(v, p)) for k, v in state.optim[n].items()}
                   for i, (n, p) in enumerate(params.items()) if n in state.optim}
    optimizer.load_state_dict(sd)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(shard_like(state.weights[n].to(p.dtype), p))
            ema[n].copy_(shard_like(state.ema[n], ema[n]))
    generator.set_state(state.rng)


def load_weights(path: str | Path, transformer: torch.nn.Module, ema: bool = False) -> dict[str, str]:
    """Load a checkpoint's trained weights (``ema``: its EMA) into a model built like the run's
    (``engine.build.build_trainable``), validated first; returns the metadata."""
    params = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
    config = dict(transformer.config)
    tensors, meta = load(path, config, {n: list(p.shape) for n, p in params.items()})
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"{'ema' if ema else 'model'}.{n}"].to(p.dtype))
    return meta


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Temporary files that a crash during ``save_atomic`` left beside ``path`` (call this only
    while holding the run folder's lock: another writer's live temp file looks the same)."""
    path = Path(path)
    gone = []
    for tmp in path.parent.glob(path.name + ".*.tmp"):
        tmp.unlink(missing_ok=True)
        gone.append(tmp)
    return gone


# ---------------------------------------------------------------------- the config inside
# Keys of a stored run config that name files. A checkpoint is data: what sample / eval / export
# read or write must come from the command line, never from the file (it could name any path).
PATH_KEYS = ("model.source", "model.transformer_file", "prompt_file", "embed_cache_dir", "output_dir")
NAMED = {"model.source": ("tiny", "world"), "prompt_file": ("", "world")}   # registered names, not paths
REWARD_PATH_PARAMS = ("path", "tokenizer", "base", "processor_path")


def stored_config(path: str | Path) -> dict:
    import yaml

    meta = read_metadata(path)
    try:
        data = yaml.safe_load(meta.get("config", ""))
    except yaml.YAMLError:
        data = None
    if not isinstance(data, dict):
        raise ValueError(f"checkpoint {path}: its run config is missing or not a mapping")
    return data


def _reward_paths(entry: dict, where: str):
    """(key, value) of every file path in a reward entry (mix entries included)."""
    params = entry.get("params") or {}
    if not isinstance(params, dict):
        return
    for k in REWARD_PATH_PARAMS:
        if params.get(k):
            yield f"{where}params.{k}", params[k]
    if entry.get("name") == "mix" and isinstance(params.get("rewards"), dict):
        for key, sub in params["rewards"].items():
            sub = sub or {}
            for k in REWARD_PATH_PARAMS:
                if isinstance(sub, dict) and sub.get(k):
                    yield f"{where}params.rewards.{key}.{k}", sub[k]


def read_config(path: str | Path, overrides: list[str] = (), need: tuple[str, ...] = ("model",)):
    """The run config stored in a checkpoint, for ``sample`` / ``eval`` / ``export``, with every
    file path in it withheld: ``output_dir`` and ``embed_cache_dir`` are dropped, and a path that
    ``need`` requires (``model``: model.source / transformer_file; ``prompts``: prompt_file;
    ``rewards``: the rewards' weight files) must be given again as an override, else a one-line
    error names the key and the value to pass. Returns (config, withheld paths)."""
    from engine.config import apply_overrides, from_dict

    data = stored_config(path)
    given = {o.split("=", 1)[0] for o in overrides}
    withheld = {}
    for key in PATH_KEYS:
        node, *rest = key.split(".")
        section = data.get(node) if rest else data
        field = rest[0] if rest else node
        if not isinstance(section, dict):
            continue
        value = section.get(field)
        if value and value not in NAMED.get(key, ()):
            withheld[key] = value
            section[field] = "tiny" if key == "model.source" else ""
    rewards = [("reward.", data.get("reward") or {})]
    rewards += [(f"eval_rewards[{i}].", r) for i, r in enumerate(data.get("eval_rewards") or []) if isinstance(r, dict)]
    reward_paths = [(k, v) for where, entry in rewards if isinstance(entry, dict) for k, v in _reward_paths(entry, where)]
    for k, v in reward_paths:
        withheld[k] = v
    needed = {"model": ("model.source", "model.transformer_file"), "prompts": ("prompt_file",)}
    for group in need:
        for key in needed.get(group, ()):
            if key in withheld and key not in given:
                raise ValueError(f"checkpoint {path} was trained with {key}={withheld[key]}; paths in a checkpoint "
                                 f"are not read: pass {key}=PATH on the command line")
    if "rewards" in need:
        for key, value in reward_paths:
            if key.startswith("reward.") and key not in given:
                raise ValueError(f"checkpoint {path} was trained with {key}={value}; paths in a checkpoint "
                                 f"are not read: pass {key}=PATH on the command line")
        if any(k.startswith("eval_rewards") for k, _ in reward_paths):
            data["eval_rewards"] = [r for i, r in enumerate(data.get("eval_rewards") or [])
                                    if not any(k.startswith(f"eval_rewards[{i}].") for k, _ in reward_paths)]
    if "model.source" in withheld and "model.source" not in given:
        data.setdefault("model", {})["transformer_file"] = ""
    return from_dict(apply_overrides(data, list(overrides))), withheld
