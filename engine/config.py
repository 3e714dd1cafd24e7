"""Run configuration: plain dataclasses, loaded from YAML, overridden by ``key=value`` pairs.

Unknown keys are errors (a typo in a config must not silently train with a default).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class ModelConfig:
    # "tiny" (random, built from seed), "world" (the shipped pretrained world model,
    # engine/world/model.py, with its MiniLM text encoder) or a local diffusers folder
    source: str = "tiny"
    # one-file transformer weights (BFL's flux1-dev.safetensors or diffusers layout) used instead
    # of source/transformer's; source still gives transformer/config.json, the VAE and encoders
    transformer_file: str = ""
    seed: int = 0                     # weights seed of the tiny model
    dtype: str = "float32"            # weight dtype: float32 | bfloat16
    guidance_scale: float = 3.5       # Flux-dev's distilled guidance embedding
    height: int = 32
    width: int = 32
    # how the graph-keeping passes keep activations (engine/flux/lean.py): none | full | lean | budget
    policy: str = "none"
    budget_gib: float = 0.0           # policy=budget: bound on the blocks' saved activations
    checkpoint_reward: bool = True    # VAE decoder recomputed in the backward
    # how (engine/flux/vae.py): auto | resnet | block (exact, frozen-weight ops) | diffusers
    reward_ckpt: str = "auto"
    # torch.compile backend for every double / single block (diffusers' compile_repeated_blocks:
    # one graph per block class, reused 19 / 38 times); "" = eager, "inductor" on a GPU
    compile: str = ""


@dataclass
class MethodConfig:
    name: str = "leapalign"           # leapalign | refl | draft-lv | drtune | full
    params: dict = field(default_factory=dict)


@dataclass
class RewardConfig:
    name: str = "colour"
    params: dict = field(default_factory=dict)


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 1e-4
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    ema_decay: float = 0.995


@dataclass
class LoraConfig:
    enabled: bool = False
    rank: int = 64
    alpha: float = 64.0
    # diffusers' Flux attention and MLP linears (double and single blocks)
    targets: list = field(default_factory=lambda: [
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"])


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    prompts: list = field(default_factory=lambda: ["a red square"])
    eval_prompts: list = field(default_factory=list)   # empty: the test split, else the training prompts
    # .txt (one per line, # comments) or HPDv2 .json, or "world" (the world's train / test split);
    # replaces prompts
    prompt_file: str = ""
    test_fraction: float = 0.0        # share of prompt_file held out as eval prompts (seeded split)
    embed_cache_dir: str = ""         # on-disk prompt-embedding cache (engine/flux/embed_cache.py)
    steps: int = 100
    batch_size: int = 1
    num_steps: int = 25               # T, sampling steps of the rollout
    seed: int = 0
    device: str = "auto"              # auto | cpu | cuda
    output_dir: str = "runs/default"
    checkpoint_every: int = 0         # 0: only at the end
    samples: int = 4                  # images per grid
    eval_size: int = 0                # eval prompts scored before / after (0: the grid's `samples`)
    judge: bool = False               # also score eval samples with the world's judge (world prompts)
    # more rewards to score eval samples with, each {name: ..., params: {...}} like `reward`
    eval_rewards: list = field(default_factory=list)
    # data parallel under torchrun: none | ddp | fsdp (FSDP2, full fine-tuning or LoRA). batch_size
    # is per rank and micro-step: one update averages batch_size * grad_accum * world_size samples
    distributed: str = "none"
    grad_accum: int = 1               # micro-steps whose gradients add up to one update
    tensorboard: bool = False         # also log to <output_dir>/tb (needs the tensorboard package)

    def validate(self) -> "TrainConfig":
        if self.num_steps < 2:
            raise ValueError(f"num_steps (T) must be >= 2 so that k != j, got {self.num_steps}")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.prompts and not self.prompt_file:
            raise ValueError("prompts must not be empty")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must lie in [0, 1), got {self.test_fraction}")
        if self.model.reward_ckpt not in ("auto", "resnet", "block", "diffusers"):
            raise ValueError(f"model.reward_ckpt must be auto, resnet, block or diffusers, got {self.model.reward_ckpt!r}")
        if self.model.transformer_file and self.model.source in ("tiny", "world"):
            raise ValueError("model.transformer_file needs model.source to be a local diffusers folder "
                             "(for transformer/config.json, the VAE and the text encoders)")
        if self.eval_size < 0:
            raise ValueError(f"eval_size must be >= 0, got {self.eval_size}")
        for i, r in enumerate(self.eval_rewards):
            if not isinstance(r, dict) or "name" not in r or set(r) - {"name", "params"}:
                raise ValueError(f"eval_rewards[{i}] must be a mapping with 'name' and optional 'params', got {r!r}")
        if self.test_fraction > 0 and not self.prompt_file:
            raise ValueError("test_fraction splits prompt_file, but prompt_file is not set")
        if self.model.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"model.dtype must be float32 or bfloat16, got {self.model.dtype!r}")
        if self.model.policy not in ("none", "full", "lean", "budget"):
            raise ValueError(f"model.policy must be none, full, lean or budget, got {self.model.policy!r}")
        if self.model.policy == "budget" and not self.model.budget_gib > 0:
            raise ValueError(f"model.policy=budget needs model.budget_gib > 0, got {self.model.budget_gib}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if not 0.0 <= self.optim.ema_decay < 1.0:
            raise ValueError(f"optim.ema_decay must lie in [0, 1), got {self.optim.ema_decay}")
        if self.distributed not in ("none", "ddp", "fsdp"):
            raise ValueError(f"distributed must be none, ddp or fsdp, got {self.distributed!r}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        return self


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {[f'{where}{u}' for u in unknown]}; valid: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{where}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, f"{where}{key}")
    return cls(**kwargs)


def _coerce(value, hint, name: str):
    """Check a value against its field's type. YAML 1.1 reads '1e-3' as a string, so float
    fields also take numbers written that way."""
    bad = ValueError(f"config key {name} must be of type {hint.__name__}, got {value!r}")
    if isinstance(value, bool) and hint is not bool:
        raise bad
    if hint is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad from None
    if hint is tuple and isinstance(value, list):
        return tuple(value)
    if not isinstance(value, hint):
        raise bad
    return value


def _parse_value(text: str):
    return yaml.safe_load(text)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``a.b=value`` pairs onto a nested dict (values parsed as YAML scalars or lists)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, text = item.split("=", 1)
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = _parse_value(text)
    return data


def to_dict(cfg) -> dict:
    d = dataclasses.asdict(cfg)
    d["optim"]["betas"] = list(d["optim"]["betas"])
    return d


def from_dict(data: dict) -> TrainConfig:
    return _build(TrainConfig, data, "").validate()


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    data = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        data = yaml.safe_load(p.read_text()) or {}
    return from_dict(apply_overrides(data, list(overrides)))
