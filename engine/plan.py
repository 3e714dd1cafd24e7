"""Memory planner: what one training iteration of a config needs on the GPU, sized on a CPU.

``python -m engine plan --config X [key=value ...] [--budget-gib G]`` builds the configured
transformer, VAE and reward at full size under ``FakeTensorMode`` (no weights read, no RAM, no
GPU; design.md "Measuring without a GPU"), applies the run's features through ``engine.build`` in
its documented order (decoder checkpointing, LoRA, block policy), and measures one iteration with
``engine.memory``:

- resident: transformer base, LoRA, VAE, reward, text encoders (none with ``embed_cache_dir``:
  the cache lives on disk and the CPU), by dtype; AdamW states (exp_avg + exp_avg_sq, in the
  parameter dtype), the fp32 EMA; the iteration's inputs (noise, prompt embeddings)
- transient, from one whole iteration (``method.loss`` + ``backward()``) under a PeakLiveBytes
  that marks its phases: each no-grad rollout forward's peak, each graph-keeping pass's bytes held
  after its forward under ``model.policy``, the VAE decode + reward forward and backward under
  ``model.checkpoint_reward`` / ``model.reward_ckpt``, each pass's backward

The predicted peak is the resident bytes + max(the whole iteration's peak, the optimizer step's
gradients and temporaries): what bench/bench_step.py reports as ``whole_iteration_peak``. The terms
also recombine without the whole iteration (:func:`compose`); the ``--budget-gib`` search ranks
every setting that way, from per-block and per-decoder measurements (:func:`candidates`), and
``--verify`` measures the chosen setting's whole iteration too.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

from engine.config import TrainConfig
from engine.memory import PeakLiveBytes
from engine.params import FP8_BASE_MODES

GiB = 2 ** 30

# FLUX.1-dev's published configs (black-forest-labs/FLUX.1-dev: transformer/, vae/, text_encoder/
# (CLIP ViT-L/14 text), text_encoder_2/ (T5 v1.1 XXL encoder)), so a laptop with no weights plans
# the real model; keep in step with bench/measure.py and bench/bench_step.py.
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
    pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56],
)
FLUX_DEV_VAE = dict(
    in_channels=3, out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, act_fn="silu",
    latent_channels=16, norm_num_groups=32, sample_size=1024,
    scaling_factor=0.3611, shift_factor=0.1159, latents_mean=None, latents_std=None,
    force_upcast=True, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
)
FLUX_DEV_CLIP_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
)
FLUX_DEV_T5 = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
    use_cache=False, tie_word_embeddings=False,
)
MODEL_CONFIGS = {"flux-dev": {"transformer": FLUX_DEV_TRANSFORMER, "vae": FLUX_DEV_VAE,
                              "text_encoder": FLUX_DEV_CLIP_TEXT, "text_encoder_2": FLUX_DEV_T5,
                              "text_tokens": 512}}
# model.source values that mean "this published config, no folder"
CONFIG_SOURCES = {f"{name}-config": name for name in MODEL_CONFIGS}


class PlanError(ValueError):
    """A user-facing planning failure (nothing fits the budget, a source that cannot be sized)."""


# ---------------------------------------------------------------------- fake building
def fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    # a fake module cannot be cast afterwards (.to(dtype) fails on FakeTensors), so weights are
    # created in the run's dtype
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def fake_safe_to():
    """peft moves its new LoRA layers with Module.to(device, dtype); on a fake module that fails
    (swap_tensors on FakeTensors) even when nothing changes. Make such no-op moves no-ops."""
    orig = torch.nn.Module.to

    def to(self, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        ts = list(self.parameters()) + list(self.buffers())
        if all((device is None or t.device.type == torch.device(device).type)
               and (dtype is None or not t.is_floating_point() or t.dtype == dtype) for t in ts):
            return self
        return orig(self, *args, **kwargs)

    return mock.patch.object(torch.nn.Module, "to", to)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (fake or real)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        st = t.untyped_storage()
        if id(st) in seen:     # fake storages have no data pointer; the object identifies them
            continue
        seen.add(id(st))
        total += st.nbytes()
    return total


def _by_dtype(tensors) -> dict[str, int]:
    out: dict[str, int] = {}
    seen = set()
    for t in tensors:
        st = t.untyped_storage()
        if id(st) in seen:
            continue
        seen.add(id(st))
        k = str(t.dtype).replace("torch.", "")
        out[k] = out.get(k, 0) + st.nbytes()
    return out


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing config file: {path}")
    return json.loads(path.read_text())


def model_configs(cfg: TrainConfig, model_config: str | None = None) -> dict:
    """The architecture configs of the run's model, read without its weights: a published config
    (``--model-config`` or ``model.source=<name>-config``), the tiny model's, or a diffusers
    folder's own config.json files."""
    src = cfg.model.source
    name = model_config or CONFIG_SOURCES.get(src)
    if name is not None:
        if name not in MODEL_CONFIGS:
            raise PlanError(f"unknown model config {name!r}; choose one of {sorted(MODEL_CONFIGS)}")
        return {"what": f"{name} (published config, no weights)", **MODEL_CONFIGS[name]}
    if src == "tiny":
        from engine.flux.tiny import tiny_transformer_config, tiny_vae_config

        return {"what": "tiny (engine.flux.tiny)", "transformer": tiny_transformer_config(), "vae": tiny_vae_config(),
                "text": "tiny"}
    if src == "world":
        from engine.world.model import WEIGHTS_DIR

        folder, text = Path(WEIGHTS_DIR), "world"
    else:
        folder, text = Path(src), "folder"
    if not folder.is_dir():
        raise FileNotFoundError(f"missing model folder: {folder} (plan a published architecture with "
                                f"--model-config {' | '.join(MODEL_CONFIGS)})")
    out = {"what": f"{folder} (its config.json files, weights not read)", "text": text,
           "transformer": _read_json(folder / "transformer" / "config.json"),
           "vae": _read_json(folder / "vae" / "config.json")}
    if text == "folder" and not cfg.embed_cache_dir:
        out["text_encoder"] = _read_json(folder / "text_encoder" / "config.json")
        out["text_encoder_2"] = _read_json(folder / "text_encoder_2" / "config.json")
    if text == "folder":
        out["text_tokens"] = 512     # PipelineTextEncoder's max_sequence_length
    return out


def _hf_config(cls, d: dict):
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    return cls(**d)


def build_text_encoders(mc: dict, cfg: TrainConfig, dtype: torch.dtype):
    """(modules that stay on the GPU in training, prompt tokens per sample). With
    ``embed_cache_dir`` the encoders run once, before training, and are released: none stay."""
    if cfg.embed_cache_dir and mc.get("text") not in ("tiny", "world"):
        return {}, mc["text_tokens"]
    if mc.get("text") == "tiny":
        from engine.flux.tiny import HashTextEncoder

        tc = mc["transformer"]
        enc = HashTextEncoder(tc["joint_attention_dim"], tc["pooled_projection_dim"], seed=cfg.model.seed)
        return {"hash text encoder": enc}, enc.max_length
    if mc.get("text") == "world":
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        from engine.world.text import MiniLMTextEncoder

        with unset_fake_temporarily():   # small, and its weights are read by transformers: built for real
            enc = MiniLMTextEncoder()
        mods = {"MiniLM": m for m in [getattr(enc, "model", None)] if isinstance(m, torch.nn.Module)}
        return mods, enc.max_length
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with default_dtype(dtype):
        clip = CLIPTextModel(_hf_config(CLIPTextConfig, mc["text_encoder"]))
        t5 = T5EncoderModel(_hf_config(T5Config, mc["text_encoder_2"]))
    return {"CLIP text encoder": clip, "T5 encoder": t5}, mc["text_tokens"]


# ---------------------------------------------------------------------- rewards on fake tensors
def _hps_arch(params) -> torch.nn.Module:
    """HPSv2.1's OpenCLIP ViT-H/14 from its architecture config, weights not read; the rest as
    engine.rewards.hps.HPSv21Reward builds it (fp32 weights, the same preprocessing)."""
    from engine.rewards.hps import OpenCLIPModel, resolve_arch
    from engine.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocess

    from engine.rewards.base import ImageReward

    arch = resolve_arch(params.arch)

    class ArchOnlyHPS(ImageReward):
        def __init__(self):
            super().__init__()
            with default_dtype(getattr(torch, params.dtype)):   # as HPSv21Reward casts it (fp32 as released)
                self.model = OpenCLIPModel(arch)
            self.model.set_grad_checkpointing(params.grad_checkpointing)
            v = arch["vision_cfg"]
            self.preprocess = ImagePreprocess(
                size=int(v["image_size"]), mean=tuple(v.get("image_mean") or OPENAI_CLIP_MEAN),
                std=tuple(v.get("image_std") or OPENAI_CLIP_STD), mode=params.resize, antialias=params.antialias,
                crop_offset="round", clamp=False)

        def score(self, images, prompts):
            pixels = self.preprocess(images).to(self.model.text_projection.dtype)
            f = self.model.encode_image(pixels)
            # token values change no byte count, and the BPE vocabulary is a file not read here
            tokens = torch.zeros(len(prompts), self.model.context_length, dtype=torch.long, device=images.device)
            with torch.no_grad():
                t = self.model.encode_text(tokens)
            return (f * t).sum(-1).float()

    return ArchOnlyHPS()


CLIP_VIT_H_14 = dict(   # laion/CLIP-ViT-H-14-laion2B-s32B-b79K (PickScore_v1's backbone)
    projection_dim=1024,
    text_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                     max_position_embeddings=77, vocab_size=49408, hidden_act="gelu"),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
                       image_size=224, patch_size=14, hidden_act="gelu"),
)


def _hf_clip_arch(name: str, params) -> tuple[torch.nn.Module, str]:
    """PickScore / CLIP: transformers' CLIPModel from the folder's config.json (PickScore without
    one: CLIP ViT-H/14), weights not read; image features as HFCLIPReward computes them, after a
    shortest-edge resize + 224 crop."""
    import torch.nn.functional as F
    from transformers import CLIPConfig, CLIPModel

    from engine.rewards.base import ImageReward
    from engine.rewards.preprocess import ImagePreprocess

    p = Path(params.path) / "config.json" if getattr(params, "path", "") else None
    if p is not None and p.is_file():
        conf, what = _hf_config(CLIPConfig, json.loads(p.read_text())), f"CLIPModel from {p}"
    elif name == "pickscore":
        conf, what = CLIPConfig(**CLIP_VIT_H_14), "CLIPModel with CLIP ViT-H/14's config (PickScore_v1's)"
    else:
        raise PlanError(f"reward {name!r}: no config.json at reward.params.path to size the model from")

    class ArchOnlyCLIP(ImageReward):
        def __init__(self):
            super().__init__()
            with default_dtype(torch.float32):       # from_pretrained's default dtype
                self.model = CLIPModel(conf)
            size = conf.vision_config.image_size
            self.preprocess = ImagePreprocess(size=size, mode="shortest_crop", resize_to=size)

        def score(self, images, prompts):
            pixels = self.preprocess(images).to(self.model.visual_projection.weight.dtype)
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            f = F.normalize(self.model.visual_projection(pooled), dim=-1)
            ids = torch.zeros(len(prompts), 77, dtype=torch.long, device=images.device)
            with torch.no_grad():
                t = F.normalize(self.model.text_projection(self.model.text_model(input_ids=ids).pooler_output), dim=-1)
            return (f * t).sum(-1).float()

    return ArchOnlyCLIP(), what


def build_reward_fake(cfg: TrainConfig) -> tuple[torch.nn.Module, str]:
    """(the training reward at full size, weights not read where they are large; a note). Called
    under the fake mode."""
    name, typed = cfg.reward.name, cfg.reward.typed()
    if name in ("colour", "world"):
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        from engine.rewards import build_reward

        with unset_fake_temporarily():   # small: built for real, as in training (its weights are read)
            return build_reward(name, **cfg.reward.params), f"{name} (built as in training)"
    if name == "hpsv21":
        return _hps_arch(typed), f"HPSv2.1: OpenCLIP ViT-H/14 from its architecture config, {typed.dtype} weights"
    if name in ("pickscore", "clip"):
        mod, what = _hf_clip_arch(name, typed)
        return mod, f"{name}: {what}, fp32 (as loaded)"
    return _UncountedReward(), (f"{name} is NOT built without its weights: its weights and activations are "
                                "missing from this plan (the decode and its backward are in it)")


class _UncountedReward(torch.nn.Module):
    """Stands in for a reward the planner cannot build: the image mean, so the VAE decode and its
    backward are still measured; the reward's own bytes are missing, and the output says so."""

    def forward(self, images, prompts):
        return images.float().mean((1, 2, 3))


# ---------------------------------------------------------------------- measuring
def _real_schedule_checks():
    """The methods check their (real, CPU) sigma schedule with .item(); under the fake mode any op
    on it would turn fake and .item() fails, so the checks run with the mode unset."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    import engine.leap
    import engine.methods

    orig = engine.leap.check_sigmas

    def check_sigmas(sigmas):
        with unset_fake_temporarily():
            return orig(sigmas)

    st = contextlib.ExitStack()
    for mod in (engine.leap, engine.methods):
        st.enter_context(mock.patch.object(mod, "check_sigmas", check_sigmas))
    return st


def attention_flops(batch: int, tokens: int, width: int, blocks: int) -> int:
    """Attention matmul FLOPs of one forward that FlopCounterMode misses on a CPU (it does not
    count ``_scaled_dot_product_flash_attention_for_cpu``): QK^T and PV, 4 N^2 D per block."""
    return 4 * batch * tokens * tokens * width * blocks


def _flops():
    # never around a memory measurement: its module tracker keeps tensors alive in backward
    # (a lean pass's backward peak grew by half)
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False)


class PhasePeaks(PeakLiveBytes):
    """PeakLiveBytes that also records named phases: (name, live at start, peak, live at end)."""

    def __init__(self):
        super().__init__()
        self.phases: list[tuple[str, int, int, int]] = []
        self._cur = None

    def mark(self, name: str | None) -> None:
        """End the current phase and start ``name`` (None: none)."""
        if self._cur is not None:
            n, start, peak = self._cur
            self.phases.append((n, start, peak, self.live))
        self._cur = [name, self.live, self.live] if name else None

    def _account(self, shape: tuple, n: int) -> None:
        super()._account(shape, n)
        if self._cur is not None and self.live > self._cur[2]:
            self._cur[2] = self.live

    def get(self, prefix: str) -> list[tuple[str, int, int, int]]:
        return [p for p in self.phases if p[0].startswith(prefix)]


class Planner:
    """The run's model built once on fake tensors; terms measured per setting (block policy,
    decoder checkpointing) on that same model, switched with ``engine.build``'s apply functions,
    which replace a previous setting."""

    def __init__(self, cfg: TrainConfig, model_config: str | None = None, device: str | None = None,
                 log=lambda s: None, short_schedule: bool = True, world_size: int = 1):
        from engine import build
        from engine.methods import method_from_config
        from engine.schedule import flux_sigmas

        self.t0 = time.perf_counter()
        self.cfg, self.log, self.notes, self.model_config = cfg, log, [], model_config
        if world_size < 1:
            raise PlanError(f"--world-size must be >= 1, got {world_size}")
        if world_size > 1 and cfg.distributed != "fsdp":
            raise PlanError(f"--world-size {world_size} plans FSDP2 sharding: set distributed=fsdp "
                            f"(with {cfg.distributed!r} every GPU holds what one GPU does)")
        self.world = world_size
        m = cfg.model
        self.target = device or (cfg.device if cfg.device != "auto" else "cuda")
        self.dtype = build.DTYPES[m.dtype]
        self.mc = model_configs(cfg, model_config)
        self.mode = fake_mode()
        with self._ctx(autocast=False):
            from diffusers import AutoencoderKL, FluxTransformer2DModel

            from engine.flux.adapter import FluxAdapter

            with default_dtype(self.dtype):
                transformer = FluxTransformer2DModel.from_config(self.mc["transformer"])
                vae = AutoencoderKL.from_config(self.mc["vae"])
            self.adapter = FluxAdapter(transformer, vae, guidance_scale=m.guidance_scale)
            build.check_image_size(self.adapter, m.height, m.width)
            self.text_modules, self.text_tokens = build_text_encoders(self.mc, cfg, self.dtype)
            self.reward, self.reward_note = build_reward_fake(cfg)
            self.reward.requires_grad_(False).eval()
            if isinstance(self.reward, _UncountedReward):
                self.notes.append(self.reward_note)
            with default_dtype(self.dtype):   # peft casts new LoRA layers to the base dtype: create them in it
                build.apply_lora(transformer, cfg.lora, cfg.seed)
            # the fp8 base in engine.build's order; fp8 compute in the rollout changes no stored
            # byte, so it is planned as fp8 storage (the capability check belongs to the run)
            fp8 = FP8_BASE_MODES[m.base_precision]
            build.apply_fp8_base(transformer, "weight" if fp8 == "rollout" else fp8)
            # block swap, in engine.build's order: its host tensors are not on the device; its
            # copies are allocations, seen by every measurement below
            self.swap = build.apply_block_swap(transformer, m.swap_blocks, torch.device("cpu"))
            transformer.train()
            self.trainable = build.trainable_parameters(transformer)
            B = cfg.batch_size
            tc = transformer.config
            self.x1 = self.adapter.noise(B, m.height, m.width)
            pe = torch.randn(B, self.text_tokens, tc.joint_attention_dim)
            pooled = torch.randn(B, tc.pooled_projection_dim)
            self.cond = self.adapter.condition(pe, pooled, m.height, m.width)
            h, w = self.adapter.latent_size(m.height, m.width)
            self.block_inputs_hw = (h // 2, w // 2)
        self.method = method_from_config(cfg.method)
        self.tokens = self.adapter.image_seq_len(m.height, m.width) + self.text_tokens
        self.sigmas = flux_sigmas(cfg.num_steps, self.adapter.image_seq_len(m.height, m.width))
        self.short = short_schedule and cfg.method.name == "leapalign"
        self.log(f"built {self.mc['what']} on fake tensors in {time.perf_counter() - self.t0:.1f}s")
        self._setting = None
        self._cache: dict = {}

    # ------------------------------------------------------------------ context
    @contextlib.contextmanager
    def _ctx(self, autocast: bool = True):
        with contextlib.ExitStack() as st:
            st.enter_context(self.mode)
            st.enter_context(fake_safe_to())
            if self.target == "cuda":
                # the run's fused ops on a GPU are the Triton / CUDA ones, whose fake impls save what
                # the real kernels save; the torch reference ops (what a CPU runs) save other things
                from kernels import backend as kb

                if not os.environ.get(kb.ENV_VAR):
                    st.enter_context(mock.patch.dict(os.environ, {kb.ENV_VAR: "triton"}))
                if autocast:
                    # the trainer's CUDA bf16 autocast (generate.autocast), emulated on the CPU:
                    # matmul / conv outputs of fp32 modules (the reward) in bf16
                    st.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
            yield

    # ------------------------------------------------------------------ resident
    def resident(self) -> dict:
        """{term: {dtype: bytes}} of what stays on the device across iterations."""
        tr, ad, cfg = self.adapter.transformer, self.adapter, self.cfg
        lora_ids = {id(p) for n, p in tr.named_parameters() if "lora_" in n}
        host = self.swap.host_tensor_ids() if self.swap else set()
        base = [t for t in [*tr.parameters(), *tr.buffers()] if id(t) not in lora_ids | host]
        r = {"transformer base weights": _by_dtype(base)}
        if cfg.lora.enabled:
            r["LoRA weights"] = _by_dtype(self.trainable.values())
        r["VAE weights"] = _by_dtype([*ad.vae.parameters(), *ad.vae.buffers()])
        r["reward weights"] = _by_dtype([*self.reward.parameters(), *self.reward.buffers()])
        if cfg.embed_cache_dir:
            r["text encoders (embed_cache_dir: cached on disk / CPU)"] = {}
        else:
            for name, mod in self.text_modules.items():
                r[f"text encoder: {name}"] = _by_dtype([*mod.parameters(), *mod.buffers()])
        tb = _by_dtype(self.trainable.values())
        r["AdamW states (exp_avg + exp_avg_sq)"] = {k: 2 * v for k, v in tb.items()}
        if self.target == "cpu":   # AdamW's step counters live on the CPU unless capturable
            r["AdamW states (exp_avg + exp_avg_sq)"]["float32"] = \
                r["AdamW states (exp_avg + exp_avg_sq)"].get("float32", 0) + 4 * len(self.trainable)
        r["EMA (fp32)"] = {"float32": 4 * sum(p.numel() for p in self.trainable.values())}
        if self.world > 1:
            # FSDP2 (engine/distributed.py): every block and the root sharded over the ranks, and
            # with them the optimizer state and EMA, which follow the parameters' shards
            W = self.world
            for name in ("transformer base weights", "LoRA weights", "AdamW states (exp_avg + exp_avg_sq)",
                         "EMA (fp32)"):
                if name in r:
                    r[f"{name}, 1/{W} shard"] = {k: -(-v // W) for k, v in r.pop(name).items()}
        c = self.cond
        r["iteration inputs (noise, prompt embeddings, ids)"] = _by_dtype(
            [self.x1, c.prompt_embeds, c.pooled, c.txt_ids, c.img_ids] + ([c.guidance] if c.guidance is not None else []))
        return r

    def trainable_bytes(self) -> int:
        return storage_bytes(self.trainable.values())

    # ------------------------------------------------------------------ settings
    def apply(self, policy: str, budget_gib: float, checkpoint_reward: bool, reward_ckpt: str) -> dict:
        """Switch the fake model to a setting (engine.build's own functions)."""
        from engine import build

        key = (policy, budget_gib, checkpoint_reward, reward_ckpt)
        if self._setting == key:
            return self._plan
        m = dataclasses.replace(self.cfg.model, policy=policy, budget_gib=budget_gib,
                                checkpoint_reward=checkpoint_reward, reward_ckpt=reward_ckpt)
        with self._ctx(autocast=False):
            build.apply_decoder_checkpointing(self.adapter, m)
            self._plan = build.apply_policy(self.adapter.transformer, m, self.cfg.batch_size, self.text_tokens,
                                            self.adapter)
        self._setting = key
        return self._plan

    def _clear_grads(self):
        for p in self.trainable.values():
            p.grad = None

    # ------------------------------------------------------------------ terms
    def iteration(self, policy: str, budget_gib: float, checkpoint_reward: bool, reward_ckpt: str) -> dict:
        """PeakLiveBytes across the method's loss + backward on fake tensors, with every phase's
        bytes: each no-grad forward's transient, each graph-keeping pass's held bytes and forward
        peak, the decode + reward forward and backward, each pass's backward.

        LeapAlign's peak depends neither on T nor on which (k, j) is drawn
        (bench/results/step_cpu_*.md: T=10 and T=25 peak alike), only on its phases: pass k,
        no-grad steps, pass j, no-grad steps, decode + reward, backward. So it runs T=3 with
        (k, j) = (0, 1), which has all of them, in a third of the time; the other methods run the
        configured T and their own draw."""
        from engine.schedule import flux_sigmas

        key = ("iteration", policy, budget_gib, checkpoint_reward, reward_ckpt if checkpoint_reward else None)
        if key in self._cache:
            return self._cache[key]
        m = self.cfg.model
        plan = self.apply(policy, budget_gib, checkpoint_reward, reward_ckpt)
        prompts = ["a red square"] * self.cfg.batch_size
        H, W = m.height, m.width
        ad, cond, reward = self.adapter, self.cond, self.reward
        mm = PhasePeaks()
        calls = []

        def velocity(x, s):
            grad = torch.is_grad_enabled()
            i = len(calls)
            calls.append(grad)
            mm.mark(f"pass{i}" if grad else f"nograd{i}")
            v = ad.velocity(x, s, cond)
            mm.mark(None)
            if grad and v.requires_grad:   # fires when v's gradient is ready: this pass's backward starts
                v.register_hook(lambda g, i=i: (mm.mark(f"backward{i}"), g)[1])
            return v

        def rf(x0):
            mm.mark("decode")
            if x0.requires_grad:           # fires when the decode + reward backward is done
                x0.register_hook(lambda g: (mm.mark("leaps backward"), g)[1])
            r = reward(ad.decode(x0, H, W), prompts)
            mm.mark(None)
            return r

        t = time.perf_counter()
        if self.swap:
            self.swap.reset()
            moved0 = self.swap.bytes_moved
        with self._ctx():
            if self.short:
                T, choices = 3, {"k": 0, "j": 1}
                sig = flux_sigmas(T, ad.image_seq_len(H, W))
            else:
                T, sig = self.cfg.num_steps, self.sigmas
                from torch._subclasses.fake_tensor import unset_fake_temporarily

                with unset_fake_temporarily():
                    choices = self.method.draw(T, torch.Generator().manual_seed(0), torch.zeros(self.x1.shape))
            # FSDP2 reduce-scatters each block's gradients in backward and frees the unsharded
            # ones: measured with every gradient dropped as it lands, the shards added in run_plan
            drops = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
                     for p in self.trainable.values()] if self.world > 1 else []
            with mm, _real_schedule_checks():
                out = self.method.loss(velocity, rf, self.x1, sig, **choices)
                after_fwd = mm.live
                mm.mark("decode backward")
                out.loss.backward()
                mm.mark(None)
                del out
                after_bwd = mm.live
            for h in drops:
                h.remove()
            self._clear_grads()
        nograd = [pk - st for _, st, pk, _ in mm.get("nograd")]
        passes = [{"held": end - st, "fwd_peak": pk - st} for _, st, pk, end in mm.get("pass")]
        bwd = [pk - st for _, st, pk, _ in mm.get("backward")]
        dec = mm.get("decode")
        dec_start = dec[0][1] if dec else 0
        decode = max((pk for _, _, pk, _ in dec), default=0) - dec_start
        r = {"peak": mm.peak, "held_after_loss_forward": after_fwd, "held_after_backward": after_bwd, "T": T,
             "choices": {k: v for k, v in choices.items() if isinstance(v, (int, list))},
             "rollout_peak": max(nograd, default=0), "passes": passes, "backward_extra": max(bwd, default=0),
             "decode_peak": decode, "decode_held": (dec[0][3] - dec_start) if dec else 0,
             "counts": plan.get("counts", {}), "seconds": time.perf_counter() - t}
        if self.swap:
            # a forward pass copies every swapped block once: the short schedule's missing
            # no-grad steps added at that rate
            r["swap_bytes"] = self.swap.bytes_moved - moved0 + (self.cfg.num_steps - T) * self.swap.swapped_bytes()
            self.swap.reset()
        self._cache[key] = r
        return r

    def decode_terms(self, checkpoint_reward: bool, reward_ckpt: str, flops: bool = False) -> dict:
        """VAE decode + reward forward + backward into the latent, alone: its peak (and FLOPs, in
        a second run: the counter must not be around a memory measurement)."""
        key = ("decode", checkpoint_reward, reward_ckpt if checkpoint_reward else None, flops)
        if key not in self._cache:
            m = self.cfg.model
            cur = self._setting or (m.policy, m.budget_gib)
            self.apply(cur[0], cur[1], checkpoint_reward, reward_ckpt)
            prompts = ["a red square"] * self.cfg.batch_size

            def run():
                lat = torch.randn_like(self.x1).requires_grad_(True)
                self.reward(self.adapter.decode(lat, m.height, m.width), prompts).sum().backward()

            r = {}
            if self.swap:
                self.swap.reset()
            with self._ctx():
                with PeakLiveBytes() as mm:
                    run()
                r["peak"] = mm.peak
                if flops:
                    with _flops() as fc:
                        run()
                    r["flops"] = fc.get_total_flops()
            self._cache[key] = r
        return self._cache[key]

    def block_terms(self) -> dict:
        """Per block kind (the first double and single block, the run's shapes) and per policy:
        bytes held after its forward (``lean.measure_saved_bytes``, what policy=budget plans with),
        its backward's extra peak, and its forward FLOPs (what recomputing it costs)."""
        if "blocks" not in self._cache:
            from engine.flux import lean

            tr = self.adapter.transformer
            tc = tr.config
            attn = attention_flops(self.cfg.batch_size, self.tokens, tc.num_attention_heads * tc.attention_head_dim, 1)
            out = {"kinds": [], "held": {}, "bwd_extra": {}, "flops": {}}
            with self._ctx(autocast=False):
                inputs = lean.block_inputs(tr, self.cfg.batch_size, self.text_tokens, self.block_inputs_hw)
                out["per_block_bytes"] = lean.measure_policy_bytes(tr, inputs)
            with self._ctx():
                for kind, blocks in zip(("double", "single"), lean._blocks(tr)):
                    out["kinds"] += [kind] * len(blocks)
                    if not blocks:
                        continue
                    block, before = blocks[0], lean.policy_of(blocks[0])
                    out["held"][kind], out["bwd_extra"][kind] = {}, {}
                    try:
                        for pol in ("none", "lean", "full"):
                            lean._set_policy(block, pol)
                            with PeakLiveBytes() as mm:
                                o = block(**inputs)
                                held = mm.live
                                outs = [t for t in torch.utils._pytree.tree_leaves(o) if torch.is_tensor(t) and t.requires_grad]
                                torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])
                                del o, outs
                            self._clear_grads()
                            out["held"][kind][pol] = held
                            out["bwd_extra"][kind][pol] = mm.peak - held
                    finally:
                        lean._set_policy(block, before)
                    with torch.no_grad(), _flops() as fc:
                        block(**inputs)
                    out["flops"][kind] = fc.get_total_flops() + attn
            self._cache["blocks"] = out
        return self._cache["blocks"]

    def forward_flops(self) -> int:
        """One forward: the blocks' FLOPs (counted on one block of each kind, attention by hand);
        the embedders and the output projection add well under 1 %."""
        b = self.block_terms()
        return sum(b["flops"][k] for k in b["kinds"])


# ---------------------------------------------------------------------- combining the terms
def graph_passes(cfg: TrainConfig) -> int:
    """How many graph-keeping passes of one iteration are alive together."""
    name = cfg.method.name
    if name == "leapalign":
        return 2
    if name in ("refl", "draft-lv"):
        return 1     # DRaFT-LV's re-noised copies are scored and backpropagated one at a time
    if name == "drtune":
        return cfg.method.drtune.K
    raise PlanError(f"method {name!r} keeps a graph per step (full backprop): its whole iteration is measured, "
                    "but the terms do not combine and --budget-gib does not search it")


def compose(n: int, held: int, fwd_peak: int, rollout: int, decode: int, backward_extra: int) -> int:
    """Activation peak from the terms, n graph-keeping passes alive together: the last pass's
    forward while n-1 graphs are held, or, with all n held, a no-grad rollout step, the decode +
    reward forward / backward, or a pass's backward, whichever is largest."""
    return max((n - 1) * held + fwd_peak, n * held + max(rollout, decode, backward_extra))


def fsdp_terms(planner: "Planner") -> dict:
    """Per-GPU bytes of FSDP2 beyond the shards (world > 1): the gradient shards, and at the
    busiest moment of backward one block's all-gathered parameters, the next block's prefetched
    ones and one block's unsharded gradients before their reduce-scatter; in forward the root's
    own parameters (embedders, output layer) are gathered too."""
    from engine import swap

    if planner.world <= 1:
        return {}
    tr = planner.adapter.transformer
    blocks = swap.blocks_in_order(tr)
    size = [storage_bytes([*b.parameters(), *b.buffers()]) for b in blocks]
    in_blocks = {id(t) for b in blocks for t in [*b.parameters(), *b.buffers()]}
    root = storage_bytes([t for t in [*tr.parameters(), *tr.buffers()] if id(t) not in in_blocks])
    big = sorted(size)[-2:]
    return {"gradient shards": -(-planner.trainable_bytes() // planner.world),
            "gathered: a block + the prefetched next + one block's unsharded gradients": sum(big) + big[-1],
            "gathered: the root's parameters": root}


def fp8_dequant_bytes(planner: "Planner", policy: str, fp8_mode: str) -> int:
    """Memory traffic of the fp8 base's dequantization in one iteration (kernels/fp8_linear.py
    dequantizes, then multiplies in bf16; its backward dequantizes again, saving only the fp8
    codes): 1 byte read + 2 written per weight, in every forward (T), every graph-keeping pass's
    backward and, with a recomputing policy, its recomputation; fp8 compute in the rollout
    (``rollout``) dequantizes nothing in the no-grad steps. Lean is counted as recomputing (an
    upper bound)."""
    from kernels.fp8_linear import Fp8Linear

    if fp8_mode == "none":
        return 0
    n_weights = sum(mod.weight.numel() for mod in planner.adapter.transformer.modules() if isinstance(mod, Fp8Linear))
    T = planner.cfg.num_steps
    try:
        n = graph_passes(planner.cfg)
    except PlanError:
        n = T
    passes = T + n + (n if policy != "none" else 0) - ((T - n) if fp8_mode == "rollout" else 0)
    return 3 * n_weights * passes


def step_phase(planner: "Planner") -> int:
    """Bytes beyond the resident ones during clip + AdamW + EMA: the gradients, AdamW's
    sqrt(exp_avg_sq) (foreach over all trainable tensors on a GPU, one tensor at a time on a CPU)
    and the EMA's fp32 copy of one tensor; under FSDP2 of their shards."""
    tb = -(-planner.trainable_bytes() // planner.world)
    largest = max(p.numel() * p.element_size() for p in planner.trainable.values()) // planner.world
    largest32 = max(p.numel() * 4 for p in planner.trainable.values()) // planner.world
    return tb + (tb if planner.target == "cuda" else largest) + largest32


@dataclass
class Candidate:
    overrides: dict
    policy: str
    budget_gib: float
    checkpoint_reward: bool
    reward_ckpt: str
    peak: int            # predicted, resident included
    flops: int           # one iteration, by the cost model (:func:`candidates`)
    order: int           # tie-break: less recompute first
    verified: int | None = None
    source: int = 0      # which lever setting's Planner (search)
    swap_blocks: int = 0
    swap_bytes: int = 0  # host -> device copies per iteration (block swap)


POLICY_ORDER = ("none", "lean", "budget", "full", "diffusers")
DECODER_SETTINGS = ((False, "auto"), (True, "auto"), (True, "resnet"), (True, "block"), (True, "diffusers"))


def _gib_up(b: int) -> float:
    return math.ceil(b / GiB * 1000) / 1000


def _block_plan(policy: str, kinds: list[str], per: dict, budget_gib: float) -> list[str]:
    from engine.flux import lean

    if policy == "budget":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return lean.plan_budget(kinds, per, int(budget_gib * GiB))
    # diffusers' checkpointing keeps a block's inputs and recomputes it, as ``full`` does
    return ["full" if policy == "diffusers" else policy] * len(kinds)


# Block swap priced as if its copies did not overlap compute (the conservative end; a GPU
# measures the overlap, tests/test_swap.py): a byte over PCIe 4.0 x16 (~25 GB/s achieved) takes
# as long as ~16,000 bf16 FLOPs at ~400 TFLOP/s achieved.
FLOPS_PER_HOST_BYTE = 16_000


def swap_options(p: "Planner") -> list[tuple[int, int, int]]:
    """(N, host bytes, bytes in flight) for swapping the last N blocks of the planned model: what
    leaves the device, and what comes back at most at once: the block in use and the next, and in
    a checkpointed backward also the block whose backward has not yet released its copy."""
    from engine import swap

    if p.swap is not None or not p.cfg.lora.enabled:
        return []
    sizes = [swap.block_bytes(b) for b in swap.blocks_in_order(p.adapter.transformer)]
    out = []
    for n in range(1, len(sizes) + 1):
        tail = sizes[-n:]
        out.append((n, sum(tail), sum(sorted(tail)[-3:])))
    return out


def candidates(p: "Planner", resident: int, base: dict, budget: int | None = None) -> list[Candidate]:
    """Every (block policy or budget mix) x (decoder checkpointing) setting, its predicted peak
    and its cost. ``base`` is the configured setting's whole iteration; another block policy
    changes each block's held bytes and backward extra by what one block of that kind measures
    (:meth:`Planner.block_terms`); another decoder setting swaps in its own decode + reward peak.

    Cost model (FLOPs per iteration): T forwards + n backwards of the passes (1 forward's worth
    with the base frozen -- input gradients only --, 2 with all weights trainable) + the forward of
    every block a policy recomputes, in each of the n passes + the decode + reward forward and
    backward with its recomputation (FlopCounterMode). Lean recomputes only elementwise chains,
    which this counts as free; ties go to less recompute (none, lean, budget, full, diffusers).

    With ``budget``, a checkpointed setting that does not fit also comes with the fewest swapped
    blocks that make it fit (``swap_options``; a checkpointed block fetches its weights again in
    backward instead of keeping them), priced at ``FLOPS_PER_HOST_BYTE`` for every byte copied:
    each forward pass (T, plus the n passes' recomputation) copies every swapped block once."""
    cfg = p.cfg
    n = graph_passes(cfg)
    T = cfg.num_steps
    step = step_phase(p)
    b = p.block_terms()
    kinds, per = b["kinds"], b["per_block_bytes"]
    m = cfg.model
    cfg_plan = _block_plan(m.policy, kinds, per, m.budget_gib)

    def held(plan):
        return sum(per[k][x] for k, x in zip(kinds, plan))

    def bwd(plan):
        return max(b["bwd_extra"][k][x] for k, x in zip(kinds, plan))

    swaps = swap_options(p) if budget is not None else []
    H0 = max(x["held"] for x in base["passes"])
    F0 = max(x["fwd_peak"] for x in base["passes"])
    fwd = p.forward_flops()
    bwd_flops = fwd * (1 if cfg.lora.enabled else 2)
    settings = [(pol, 0.0) for pol in ("none", "lean", "full", "diffusers")]
    # budget mixes: every count of lean blocks plan_budget can produce, at the smallest budget giving it
    extra = [per[k]["lean"] - per[k]["full"] for k in kinds]
    acc = sum(per[k]["full"] for k in kinds)
    for i in sorted(range(len(kinds)), key=lambda i: (extra[i], i))[:-1]:
        acc += extra[i]
        settings.append(("budget", _gib_up(acc)))
    out = []
    for ck, rk in DECODER_SETTINGS:
        d = p.decode_terms(ck, rk, flops=True)
        for pol, gib_ in settings:
            plan = _block_plan(pol, kinds, per, gib_)
            dh = held(plan) - held(cfg_plan)
            act = compose(n, H0 + dh, F0 + dh, base["rollout_peak"], d["peak"],
                          base["backward_extra"] - bwd(cfg_plan) + bwd(plan))
            recompute = sum(b["flops"][k] for k, x in zip(kinds, plan) if x == "full")
            ov = {"model.policy": pol}
            if pol == "budget":
                ov["model.budget_gib"] = gib_
            ov["model.checkpoint_reward"] = ck
            if ck:
                ov["model.reward_ckpt"] = rk
            flops = T * fwd + n * (bwd_flops + recompute) + d["flops"]
            order = POLICY_ORDER.index(pol) * 10 + DECODER_SETTINGS.index((ck, rk))
            peak = resident + max(act, step)
            out.append(Candidate(ov, pol, gib_, ck, rk, peak, flops, order))
            if budget is None or peak <= budget or pol == "none":
                continue
            for nb, host, inflight in swaps:
                swapped_peak = resident - host + max(act + inflight, step)
                if swapped_peak <= budget:
                    moved = host * (T + n)
                    out.append(Candidate({**ov, "model.swap_blocks": nb}, pol, gib_, ck, rk, swapped_peak,
                                         flops + moved * FLOPS_PER_HOST_BYTE, order + 1000,
                                         swap_blocks=nb, swap_bytes=moved))
                    break
    return out


# More levers for the --budget-gib search: (config key, values, the preferred -- faster -- first),
# tried only where this config has the key (e.g. model.base_precision: the frozen base stored in
# fp8 halves its bytes for a dequantising matmul). Each other value is planned by a Planner rebuilt
# on the overridden config, so a lever is sized by what the build does with it; a build feature
# is applied in Planner.__init__ in engine.build's order, as apply_lora is. A value that changes no
# term is reported and not offered.
LEVERS: list[tuple[str, tuple]] = [("model.base_precision", ("bf16", "fp8"))]


def _has_key(cfg, key: str) -> bool:
    node = cfg
    for part in key.split("."):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            return False
        node = getattr(node, part)
    return True


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def lever_settings(cfg: TrainConfig, levers=None) -> list[dict]:
    """Every combination of the levers this config has, its own values first."""
    import itertools

    present = [(k, v) for k, v in (LEVERS if levers is None else levers) if _has_key(cfg, k)]
    own = {k: _get(cfg, k) for k, _ in present}
    combos = [dict(zip([k for k, _ in present], vals)) for vals in itertools.product(*[v for _, v in present])]
    return [own] + [c for c in combos if c != own]


def _override(cfg: TrainConfig, ov: dict) -> TrainConfig:
    from engine.config import apply_overrides, from_dict, to_dict

    return from_dict(apply_overrides(to_dict(cfg), [f"{k}={v}" for k, v in ov.items()]))


def _swappable(q: "Planner") -> int:
    return max((host - inflight for _, host, inflight in swap_options(q)), default=0)


def search(p: "Planner", budget_bytes: int, resident: int, base: dict, verify: bool = True, levers=None):
    """(the fastest setting whose predicted peak fits, or None; every candidate). With ``verify``
    the choice's whole iteration is measured too, and a choice that does not fit is dropped."""
    settings = lever_settings(p.cfg, levers)
    planners, residents, cands = [], [], []
    for i, ov in enumerate(settings):
        if i == 0:
            q, res_q, base_q = p, resident, base
        else:
            q = Planner(_override(p.cfg, ov), p.model_config, p.target, p.log)
            res_q = sum(sum(v.values()) for v in q.resident().values())
            if res_q - _swappable(q) > budget_bytes:
                continue
            m = q.cfg.model
            base_q = q.iteration(m.policy, m.budget_gib, m.checkpoint_reward, m.reward_ckpt)
            if res_q == resident and base_q["peak"] == base["peak"]:
                p.notes.append(f"{overrides_line(ov)} changes no term in this build: not offered")
                continue
        if res_q - _swappable(q) > budget_bytes:   # nothing can help: say so without measuring
            continue
        for c in candidates(q, res_q, base_q, budget_bytes):
            if i:
                c.overrides = {**ov, **c.overrides}
            c.order += 100 * i
            c.source = len(planners)
            cands.append(c)
        planners.append(q)
        residents.append(res_q)
    fits = sorted((c for c in cands if c.peak <= budget_bytes), key=lambda c: (c.flops, c.order, -c.budget_gib))
    for c in fits[:3]:
        if not verify:
            return c, cands
        q, res_q = planners[c.source], residents[c.source]
        if c.swap_blocks:    # the swap is part of the build: a planner built with it measures it
            q = Planner(_override(p.cfg, c.overrides), p.model_config, p.target, p.log)
            res_q = sum(sum(v.values()) for v in q.resident().values())
        it = q.iteration(c.policy, c.budget_gib, c.checkpoint_reward, c.reward_ckpt)
        c.verified = res_q + max(it["peak"], step_phase(q))
        if c.swap_blocks:
            c.swap_bytes = it["swap_bytes"]
        if c.verified <= budget_bytes:
            return c, cands
        p.log(f"{overrides_line(c.overrides)}: predicted {gib(c.peak)} but measured {gib(c.verified)}; next")
    return None, cands


# ---------------------------------------------------------------------- the report
def gib(b: int | None) -> str:
    if b is None:
        return "-"
    return f"{b / GiB:.2f} GiB" if b >= GiB / 10 else f"{b / 2**20:.2f} MiB"


def overrides_line(ov: dict) -> str:
    def val(v):
        return str(v).lower() if isinstance(v, bool) else str(v)

    return " ".join(f"{k}={val(v)}" for k, v in ov.items())


def run_plan(cfg: TrainConfig, model_config: str | None = None, budget_gib: float | None = None,
             device: str | None = None, log=lambda s: None, verify: bool = False, world_size: int = 1) -> dict:
    """Every term of one iteration of ``cfg`` and its predicted peak; with ``budget_gib`` the
    fastest setting that fits (``"choice"``, None when nothing does)."""
    p = Planner(cfg, model_config, device, log, world_size=world_size)
    if budget_gib is not None and p.world > 1:
        raise PlanError("--budget-gib searches one GPU's settings; with --world-size it is not searched")
    m = cfg.model
    res = p.resident()
    resident = sum(sum(v.values()) for v in res.values())
    it = p.iteration(m.policy, m.budget_gib, m.checkpoint_reward, m.reward_ckpt)
    log(f"whole iteration measured ({time.perf_counter() - p.t0:.1f}s)")
    step = step_phase(p)
    try:
        n = graph_passes(cfg)
        H = max(x["held"] for x in it["passes"])
        composed = compose(n, H, max(x["fwd_peak"] for x in it["passes"]), it["rollout_peak"], it["decode_peak"],
                           it["backward_extra"])
    except PlanError:
        n, composed = None, None
    out = {"model": p.mc["what"], "target": p.target, "res": (m.height, m.width), "batch": cfg.batch_size,
           "text_tokens": p.text_tokens, "image_tokens": p.adapter.image_seq_len(m.height, m.width),
           "reward": p.reward_note, "method": cfg.method.name, "T": cfg.num_steps, "graph_passes": n,
           "setting": {"model.policy": m.policy, "model.budget_gib": m.budget_gib,
                       "model.checkpoint_reward": m.checkpoint_reward, "model.reward_ckpt": m.reward_ckpt},
           "resident": res, "resident_total": resident, "trainable_bytes": p.trainable_bytes(),
           "trainable_params": sum(x.numel() for x in p.trainable.values()),
           "iteration": it, "step_phase": step, "composed": composed,
           "peak": resident + max(it["peak"], step), "notes": p.notes, "world_size": p.world}
    dq = fp8_dequant_bytes(p, m.policy, FP8_BASE_MODES[m.base_precision])
    if dq:
        out["fp8_dequant_bytes"] = dq
    fs = fsdp_terms(p)
    if fs:
        out["fsdp"] = fs
        out["peak"] = resident + max(it["peak"] + sum(fs.values()), step)
    if p.swap:
        out["swap"] = {"blocks": len(p.swap.leaves), "host_bytes": p.swap.swapped_bytes(),
                       "bytes_per_iteration": it["swap_bytes"]}
    if budget_gib is not None:
        out["forward_flops"] = p.forward_flops()
        choice, cands = search(p, int(budget_gib * GiB), resident, it, verify=verify)
        out["budget_gib"] = budget_gib
        out["choice"] = dataclasses.asdict(choice) if choice else None
        out["smallest"] = dataclasses.asdict(min(cands, key=lambda c: (c.peak, c.flops))) if cands else \
            {"overrides": {}, "peak": resident, "what": "the resident bytes alone (weights, optimizer state, EMA)"}
        out["candidates"] = len(cands)
        log(f"searched {len(cands)} settings ({time.perf_counter() - p.t0:.1f}s)")
    out["seconds"] = time.perf_counter() - p.t0
    return out


def _swap_traffic(b: int) -> str:
    return (f"{gib(b)} host -> device per iteration, {b / 25e9:.2f} s at 25 GB/s (PCIe 4.0 x16) where the "
            f"copies do not overlap compute")


def format_plan(r: dict) -> str:
    H, W = r["res"]
    it = r["iteration"]
    L = [f"plan: {r['model']}, {H}x{W}, batch {r['batch']} ({r['image_tokens']} image + {r['text_tokens']} text "
         f"tokens), method {r['method']} T={r['T']}, target {r['target']}",
         f"setting: {overrides_line(r['setting'])}",
         f"reward: {r['reward']}", "", "resident (on the device across iterations):"]
    for name, by in r["resident"].items():
        parts = ", ".join(f"{k} {gib(v)}" for k, v in sorted(by.items())) or "none"
        L.append(f"  {name:<54} {gib(sum(by.values())):>11}   ({parts})")
    L.append(f"  {'resident total':<54} {gib(r['resident_total']):>11}")
    if r.get("swap"):
        sw = r["swap"]
        what = f"block swap: {sw['blocks']} blocks in pinned host memory"
        L.append(f"  {what:<54} {gib(sw['host_bytes']):>11}   (not on the device; "
                 f"{_swap_traffic(sw['bytes_per_iteration'])})")
    counts = ", ".join(f"{v} {k}" for k, v in sorted(it["counts"].items()))
    L += ["", f"transient (activations and gradients on top; measured inside one whole iteration, T={it['T']} "
              f"{it['choices']}):",
          f"  {'rollout: one no-grad forward, peak':<54} {gib(it['rollout_peak']):>11}"]
    passes = it["passes"]
    for i, ps in enumerate(passes if len(passes) <= 3 else passes[:1]):
        L.append(f"  {f'graph-keeping pass {i + 1} ({counts}): held after forward':<54} {gib(ps['held']):>11}   "
                 f"(forward peak {gib(ps['fwd_peak'])})")
    if len(passes) > 3:    # full backprop: a pass per step, and their recomputation in backward
        L.append(f"  {f'  {len(passes)} grad-enabled forwards in all, largest held':<54} "
                 f"{gib(max(p['held'] for p in passes)):>11}   "
                 f"(forward peak {gib(max(p['fwd_peak'] for p in passes))}; recomputations in backward included)")
    L += [f"  {'VAE decode + reward forward + backward, peak':<54} {gib(it['decode_peak']):>11}   "
          f"(held after forward {gib(it['decode_held'])})",
          f"  {'a pass backward, extra peak (gradients included)':<54} {gib(it['backward_extra']):>11}",
          f"  {'LoRA / trainable gradients':<54} {gib(r['trainable_bytes']):>11}   "
          f"({r['trainable_params'] / 1e6:.1f} M parameters)",
          f"  {'optimizer step (gradients + AdamW / EMA temporaries)':<54} {gib(r['step_phase']):>11}",
          f"  {'whole iteration (method.loss + backward), peak':<54} {gib(it['peak']):>11}   "
          f"(held after the loss forward {gib(it['held_after_loss_forward'])})"]
    if r["composed"] is not None:
        L.append(f"  {'  the same from the terms above':<54} {gib(r['composed']):>11}")
    if r.get("fp8_dequant_bytes"):
        b = r["fp8_dequant_bytes"]
        L.append(f"  {'fp8 base: dequantization traffic per iteration':<54} {gib(b):>11}   "
                 f"({b / 4.8e12 * 1e3:.0f} ms at H200's 4.8 TB/s, {b / 3.35e12 * 1e3:.0f} ms at H100's 3.35 TB/s)")
    fs = r.get("fsdp") or {}
    if fs:
        L += ["", f"FSDP2 over {r['world_size']} GPUs, per GPU (the iteration above measured with each gradient "
                  f"dropped as it lands, as reduce-scatter frees it):"]
        L += [f"  {name:<54} {gib(b):>11}" for name, b in fs.items()]
    L += ["", f"predicted peak: {gib(r['peak'])} = resident {gib(r['resident_total'])} + "
              f"max(whole iteration {gib(it['peak'])}" + (f" + FSDP2 {gib(sum(fs.values()))}" if fs else "")
          + f", optimizer step {gib(r['step_phase'])})" + (" per GPU" if fs else ""),
          "  how: the whole iteration is PeakLiveBytes across the method's loss + backward on fake tensors (bench's "
          "whole_iteration_peak); the parameters and optimizer state are resident; the terms combine as "
          "max((n-1) x held + pass forward peak, n x held + max(rollout, decode + reward, pass backward))"
          + (f" with n = {r['graph_passes']} graph-keeping passes alive together" if r["graph_passes"] else "")]
    for note in r["notes"]:
        L.append(f"note: {note}")
    if "budget_gib" in r:
        L.append("")
        c = r["choice"]
        if c is None:
            s = r["smallest"]
            what = s.get("what") or f"the smallest of {r['candidates']} settings, {overrides_line(s['overrides'])}"
            L.append(f"budget {r['budget_gib']:g} GiB: nothing fits; the least it takes is {gib(s['peak'])} ({what})")
        else:
            ver = f"; its whole iteration measured {gib(c['verified'])}" if c.get("verified") is not None else ""
            L += [f"budget {r['budget_gib']:g} GiB: the fastest of {r['candidates']} settings that fits "
                  f"({c['flops'] / 1e15:.2f} PFLOP per iteration by the cost model; predicted {gib(c['peak'])}{ver}):",
                  overrides_line(c["overrides"])]
            if c.get("swap_blocks"):
                L.append(f"block swap: {c['swap_blocks']} blocks, {_swap_traffic(c['swap_bytes'])}")
    L.append(f"(planned in {r['seconds']:.1f}s)")
    return "\n".join(L)
