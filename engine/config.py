"""Run configuration: plain dataclasses, loaded from YAML, overridden by ``key=value`` pairs.

Unknown keys are errors (a typo in a config must not silently train with a default).
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from engine.params import (DECODER_GRANULARITIES, DEFAULT_LAM, DEVICES, DIST_MODES, DTYPES, METHOD_PARAMS, POLICIES,
                           REWARD_CKPT, DRaFTLVParams, DRTuneParams, FullParams, LeapAlignParams, ReFLParams,
                           build_dataclass, method_params, method_section, reward_params)
from engine.params import BASE_PRECISIONS


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
    # how the graph-keeping passes keep activations (engine/flux/lean.py): none | full | lean | budget,
    # or diffusers (its own enable_gradient_checkpointing, the baseline the benches compare with)
    policy: str = "none"
    budget_gib: float = 0.0           # policy=budget: bound on the blocks' saved activations
    checkpoint_reward: bool = True    # VAE decoder recomputed in the backward
    # how (engine/flux/vae.py): auto | resnet | block (exact, frozen-weight ops) | diffusers
    reward_ckpt: str = "auto"
    # torch.compile backend for every double / single block (diffusers' compile_repeated_blocks:
    # one graph per block class, reused 19 / 38 times); "" = eager, "inductor" on a GPU
    compile: str = ""
    # frozen base storage under LoRA: bf16 (as loaded) | fp8 (e4m3 weights, bf16 compute) |
    # fp8-rollout (also fp8 matmuls in the no-grad rollout; CUDA sm_89+). engine.build.apply_fp8_base
    base_precision: str = "bf16"
    # block swap (engine/swap.py): the frozen linears of the last N blocks (double, then single, in
    # execution order) live in pinned host memory and are copied in one block ahead; 0 = off
    swap_blocks: int = 0


@dataclass
class MethodConfig:
    name: str = "leapalign"           # leapalign | refl | draft-lv | drtune | full
    # relu(lam - r) for every method: stop pushing a sample once its reward passes lam. Calibrate
    # on real good images (HPSv2.1: 0.55, near their scores); configs/world.yaml shows how.
    lam: float = DEFAULT_LAM
    # each method's own parameters (engine/params.py); only the named method's section is used,
    # so switching `name` never carries one method's parameters into another
    leapalign: LeapAlignParams = field(default_factory=LeapAlignParams)
    refl: ReFLParams = field(default_factory=ReFLParams)
    draft_lv: DRaFTLVParams = field(default_factory=DRaFTLVParams)
    drtune: DRTuneParams = field(default_factory=DRTuneParams)
    full: FullParams = field(default_factory=FullParams)


@dataclass
class RewardConfig:
    name: str = "colour"              # engine.params.REWARD_PARAMS
    params: dict = field(default_factory=dict)   # that reward's parameters (typed in engine/params.py)

    def typed(self):
        return reward_params(self.name, self.params)


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 1e-4
    betas: typing.Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: typing.Optional[float] = 1.0   # max global gradient norm; null (or false) = no clipping
    ema_decay: float = 0.995


@dataclass
class LoraConfig:
    enabled: bool = False
    rank: int = 64
    alpha: float = 64.0
    # diffusers' Flux attention and MLP linears (double and single blocks)
    targets: typing.List[str] = field(default_factory=lambda: [
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"])


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    prompts: typing.List[str] = field(default_factory=lambda: ["a red square"])
    eval_prompts: typing.List[str] = field(default_factory=list)   # empty: the test split, else the training prompts
    # .txt (one per line, # comments) or HPDv2 .json, or "world" (the world's train / test split);
    # replaces prompts
    prompt_file: str = ""
    test_fraction: float = 0.0        # share of prompt_file held out as eval prompts (seeded split)
    embed_cache_dir: str = ""         # on-disk prompt-embedding cache (engine/flux/embed_cache.py)
    steps: int = 100
    batch_size: int = 1
    num_steps: int = 25               # T, sampling steps of the rollout
    eval_num_steps: int = 50          # T of the evaluation samples (the paper evaluates with 50)
    seed: int = 0
    device: str = "auto"              # auto | cpu | cuda
    output_dir: str = "runs/default"
    checkpoint_every: int = 0         # 0: only at the end
    samples: int = 4                  # images per grid
    eval_size: int = 0                # eval prompts scored before / after (0: the grid's `samples`)
    judge: bool = False               # also score eval samples with the world's judge (world prompts)
    # more rewards to score eval samples with, each {name: ..., params: {...}} like `reward`
    eval_rewards: typing.List[dict] = field(default_factory=list)
    # data parallel under torchrun: none | ddp | fsdp (FSDP2, full fine-tuning or LoRA). batch_size
    # is per rank and micro-step: one update averages batch_size * grad_accum * world_size samples
    distributed: str = "none"
    distributed_timeout_s: float = 600.0   # a collective waiting longer than this ends the job
    grad_accum: int = 1               # micro-steps whose gradients add up to one update
    tensorboard: bool = False         # also log to <output_dir>/tb (needs the tensorboard package)

    def validate(self) -> "TrainConfig":
        """Every check that needs no model: run at load time, before the heavy imports."""
        def one_of(name, value, valid):
            if value not in valid:
                raise ValueError(f"{name} must be one of {list(valid)}, got {value!r}")

        def at_least(name, value, low):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")

        def finite(name, value, low=None, open_low=False):
            if not math.isfinite(value) or (low is not None and (value <= low if open_low else value < low)):
                bound = "" if low is None else f" and {'>' if open_low else '>='} {low}"
                raise ValueError(f"{name} must be finite{bound}, got {value}")

        m, o = self.model, self.optim
        if self.num_steps < 2:
            raise ValueError(f"num_steps (T) must be >= 2 so that k != j, got {self.num_steps}")
        at_least("eval_num_steps", self.eval_num_steps, 1)
        for name in ("steps", "batch_size", "samples", "grad_accum"):
            at_least(name, getattr(self, name), 1)
        for name in ("eval_size", "checkpoint_every"):
            at_least(name, getattr(self, name), 0)
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must lie in [0, 2**63), got {self.seed}")
        if not self.prompts and not self.prompt_file:
            raise ValueError("prompts must not be empty")
        for i, p in enumerate([*self.prompts, *self.eval_prompts]):
            if not p.strip():
                raise ValueError(f"prompts must not be blank, got {p!r}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must lie in [0, 1), got {self.test_fraction}")
        if self.test_fraction > 0 and not self.prompt_file:
            raise ValueError("test_fraction splits prompt_file, but prompt_file is not set")
        one_of("model.reward_ckpt", m.reward_ckpt, REWARD_CKPT)
        one_of("model.dtype", m.dtype, DTYPES)
        one_of("model.policy", m.policy, POLICIES)
        one_of("device", self.device, DEVICES)
        one_of("distributed", self.distributed, DIST_MODES)
        one_of("model.base_precision", m.base_precision, BASE_PRECISIONS)
        if m.base_precision != "bf16" and not self.lora.enabled:
            raise ValueError(f"model.base_precision={m.base_precision} stores the frozen base in fp8: it needs "
                             f"lora.enabled=true (full fine-tuning trains the base weights)")
        if m.base_precision != "bf16" and self.distributed == "fsdp":
            raise ValueError(f"model.base_precision={m.base_precision} is not supported with distributed=fsdp "
                             f"(FSDP2 sharding of fp8 base weights is untested); use ddp or base_precision=bf16")
        at_least("model.swap_blocks", m.swap_blocks, 0)
        if m.swap_blocks:
            if not self.lora.enabled:
                raise ValueError(f"model.swap_blocks={m.swap_blocks} moves frozen base weights: it needs "
                                 f"lora.enabled=true (full fine-tuning trains them)")
            if self.distributed != "none":
                raise ValueError(f"model.swap_blocks={m.swap_blocks} is for one device; with distributed="
                                 f"{self.distributed} shard the model with distributed=fsdp instead")
            if m.compile:
                raise ValueError(f"model.swap_blocks={m.swap_blocks} swaps tensors inside the blocks at every call, "
                                 f"which torch.compile would recompile for; set model.compile=''")
        if m.transformer_file and m.source in ("tiny", "world"):
            raise ValueError("model.transformer_file needs model.source to be a local diffusers folder "
                             "(for transformer/config.json, the VAE and the text encoders)")
        if m.policy == "budget" and not m.budget_gib > 0:
            raise ValueError(f"model.policy=budget needs model.budget_gib > 0, got {m.budget_gib}")
        for name in ("height", "width"):
            at_least(f"model.{name}", getattr(m, name), 1)
        finite("model.guidance_scale", m.guidance_scale)
        finite("optim.lr", o.lr, 0.0, open_low=True)
        if o.lr > 1.0:
            raise ValueError(f"optim.lr must lie in (0, 1] (AdamW), got {o.lr}")
        finite("optim.weight_decay", o.weight_decay, 0.0)
        if o.lr * o.weight_decay > 1.0:
            raise ValueError(f"optim.lr * optim.weight_decay must be <= 1 (the decay would flip the weights' sign), "
                             f"got {o.lr} * {o.weight_decay}")
        finite("optim.eps", o.eps, 0.0, open_low=True)
        for i, b in enumerate(o.betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"optim.betas[{i}] must lie in [0, 1), got {b}")
        if o.grad_clip is not None:
            finite("optim.grad_clip", o.grad_clip, 0.0, open_low=True)
        if not 0.0 <= o.ema_decay < 1.0:
            raise ValueError(f"optim.ema_decay must lie in [0, 1), got {o.ema_decay}")
        at_least("lora.rank", self.lora.rank, 1)
        finite("lora.alpha", self.lora.alpha, 0.0, open_low=True)
        finite("distributed_timeout_s", self.distributed_timeout_s, 0.0, open_low=True)
        method_params(self.method.name, getattr(self.method, method_section(self.method.name)))
        finite("method.lam", self.method.lam)
        self.reward.typed()
        for i, r in enumerate(self.eval_rewards):
            if not isinstance(r, dict) or "name" not in r or set(r) - {"name", "params"}:
                raise ValueError(f"eval_rewards[{i}] must be a mapping with 'name' and optional 'params', got {r!r}")
            reward_params(r["name"], r.get("params") or {}, f"eval_rewards[{i}].params.")
        return self


SECTIONS = {"model": ModelConfig, "method": MethodConfig, "reward": RewardConfig, "optim": OptimConfig,
            "lora": LoraConfig}


def _legacy(data: dict) -> dict:
    method = data.get("method")
    if isinstance(method, dict) and "params" in method:
        name = method.get("name", "leapalign")
        raise ValueError(f"method.params was replaced by per-method sections: write its keys under "
                         f"method.{method_section(str(name))} (and lam as method.lam)")
    return data


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
    if not isinstance(data, dict):
        raise ValueError(f"a config must be a mapping of keys, got {type(data).__name__}")
    return build_dataclass(TrainConfig, _legacy(data), "").validate()


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    data = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    return from_dict(apply_overrides(data, list(overrides)))
