"""The composition root: every piece of a run is built here, from its config section.

Registries:
- ``SOURCES``: model sources by name, each with its model and its text encoder: ``tiny`` (random,
  from a seed), ``world`` (the shipped world model and its MiniLM encoder); any other
  ``model.source`` is a local diffusers folder (with ``model.transformer_file``, a single-file
  transformer), encoded by the folder's own CLIP + T5.
- ``PROMPT_SOURCES``: named prompt sets (``world``: the world's train / test split); any other
  ``prompt_file`` is a .txt / .json file, and none means the inline ``prompts``.
- rewards: ``engine.rewards.REWARDS`` (their parameters typed in ``engine.params``).

The features are applied to the plain diffusers model in this order, and only in it (the
trainer, ``python -m engine`` and the benches all call these functions):

1. ``build_model``                 the adapter: transformer + VAE, plain diffusers modules
2. ``apply_decoder_checkpointing`` exact recomputation of the frozen VAE decoder in backward
3. ``apply_lora``                  peft LoRA adapters (the base frozen), or all weights trainable
3b. ``apply_fp8_base``            the frozen block linears stored in fp8 (``model.base_precision``),
                                   after LoRA so peft wraps plain Linears and its adapters stay bf16
3c. ``apply_block_swap``          the model onto the device, the frozen linears of the last
                                   ``model.swap_blocks`` blocks left in pinned host memory and
                                   copied in one block ahead (engine/swap.py); after fp8, so the
                                   swapped tensors are the fp8 ones
4. ``apply_policy``                how graph-keeping passes keep activations (engine/flux/lean.py)
5. ``apply_compile``               torch.compile of every block, after the policy swap, so the
                                   lean / checkpointed forwards are what gets compiled
6. ``apply_parallel``              DDP wrapper or FSDP2 sharding, last: FSDP2 swaps parameters
                                   for sharded DTensors, so the optimizer and EMA come after it
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable

import torch

from engine.config import TrainConfig
from engine.params import FP8_BASE_MODES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------- device
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


# ---------------------------------------------------------------------- model sources
@dataclass(frozen=True)
class Source:
    model: Callable        # (model_cfg, device, dtype, load_vae) -> FluxAdapter
    text: Callable         # (model_cfg, adapter, device, dtype) -> text encoder


def _tiny_model(m, device, dtype, load_vae):
    from engine.flux.tiny import build_tiny_flux

    return build_tiny_flux(m.seed, dtype, device, m.guidance_scale)


def _tiny_text(m, adapter, device, dtype):
    from engine.flux.tiny import HashTextEncoder

    tc = adapter.transformer.config
    return HashTextEncoder(tc.joint_attention_dim, tc.pooled_projection_dim, seed=m.seed)


def _world_model(m, device, dtype, load_vae):
    from engine.world.model import load_world_flux

    return load_world_flux(device, dtype, m.guidance_scale)


def _world_text(m, adapter, device, dtype):
    from engine.world.text import MiniLMTextEncoder

    return MiniLMTextEncoder(device=device)


def _folder_model(m, device, dtype, load_vae):
    from engine.flux.adapter import FluxAdapter

    return FluxAdapter.from_pretrained(m.source, dtype, device, m.guidance_scale, load_vae=load_vae,
                                       transformer_file=m.transformer_file or None)


def _folder_text(m, adapter, device, dtype):
    from engine.flux.text import PipelineTextEncoder

    return PipelineTextEncoder(m.source, dtype, device)


SOURCES = {"tiny": Source(_tiny_model, _tiny_text), "world": Source(_world_model, _world_text)}
FOLDER = Source(_folder_model, _folder_text)


def source(name: str) -> Source:
    return SOURCES.get(name, FOLDER)


def build_model(m, device: torch.device, load_vae: bool = True):
    """The configured model as a ``FluxAdapter``; height and width checked against its patch size.
    With an fp8 base or block swap on a GPU the transformer stays on the CPU: ``apply_fp8_base``
    takes it to ``device`` one fp8 layer at a time and ``apply_block_swap`` the rest, so the bf16
    base is never there whole (FLUX.1-dev's 22.2 GiB would not fit a 24 GiB card with anything
    beside it)."""
    staged = (m.base_precision != "bf16" or m.swap_blocks > 0) and device.type != "cpu"
    adapter = source(m.source).model(m, torch.device("cpu") if staged else device, DTYPES[m.dtype], load_vae)
    if staged and adapter.vae is not None:
        adapter.vae.to(device)
    if adapter.vae is not None:
        check_image_size(adapter, m.height, m.width)
    return adapter


def check_image_size(adapter, height: int, width: int) -> None:
    f = adapter.vae_scale_factor * 2     # VAE downsampling x Flux's 2x2 latent packing
    for name, v in (("model.height", height), ("model.width", width)):
        if v % f or v < f:
            raise ValueError(f"{name} must be a positive multiple of {f} for this model "
                             f"(VAE factor {adapter.vae_scale_factor} x 2x2 packing), got {v}")


# ---------------------------------------------------------------------- prompts
def _world_prompts():
    from engine.world.prompts import split

    world = split()
    return list(world.train), list(world.test)


PROMPT_SOURCES = {"world": _world_prompts}


def build_prompts(cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts): ``prompt_file`` (a named set or a file) replaces the
    inline ``prompts``."""
    if cfg.prompt_file in PROMPT_SOURCES:
        return PROMPT_SOURCES[cfg.prompt_file]()
    if cfg.prompt_file:
        from engine.prompts import load_prompt_split

        return load_prompt_split(cfg.prompt_file, cfg.test_fraction, cfg.seed)
    return list(cfg.prompts), []


def eval_prompts(cfg: TrainConfig, train: list[str], test: list[str]) -> list[str]:
    """The fixed evaluation set: ``eval_size`` (else ``samples``) of ``eval_prompts``, the test
    split or the training prompts, in that order of preference, each prompt at most once. A
    longer list is subsampled with a fixed seed (not the run's), so every run scores the same set."""
    import random

    base = list(dict.fromkeys(cfg.eval_prompts or test or train))
    n = cfg.eval_size or cfg.samples
    if n < len(base):
        order = list(range(len(base)))
        random.Random(0).shuffle(order)
        base = [base[i] for i in sorted(order[:n])]
    return base


def check_prompts(prompts: list[str], *users) -> None:
    """Every prompt through every user's own check (the text encoder's token limit, a reward
    that must read something from it), up front, so a bad prompt fails the run before step 1."""
    for user in users:
        check = getattr(user, "check_prompts", None)
        if check is not None:
            check(list(dict.fromkeys(prompts)))


# ---------------------------------------------------------------------- text encoder
def build_text_encoder(cfg: TrainConfig, adapter, device: torch.device, prompts: list[str], dist=None):
    """The source's text encoder; with ``embed_cache_dir`` wrapped in the on-disk cache, every
    prompt precomputed (rank 0 first) and the encoder itself released."""
    m = cfg.model
    src = source(m.source)
    if not cfg.embed_cache_dir:
        return src.text(m, adapter, device, DTYPES[m.dtype])
    from engine.flux.embed_cache import CachedTextEncoder, encoder_identity, pipeline_encoder_id

    if src is FOLDER:    # built only on a cache miss, dropped after the precompute
        encoder = functools.partial(src.text, m, adapter, device, DTYPES[m.dtype])
        identity = pipeline_encoder_id(m.source, 512, DTYPES[m.dtype])
    else:
        encoder = src.text(m, adapter, device, DTYPES[m.dtype])
        identity = encoder_identity(encoder)
    cached = CachedTextEncoder(encoder, cfg.embed_cache_dir, identity)
    # rank 0 first: the other ranks then only read the files it wrote
    with dist.main_first() if dist is not None else contextlib.nullcontext():
        cached.precompute(prompts, progress=dist is None or dist.main)
    cached.release()
    return cached


# ---------------------------------------------------------------------- rewards
def build_rewards(cfg: TrainConfig, device: torch.device, training: bool = True) -> tuple[torch.nn.Module | None, dict]:
    """(training reward, or None without ``training``; {"reward_<name>": eval reward}), frozen,
    on ``device``."""
    from engine.rewards import build_reward

    reward = build_reward(cfg.reward.name, **cfg.reward.params).to(device) if training else None
    extra = {f"reward_{r['name']}": build_reward(r["name"], **(r.get("params") or {})).to(device)
             for r in cfg.eval_rewards}
    return reward, extra


# ---------------------------------------------------------------------- features, in order
def apply_decoder_checkpointing(adapter, m) -> None:
    """Exact recomputation of the frozen decoder (engine/flux/vae.py): at 1024^2 on Flux's VAE the
    decode + reward backward peaks at 2.36 GiB ("auto") against 6.09 GiB with diffusers' per-block
    checkpointing and 11.37 GiB plain, for ~0.7 extra decoder forwards. Applying it again with
    another setting replaces the previous one."""
    if adapter.vae is None:
        return
    from engine.flux.vae import checkpoint_decoder, uncheckpoint_decoder

    uncheckpoint_decoder(adapter.vae)
    if m.checkpoint_reward and m.reward_ckpt == "diffusers":
        adapter.vae.enable_gradient_checkpointing()
        return
    adapter.vae.disable_gradient_checkpointing()
    if m.checkpoint_reward:
        checkpoint_decoder(adapter.vae, m.reward_ckpt)


def apply_lora(transformer, lora, seed: int) -> None:
    """peft LoRA on ``lora.targets`` with the base frozen (initialised from the run seed, not the
    global RNG), or every weight trainable."""
    if not lora.enabled:
        transformer.requires_grad_(True)
        return
    from peft import LoraConfig as PeftLoraConfig

    have = getattr(transformer, "peft_config", {}).get("default") if getattr(
        transformer, "_hf_peft_config_loaded", False) else None
    if have is not None:      # applied before (a second run on the same model, as the benches do)
        if (have.r, have.lora_alpha, set(have.target_modules)) != (lora.rank, lora.alpha, set(lora.targets)):
            raise ValueError(f"the model already carries a LoRA adapter (r={have.r}, alpha={have.lora_alpha}) "
                             f"that differs from lora.rank={lora.rank}, lora.alpha={lora.alpha}")
        for n, p in transformer.named_parameters():
            p.requires_grad_("lora_" in n)
        return

    transformer.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.targets)))


FP8_MODES = tuple(FP8_BASE_MODES.values())   # none | weight | rollout


def apply_fp8_base(transformer, mode: str, device: torch.device | None = None) -> dict:
    """Store the frozen base of the double / single blocks in fp8 (kernels/fp8_linear.py): every
    frozen ``nn.Linear`` there (peft's ``base_layer``s and the untargeted ones, e.g. the modulation
    linears), ~99 % of FLUX's weights. The embedders and the output layer stay as loaded: small,
    and they carry the timestep / guidance conditioning. ``mode``: ``none`` | ``weight`` (fp8
    storage, compute in the model dtype) | ``rollout`` (also fp8 matmuls in no-grad passes; CUDA
    sm_89+). LoRA weights, their state_dict keys and the checkpoint are untouched. Applying it
    again only switches weight <-> rollout: the conversion is lossy, bf16 cannot come back.
    ``device``: where the model ends (``build_model`` leaves an fp8 base's transformer on the
    CPU); each layer is quantized there as it arrives."""
    from kernels import fp8_linear as f8

    if mode not in FP8_MODES:
        raise ValueError(f"fp8 base mode must be one of {list(FP8_MODES)}, got {mode!r}")
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    stored = any(isinstance(mod, f8.Fp8Linear) for b in blocks for mod in b.modules())
    if mode == "none":
        if stored:
            raise ValueError("the model's base is already stored in fp8; rebuild it for model.base_precision=bf16")
        return {"converted": 0, "fp8_compute": 0}     # placed by apply_block_swap
    if mode == "rollout":
        why = f8.fp8_compute_unavailable(device if device is not None else next(transformer.parameters()).device)
        if why is None and transformer.dtype != torch.bfloat16:
            why = f"fp8 compute writes bf16, the model is {transformer.dtype} (set model.dtype=bfloat16)"
        if why is not None:
            raise RuntimeError(f"model.base_precision=fp8-rollout cannot run: {why}; "
                               f"model.base_precision=fp8 stores fp8 and computes in the model dtype")
    compute = "fp8" if mode == "rollout" else "bf16"
    if stored:
        converted = sum(f8.set_compute(b, compute) for b in blocks)
    else:
        converted = sum(len(f8.convert_linears(b, compute, device)) for b in blocks)
    _place(transformer, device)    # the rest: LoRA, embedders, norms (the fp8 layers are there already)
    fp8 = sum(isinstance(mod, f8.Fp8Linear) and mod.compute == "fp8" for b in blocks for mod in b.modules())
    return {"converted": converted, "fp8_compute": fp8}


def _place(module, device: torch.device | None, keep: set[int] = frozenset()) -> None:
    """``module`` onto ``device``, except the tensors whose ids are in ``keep`` (block swap's host
    copies). Only when something is elsewhere: Module.to fails on fake modules even as a no-op."""
    if device is None:
        return
    device = torch.device(device)
    if any(id(t) not in keep and (t.device.type != device.type or device.index not in (None, t.device.index))
           for t in [*module.parameters(), *module.buffers()]):
        if keep:   # Module.to is this _apply with every tensor converted
            module._apply(lambda t: t if id(t) in keep else t.to(device))
        else:
            module.to(device)


def apply_block_swap(transformer, n: int, device: torch.device):
    """Place the model on ``device``; with ``n`` > 0 the swappable tensors of the last ``n`` blocks
    stay in (pinned) host memory and are copied in when used (engine/swap.py). Returns the
    ``BlockSwap`` (its counters say what moved), or None. Applying it again with the same ``n``
    returns the same swap; another ``n`` needs a new model."""
    from engine import swap

    blocks = swap.blocks_in_order(transformer)
    if not 0 <= n <= len(blocks):
        raise ValueError(f"model.swap_blocks must lie in [0, {len(blocks)}] (the model's blocks), got {n}")
    have = getattr(transformer, "_engine_block_swap", None)
    if have is not None:      # applied before (the benches build several trainers on one model)
        if len(have.leaves) != n:
            raise ValueError(f"the model already swaps {len(have.leaves)} blocks; build a new model for "
                             f"model.swap_blocks={n}")
        return have
    if n == 0:
        _place(transformer, device)
        return None
    swapper = swap.BlockSwap(blocks[-n:], device)
    _place(transformer, device, keep=swapper.host_tensor_ids())
    transformer._engine_block_swap = swapper
    return swapper


def apply_policy(transformer, m, batch_size: int = 1, text_tokens: int = 512, adapter=None) -> dict:
    """Swap every block's forward to ``m.policy``; ``budget`` measures each block's saved bytes on
    inputs of the run's shapes; ``diffusers`` is diffusers' own ``enable_gradient_checkpointing``
    on untouched blocks (the baseline a plain diffusers training script runs). Applying it again
    replaces the previous policy."""
    from engine.flux import lean

    if getattr(transformer, "gradient_checkpointing", False):
        transformer.disable_gradient_checkpointing()
    kw = {}
    if m.policy == "budget":
        h, w = adapter.latent_size(m.height, m.width)
        kw = dict(budget_bytes=int(m.budget_gib * 2**30),
                  inputs=lean.block_inputs(transformer, batch_size, text_tokens, (h // 2, w // 2)))
    plan = lean.apply_policy(transformer, "none" if m.policy == "diffusers" else m.policy, **kw)
    if m.policy == "diffusers":
        transformer.enable_gradient_checkpointing()
    return plan


def apply_compile(transformer, backend: str) -> None:
    """torch.compile of every double / single block (diffusers' compile_repeated_blocks: one graph
    per block class); the Triton and CUDA ops are custom ops with fake kernels, so dynamo traces
    through them."""
    if backend:
        transformer.compile_repeated_blocks(backend=backend, dynamic=False)


def apply_parallel(transformer, dist, device: torch.device):
    """The module the training forwards go through (DDP wrapper, FSDP2-sharded in place, or
    ``transformer`` itself)."""
    return dist.wrap(transformer, device)


def build_trainable(cfg: TrainConfig, device: torch.device, load_vae: bool = True):
    """Steps 1, 3, 3b and 3c alone: the model with the run's trainable parameters (what a checkpoint
    holds), for sampling, evaluation and export."""
    adapter = build_model(cfg.model, device, load_vae=load_vae)
    apply_lora(adapter.transformer, cfg.lora, cfg.seed)
    apply_fp8_base(adapter.transformer, FP8_BASE_MODES[cfg.model.base_precision], device)
    apply_block_swap(adapter.transformer, cfg.model.swap_blocks, device)
    return adapter


def describe_backends(device: torch.device, policy: str, plan=None) -> str:
    """One line: the block policy, and the fused-kernel and attention backends that will run
    (the same rules as ``kernels.backend`` applies per call)."""
    import importlib.util
    import os

    from kernels import backend as kb

    name = kb.choose("leap_connect", device.type == "cuda")
    kernels = {"cuda": "cuda (csrc)", "torch": "torch reference",
               "triton": "triton" if device.type == "cuda" else "triton interpreter"}[name]
    if os.environ.get(kb.ENV_VAR, "").strip():
        kernels += f" (forced by {kb.ENV_VAR})"
    if policy in ("lean", "budget"):
        fa = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
        attention = "flash-attn" if fa else "torch SDPA (flash-attn not installed)" if device.type == "cuda" \
            else "torch SDPA"
    else:
        attention = "diffusers' attention processor (SDPA)"
    where = {"none": "plain autograd", "full": "each block recomputed in backward",
             "diffusers": "diffusers' gradient checkpointing",
             "lean": "fused blocks, matmul and attention outputs kept", "budget": "lean / full mixed to a budget"}
    mix = ""
    if policy == "budget" and isinstance(plan, dict) and plan.get("counts"):
        mix = " [" + ", ".join(f"{v} {k}" for k, v in sorted(plan["counts"].items())) + " blocks]"
    return f"block policy: {policy} ({where[policy]}){mix}; fused kernels: {kernels}; attention: {attention}"


def trainable_parameters(transformer) -> dict[str, torch.nn.Parameter]:
    params = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("no trainable parameters (check lora.targets)")
    return params
