"""Typed hyper-parameters of the methods and rewards, and the checks on them.

This module imports nothing heavy (no torch), so that ``load_config`` can check a whole run
configuration in a fraction of a second, before the trainer's imports. The method classes in
``engine.methods`` extend these dataclasses, so each default is written here and only here;
each reward's parameters mirror that reward's constructor (``tests/test_config.py`` checks
they agree).
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field

# valid values of config keys, owned here so that engine.flux.lean, engine.flux.vae and
# engine.distributed (which import them) and the config check agree without heavy imports
BLOCK_POLICIES = ("none", "full", "lean", "budget")  # how graph-keeping passes keep activations
POLICIES = (*BLOCK_POLICIES, "diffusers")            # + diffusers' own gradient checkpointing
DECODER_GRANULARITIES = ("auto", "resnet", "block")  # exact VAE decoder recomputation
REWARD_CKPT = (*DECODER_GRANULARITIES, "diffusers")
DIST_MODES = ("none", "ddp", "fsdp")
DTYPES = ("float32", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
# storage of the frozen base under LoRA (engine.build.apply_fp8_base): "bf16" keeps it as loaded
# (model.dtype), "fp8" stores the block linears in e4m3 with bf16 compute, "fp8-rollout" also
# multiplies in fp8 in the no-grad rollout (CUDA sm_89+); value -> apply_fp8_base mode
FP8_BASE_MODES = {"bf16": "none", "fp8": "weight", "fp8-rollout": "rollout"}
BASE_PRECISIONS = tuple(FP8_BASE_MODES)

# relu(lam - r): the paper's value for HPSv2.1, near the score of good real images. Calibrate it
# for another reward on real good images (the README says how).
DEFAULT_LAM = 0.55


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


# ---------------------------------------------------------------------- methods
@dataclass
class LeapAlignParams:
    alpha: float = 0.3            # discount of the nested gradient through the model input at j
    tau: float = 0.1              # bounds the consistency weight
    weighting: bool = True        # weight each sample by its leap's consistency with the real path
    pair_window: int = 0          # 0: (k, j) uniform over all T steps; m > 0: both within the last m

    def check(self, where: str = "") -> None:
        _finite(f"{where}alpha", self.alpha)
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"{where}alpha must lie in [0, 1], got alpha={self.alpha}")
        if not (math.isfinite(self.tau) and self.tau > 0.0):
            raise ValueError(f"{where}tau must be finite and > 0 (it bounds the consistency weight), got tau={self.tau}")
        if self.pair_window < 0 or self.pair_window == 1:
            raise ValueError(f"{where}pair_window must be 0 or >= 2, got {self.pair_window}")


@dataclass
class ReFLParams:
    last_m: int = 11              # the stop step is drawn from the last m steps

    def check(self, where: str = "") -> None:
        if self.last_m < 1:
            raise ValueError(f"{where}last_m must be >= 1, got {self.last_m}")


@dataclass
class DRaFTLVParams:
    n: int = 2                    # re-noised copies of x_0 beside the real last step (0: DRaFT-1)

    def check(self, where: str = "") -> None:
        if self.n < 0:
            raise ValueError(f"{where}n must be >= 0 (DRaFT-LV re-noisings), got {self.n}")


@dataclass
class DRTuneParams:
    K: int = 2                    # evenly spaced steps that keep gradient
    last_m: int = 11

    def check(self, where: str = "") -> None:
        if self.K < 1:
            raise ValueError(f"{where}K must be >= 1 (DRTune training steps), got {self.K}")
        if self.last_m < 1:
            raise ValueError(f"{where}last_m must be >= 1, got {self.last_m}")


@dataclass
class FullParams:
    checkpointing: bool = True    # each step's model call recomputed in backward

    def check(self, where: str = "") -> None:
        pass


# the method names a config takes, each with its parameters' section in ``method:``
METHOD_PARAMS = {"leapalign": LeapAlignParams, "refl": ReFLParams, "draft-lv": DRaFTLVParams,
                 "drtune": DRTuneParams, "full": FullParams}


def method_section(name: str) -> str:
    """The config key of a method's parameters ("draft-lv" -> "draft_lv")."""
    return name.replace("-", "_")


# ---------------------------------------------------------------------- rewards
@dataclass
class ColourParams:
    eps: float = 1e-6


@dataclass
class WorldParams:
    path: str = ""                # "" = the shipped weights (engine/world/weights/reward)


@dataclass
class HPSv21Params:
    path: str = ""                # HPS_v2.1_compressed.pt, or a folder holding it
    arch: typing.Union[str, dict] = "ViT-H-14"   # a name, or an OpenCLIP model config
    tokenizer: typing.Optional[str] = None
    resize: str = "longest_pad"
    antialias: bool = True
    strict: bool = True
    grad_checkpointing: bool = False
    dtype: str = "float32"        # weights' dtype; bfloat16 halves ViT-H's 3.7 GiB (scores within bf16's precision)

    def check(self, where: str = "") -> None:
        if self.dtype not in REWARD_DTYPES:
            raise ValueError(f"{where}dtype must be one of {list(REWARD_DTYPES)}, got {self.dtype!r}")


@dataclass
class HPSv3Params:
    path: str = ""
    base: typing.Optional[str] = None
    dtype: str = "bfloat16"
    min_pixels: int = 256 * 28 * 28
    max_pixels: int = 256 * 28 * 28
    grad_checkpointing: bool = False
    attn_implementation: str = "sdpa"


@dataclass
class PickScoreParams:
    path: str = ""
    processor_path: typing.Optional[str] = None
    scale: float = 1.0


@dataclass
class CLIPParams:
    path: str = ""
    processor_path: typing.Optional[str] = None
    w: float = 1.0
    clamp: bool = False


@dataclass
class MixParams:
    # {key: {name?: reward, weight?: w, ...that reward's parameters}}; each entry checked like a reward
    rewards: dict = field(default_factory=dict)


REWARD_PARAMS = {"colour": ColourParams, "world": WorldParams, "hpsv21": HPSv21Params, "hpsv3": HPSv3Params,
                 "pickscore": PickScoreParams, "clip": CLIPParams, "mix": MixParams}
REQUIRES_PATH = ("hpsv21", "hpsv3", "pickscore", "clip")
REWARD_DTYPES = ("float32", "bfloat16", "float16")


# ---------------------------------------------------------------------- building typed values
def build_dataclass(cls, data, where: str):
    """``cls(**data)`` with every key known and every value of its field's type (numbers written
    as YAML strings such as '1e-3' are read as numbers); errors name the key."""
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"{where.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"unknown config key(s) {[f'{where}{u}' for u in unknown]}; valid: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = build_dataclass(hint, value, f"{where}{key}.")
        else:
            kwargs[key] = coerce(value, hint, f"{where}{key}")
    return cls(**kwargs)


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def coerce(value, hint, name: str):
    """``value`` checked against a field's type hint; YAML 1.1 reads '1e-3' as a string, so
    numeric fields also take numbers written that way."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:       # Optional[X]: null, or YAML's false / off, is "not set"
        if type(None) in args and (value is None or value is False):
            return None
        options = [a for a in args if a is not type(None)]
        for a in options:
            try:
                return coerce(value, a, name)
            except ValueError:
                if a is options[-1]:
                    raise
    bad = ValueError(f"config key {name} must be {_type_name(hint)}, got {value!r}")
    if isinstance(value, bool) and hint is not bool:
        raise bad
    if hint is float or hint is int:
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise bad from None
        if not isinstance(value, (int, float)):
            raise bad
        if hint is int:
            if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
                raise bad
            value = int(value)
            if abs(value) >= 2**63:
                raise ValueError(f"config key {name} is out of range (|value| < 2**63), got {value}")
            return value
        return float(value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        if origin is tuple and args and Ellipsis not in args and len(value) != len(args):
            raise ValueError(f"config key {name} must hold {len(args)} values, got {value!r}")
        item = args[0] if args else None
        vals = [coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)] if item not in (None, Ellipsis) \
            else list(value)
        return tuple(vals) if origin is tuple else vals
    if hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        return hint(value)
    if not isinstance(value, hint):
        raise bad
    return value


def method_params(name: str, section) -> object:
    """A method's typed, checked parameters from its config section."""
    if name not in METHOD_PARAMS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHOD_PARAMS)}")
    where = f"method.{method_section(name)}."
    p = build_dataclass(METHOD_PARAMS[name], section, where)
    p.check(where)
    return p


def reward_params(name: str, params, where: str = "reward.params."):
    """A reward's typed, checked parameters (``params`` as written under ``reward.params``)."""
    if name not in REWARD_PARAMS:
        raise ValueError(f"unknown reward {name!r}; choose one of {sorted(REWARD_PARAMS)}")
    p = build_dataclass(REWARD_PARAMS[name], params if params is not None else {}, where)
    if name in REQUIRES_PATH and not p.path:
        raise ValueError(f"reward {name!r} needs {where}path (its weights file or folder)")
    if hasattr(p, "check"):
        p.check(where)
    if name == "mix":
        if not p.rewards:
            raise ValueError(f"reward 'mix' needs {where}rewards={{name: {{params..., weight: w}}, ...}}")
        for key, entry in p.rewards.items():
            entry = dict(entry or {})
            sub = entry.pop("name", key)
            weight = entry.pop("weight", 1.0)
            coerce(weight, float, f"{where}rewards.{key}.weight")
            if sub == "mix":
                raise ValueError(f"{where}rewards.{key}: a mix cannot contain another mix")
            reward_params(sub, entry, f"{where}rewards.{key}.")
    return p
