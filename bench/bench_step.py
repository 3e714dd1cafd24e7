"""One whole LeapAlign training iteration (and the baselines') at FLUX.1-dev size: memory terms,
peak memory, time per iteration and rollout MFU, per method and backward policy.

    python bench/bench_step.py --out DIR [--device cpu|cuda] [--res 512 1024] [--methods ...]
                               [--policies none full lean baseline] [--steps 25]

Setup (both devices): diffusers' FluxTransformer2DModel with FLUX.1-dev's published config
(bench/measure.py FLUX_DEV_CONFIG: 19 double + 38 single blocks, width 3072), random bf16 weights,
LoRA rank 64 / alpha 64 through the trainer's own peft call on engine/config.py's LoraConfig.targets
(attention + MLP linears), batch 1, 512 text tokens (random prompt embeddings: the trainer caches
embeddings, no text encoder is resident), Flux's VAE config (AutoencoderKL, block_out_channels
[128, 256, 512, 512], latent_channels 16, scaling 0.3611, shift 0.1159, no quant convs; random
weights, frozen), reward engine.rewards.ColourReward (per-pixel colour distance: no parameters,
a few elementwise ops on the image, i.e. negligible FLOPs and one image-sized fp32 temporary
-- a learned reward such as HPSv2.1 would add its ViT's weights and activations on top).
Everything goes through engine.trainer.LeapTrainer (built with this adapter, a stub text encoder
and the reward passed in; a new trainer per method x policy, on the same model): its ``condition``, ``reward_fn`` (VAE decode +
reward, checkpointed when ``model.checkpoint_reward``), ``method.loss`` and, on GPU, ``step()``
itself (loss, backward, grad clipping, AdamW, EMA).

Policies:
  none / full / lean   engine.flux.lean.apply_policy on the graph-keeping passes; VAE decode +
                       reward under checkpointing (model.checkpoint_reward=True, the engine default)
  baseline             diffusers' own blocks with ``transformer.enable_gradient_checkpointing()``,
                       policy none, VAE decode + reward NOT checkpointed (model.checkpoint_reward=
                       False): how a plain diffusers training script runs. Ratios are against it.

GPU (--device cuda): real tensors; per method x policy one warm-up iteration then --iters timed
ones (CUDA events around ``trainer.step()``, median), peak = torch.cuda.max_memory_allocated over
the timed iterations (reset by step()), rollout MFU = FlopCounterMode FLOPs of one no-grad forward
x T / CUDA-event time of ``adapter.rollout`` (T no-grad forwards) / --peak-flops (790e12, bf16
dense); T=10 vs T=25 peak for leapalign. --budget-s stops starting new configs when the time is
spent (what ran is written). OOMs are recorded, not fatal.

CPU (--device cpu, no GPU): the same model on FakeTensors (bench.measure.fake_mode: no RAM, no
compute), LEAPALIGN_BACKEND=triton so the lean blocks take the Triton ops' fake impls (saving what
the real kernels save). Measured per resolution:
  weights          bytes of transformer base weights, LoRA weights, VAE weights; AdamW states,
                   gradients and the fp32 EMA of the LoRA weights computed from the LoRA sizes
                   (AdamW's step on fake tensors calls .item(): not run)
  FLOPs            FlopCounterMode on one no-grad forward (with LoRA) + attention by hand
                   (measure.attention_flops: CPU SDPA is not counted); also without LoRA
  pass held        engine.memory.held_bytes around one graph-keeping velocity call (the real
                   adapter.velocity, parameters excluded, its output excluded), per policy, with
                   LoRA (the configured run) and with every weight trainable (design.md's table)
  VAE + reward     PeakLiveBytes over trainer.reward_fn (decode + ColourReward) forward+backward
                   into the latent: plain, diffusers' per-block checkpointing (the engine's current
                   model.checkpoint_reward), and engine.flux.vae.checkpoint_decoder at each
                   granularity (exact, frozen ops); with FlopCounterMode's fwd+bwd FLOPs (the extra
                   over plain is the recompute); the reward alone on an image
  iteration        PeakLiveBytes across the whole trainer.method.loss (T no-grad rollout steps,
                   the two graph-keeping passes, leaps, decode, reward) + loss.backward(), for
                   leapalign with each policy and for the baseline (and T=10 vs T=25 for
                   leapalign/lean), and each non-baseline policy again with the decoder under
                   checkpoint_decoder(granularity="auto") instead of diffusers' per-block
                   checkpointing ("<policy>+vae_auto"); parameters are pre-existing and not counted, LoRA gradients
                   are (they are created by backward). Whole-iteration peak = that + weights
                   (transformer + LoRA + VAE) + AdamW states + fp32 EMA (steady state).
Writes step_<device>.json and step_<device>.md into --out (or --name). The CPU results were made with
    python bench/bench_step.py --device cpu --out bench/results --res 512 --name step_cpu_512
    python bench/bench_step.py --device cpu --out bench/results --res 1024 --name step_cpu_1024
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from engine.plan import fake_safe_to  # noqa: E402
from bench.measure import FLUX_DEV_CONFIG, FLUX_VAE_CONFIG, GiB, PeakLiveBytes, attention_flops, count_flops, device_name  # noqa: E402

METHODS = ("leapalign", "refl", "draft-lv", "drtune", "full")
POLICIES = ("none", "full", "lean", "baseline")
TEXT_TOKENS = 512
LORA_RANK = 64
TARGETS = dict(mem_ratio_max=0.7, time_ratio_max=0.85, rollout_mfu_min_1024=0.60)
PROMPT = "a red square"


def gib(b) -> str:
    if b is None:
        return "-"
    return f"{b / GiB:.2f} GiB"


def nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes()) if not _is_fake(t) else id(st)
        if key in seen:
            continue
        seen.add(key)
        total += st.nbytes()
    return total


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t)


class StubTextEncoder:
    """Cached prompt embeddings stand-in: T5 (512 x 4096) + CLIP pooled (768), random, fixed."""

    def __init__(self, joint_dim: int, pooled_dim: int, tokens: int, dtype, device):
        self.shape = (tokens, joint_dim, pooled_dim)
        self.dtype, self.device = dtype, device

    def encode(self, prompts):
        tokens, joint, pooled = self.shape
        g = torch.Generator().manual_seed(0)
        pe = torch.randn(len(prompts), tokens, joint, generator=g).to(self.dtype)
        po = torch.randn(len(prompts), pooled, generator=g).to(self.dtype)
        return pe, po


# ----------------------------------------------------------------------------- building
def base_config(res: int, device: str, steps: int, tiny: bool, lora_rank: int):
    """The run configuration the bench measures: LoRA on FLUX.1-dev's attention + MLP linears,
    batch 1, one prompt, at res x res (method and policy set per measurement by ``configure``)."""
    from engine.config import load_config

    return load_config(None, [f"device={device}", f"model.height={res}", f"model.width={res}",
                              f"model.dtype={'float32' if tiny else 'bfloat16'}", f"num_steps={steps}",
                              "lora.enabled=true", f"lora.rank={lora_rank}", f"lora.alpha={lora_rank}",
                              f"prompts=[{PROMPT!r}]", "samples=1"])


def build_trainer(res: int, device: str, steps: int, tiny: bool = False, fake_mode=None, lora_rank: int = LORA_RANK,
                  overrides=(), reward=None):
    """A LeapTrainer over a random-weight FLUX.1-dev (or the tiny model), LoRA on, at res x res,
    built through the public constructor (the adapter, a stub text encoder and the reward passed in;
    ColourReward unless ``reward``), with config ``overrides`` (the memory modes)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from engine.flux.adapter import FluxAdapter
    from engine.flux.tiny import tiny_transformer_config, tiny_vae_config
    from engine.rewards import ColourReward
    from engine.trainer import LeapTrainer

    dtype = torch.float32 if tiny else torch.bfloat16
    tcfg = tiny_transformer_config() if tiny else FLUX_DEV_CONFIG
    vcfg = tiny_vae_config() if tiny else FLUX_VAE_CONFIG
    cfg = base_config(res, device, steps, tiny, lora_rank)
    if overrides:
        from engine.config import apply_overrides, from_dict, to_dict

        cfg = from_dict(apply_overrides(to_dict(cfg), list(overrides)))
    old = torch.get_default_dtype()
    ctx = contextlib.ExitStack()
    with ctx:
        torch.set_default_dtype(dtype)
        ctx.callback(torch.set_default_dtype, old)
        if fake_mode is not None:
            ctx.enter_context(fake_mode)
            ctx.enter_context(fake_safe_to())
        elif device == "cuda":
            ctx.enter_context(torch.device("cuda"))
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(**tcfg)
        vae = AutoencoderKL(**vcfg)
        adapter = FluxAdapter(transformer, vae)
        c = transformer.config
        text = StubTextEncoder(c.joint_attention_dim, c.pooled_projection_dim, 16 if tiny else TEXT_TOKENS, dtype, device)
        trainer = LeapTrainer(cfg, adapter=adapter, text_encoder=text, reward=reward or ColourReward())
    return trainer


VAE_CKPT = ("diffusers", "auto", "resnet", "block")


def set_vae_checkpointing(adapter, mode: str | None) -> None:
    """None: plain decoder; "diffusers": vae.enable_gradient_checkpointing() (per block);
    "auto" | "resnet" | "block": engine.flux.vae.checkpoint_decoder at that granularity (exact,
    frozen ops) -- the engine's own builder with model.checkpoint_reward / model.reward_ckpt."""
    from engine import build
    from engine.config import ModelConfig

    build.apply_decoder_checkpointing(adapter, ModelConfig(checkpoint_reward=mode is not None,
                                                           reward_ckpt=mode or "auto"))


def configure(trainer, method: str, policy: str, steps: int | None = None, vae_ckpt: str = "diffusers"):
    """A new trainer on the same model for a method and a policy: the baseline is diffusers' own
    gradient checkpointing with the VAE decoder run plainly (model.policy=diffusers,
    model.checkpoint_reward=false), every other policy has the decoder checkpointed as
    ``vae_ckpt`` (model.reward_ckpt). The builders re-apply every feature to the model
    (engine.build: each apply_* replaces the previous setting)."""
    from engine.config import from_dict, to_dict
    from engine.trainer import LeapTrainer

    d = to_dict(trainer.cfg)
    d["model"].update(policy="diffusers" if policy == "baseline" else policy,
                      checkpoint_reward=policy != "baseline", reward_ckpt=vae_ckpt)
    d["method"]["name"] = method
    if steps is not None:
        d["num_steps"] = steps
    return LeapTrainer(from_dict(d), adapter=trainer.adapter, text_encoder=trainer.text_encoder,
                       reward=trainer.reward_model)


def image_tokens(res: int) -> int:
    return (res // 16) ** 2


# ----------------------------------------------------------------------------- CPU: fake tensors
def cpu_resolution(res: int, policies, steps: int, t_check: int, log) -> dict:
    from bench.measure import fake_mode
    from engine.memory import held_bytes

    r: dict = {"res": res, "image_tokens": image_tokens(res), "text_tokens": TEXT_TOKENS}
    t0 = time.perf_counter()
    with fake_mode() as mode:
        pass
    trainer = build_trainer(res, "cpu", steps, fake_mode=mode)
    tr, ad = trainer.transformer, trainer.adapter
    lora = [p for n, p in tr.named_parameters() if "lora_" in n]
    base = [p for n, p in tr.named_parameters() if "lora_" not in n]
    params = list(tr.parameters()) + list(tr.buffers()) + list(ad.vae.parameters())
    w = {"transformer_base": nbytes(base), "lora": nbytes(lora), "vae": nbytes(ad.vae.parameters()),
         "vae_decoder": nbytes(ad.vae.decoder.parameters())}
    lora_numel = sum(p.numel() for p in lora)
    # AdamW keeps exp_avg and exp_avg_sq in the parameter dtype; the EMA is fp32; grads are in
    # the iteration peak (created by backward). Not run on fake tensors (AdamW calls .item()).
    w["adamw_states"] = 2 * w["lora"]
    w["ema_fp32"] = 4 * lora_numel
    w["lora_grads"] = w["lora"]
    w["resident"] = w["transformer_base"] + w["lora"] + w["vae"] + w["adamw_states"] + w["ema_fp32"]
    r["weights"] = w
    r["lora_params"] = lora_numel
    log(f"[{res}] built in {time.perf_counter() - t0:.1f}s; base {gib(w['transformer_base'])}, "
        f"LoRA {lora_numel / 1e6:.1f} M params")

    cond = trainer.condition([PROMPT])
    x1 = ad.noise(1, res, res, generator=torch.Generator().manual_seed(0))
    v = ad.velocity_fn(cond)
    sig = trainer.sigmas
    n_tok = image_tokens(res) + TEXT_TOKENS
    n_blocks = FLUX_DEV_CONFIG["num_layers"] + FLUX_DEV_CONFIG["num_single_layers"]

    # FLOPs of one forward, with LoRA and without
    trainer = configure(trainer, "leapalign", "lean")
    with torch.no_grad():
        f_lora = count_flops(lambda: v(x1, sig[0]))
        tr.disable_adapters()
        try:
            f_base = count_flops(lambda: v(x1, sig[0]))
        finally:
            tr.enable_adapters()
    attn = attention_flops(1, n_tok, 3072, n_blocks)
    r["flops"] = {"forward_matmul_counted": f_base, "forward_with_attention": f_base + attn,
                  "forward_lora_with_attention": f_lora + attn, "attention_by_hand": attn,
                  "rollout_T_forwards": (f_lora + attn) * steps}
    log(f"[{res}] forward {(f_base + attn) / 1e12:.1f} TFLOP ({f_base / 1e12:.1f} counted), "
        f"with LoRA {(f_lora + attn) / 1e12:.1f}")

    # one graph-keeping pass: bytes held after its forward, per policy; LoRA and all-trainable
    x_in = x1.clone()
    r["pass_held"] = {}
    for policy in policies:
        trainer = configure(trainer, "leapalign", policy)
        out = {}
        for label in ("lora", "all_trainable", "no_lora_all_trainable"):
            if label != "lora":
                tr.requires_grad_(True)
            if label == "no_lora_all_trainable":
                tr.disable_adapters()
            try:
                o, held = held_bytes(lambda: v(x_in, sig[3]), exclude=params)
                del o
                gc.collect()
            finally:
                if label == "no_lora_all_trainable":
                    tr.enable_adapters()
                if label != "lora":
                    tr.requires_grad_(False)
                    for p in lora:
                        p.requires_grad_(True)
            out[label] = held
        r["pass_held"][policy] = out
        log(f"[{res}] pass held {policy}: LoRA {gib(out['lora'])}, all trainable {gib(out['all_trainable'])}, "
            f"no LoRA all trainable {gib(out['no_lora_all_trainable'])}")

    # VAE decode + reward, forward + backward into the latent: plain, the decoder checkpointed
    # per block by diffusers (the engine's model.checkpoint_reward today), and by
    # engine.flux.vae.checkpoint_decoder (exact) at each granularity; FLOPs of fwd+bwd
    r["vae_reward"] = {}
    vae = ad.vae
    rf = trainer.reward_fn([PROMPT])
    with torch.no_grad():
        dec_fwd = count_flops(lambda: rf(torch.randn_like(x1)))
    r["vae_decode_forward_flops"] = dec_fwd

    def fwd_bwd():
        rf(torch.randn_like(x1).requires_grad_(True)).sum().backward()

    for label, mode in (("plain", None), ("vae_block_ckpt", "diffusers"), ("vae_auto_ckpt", "auto"),
                        ("vae_resnet_ckpt", "resnet"), ("vae_block_frozen_ckpt", "block")):
        set_vae_checkpointing(ad, mode)
        lat = torch.randn_like(x1).requires_grad_(True)
        try:
            with PeakLiveBytes() as m:
                s = rf(lat)
                fwd_live = m.live
                s.sum().backward()
            del s, lat
            gc.collect()
            flops = count_flops(fwd_bwd)
        finally:
            set_vae_checkpointing(ad, "diffusers")   # the engine default
        r["vae_reward"][label] = {"peak": m.peak, "held_after_fwd": fwd_live, "mode": mode,
                                  "fwd_bwd_flops": flops}
        log(f"[{res}] VAE decode+reward fwd+bwd {label}: peak {gib(m.peak)}, held after fwd {gib(fwd_live)}, "
            f"{flops / 1e12:.2f} TFLOP")
    plain_f = r["vae_reward"]["plain"]["fwd_bwd_flops"]
    for term in r["vae_reward"].values():
        term["recompute_flops"] = term["fwd_bwd_flops"] - plain_f
    img = torch.rand(1, 3, res, res, dtype=torch.bfloat16, requires_grad=True)
    with PeakLiveBytes() as m:
        trainer.reward_model(img, [PROMPT]).sum().backward()
    r["reward_alone_peak"] = m.peak

    # the whole iteration: rollout + passes + leaps + decode + reward + backward
    r["iteration"] = {}
    runs = [(p, steps, "diffusers") for p in policies]
    if t_check and "lean" in policies:
        runs.append(("lean", t_check, "diffusers"))
    runs += [(p, steps, "auto") for p in policies if p != "baseline"]
    for policy, T, vae_ckpt in runs:
        trainer = configure(trainer, "leapalign", policy, steps=T, vae_ckpt=vae_ckpt)
        choices = trainer.method.draw(T, torch.Generator().manual_seed(0), x1)
        t1 = time.perf_counter()
        with PeakLiveBytes() as m:
            out = trainer.method.loss(v, trainer.reward_fn([PROMPT]), x1, trainer.sigmas, **choices)
            after_fwd = m.live
            peak_fwd = m.peak
            out.loss.backward()
        del out
        gc.collect()
        grads = nbytes([p.grad for p in lora if p.grad is not None])
        trainer.optimizer.zero_grad(set_to_none=True)
        res_ = {"T": T, "k": choices["k"], "j": choices["j"], "activations_peak": m.peak,
                "peak_during_forward": peak_fwd, "held_after_loss_forward": after_fwd,
                "lora_grads_created": grads, "whole_iteration_peak": m.peak + w["resident"],
                "cpu_seconds_fake": time.perf_counter() - t1}
        key = policy + ("" if vae_ckpt == "diffusers" else f"+vae_{vae_ckpt}") + ("" if T == steps else f"@T={T}")
        res_["vae_ckpt"] = None if policy == "baseline" else vae_ckpt
        r["iteration"][key] = res_
        log(f"[{res}] iteration {key}: activations peak {gib(m.peak)} (held after loss fwd "
            f"{gib(after_fwd)}), whole {gib(res_['whole_iteration_peak'])} ({res_['cpu_seconds_fake']:.0f}s)")
    trainer = configure(trainer, "leapalign", "lean", steps=steps)
    base_peak = r["iteration"].get("baseline", {}).get("whole_iteration_peak")
    if base_peak:
        for k, it in r["iteration"].items():
            it["vs_baseline"] = it["whole_iteration_peak"] / base_peak
    r["seconds"] = time.perf_counter() - t0
    return r


# ----------------------------------------------------------------------------- GPU: real tensors
def _cuda_time(fn) -> float:
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3


def _wall_time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def gpu_resolution(res: int, methods, policies, steps: int, t_check: int, iters: int, peak_flops: float,
                   deadline: float, log, tiny: bool = False, device: str = "cuda", r: dict | None = None,
                   save=lambda: None) -> dict:
    r = {} if r is None else r
    r.update({"res": res, "image_tokens": image_tokens(res), "text_tokens": TEXT_TOKENS, "configs": {}})
    t0 = time.perf_counter()
    trainer = build_trainer(res, device, steps, tiny=tiny)
    tr, ad = trainer.transformer, trainer.adapter
    lora = [p for n, p in tr.named_parameters() if "lora_" in n]
    r["weights"] = {"transformer_base": nbytes([p for n, p in tr.named_parameters() if "lora_" not in n]),
                    "lora": nbytes(lora), "vae": nbytes(ad.vae.parameters())}
    log(f"[{res}] built in {time.perf_counter() - t0:.1f}s")
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    timer = _cuda_time if cuda else _wall_time

    cond = trainer.condition([PROMPT])
    x1 = ad.noise(1, res, res, generator=torch.Generator().manual_seed(0), device=trainer.device)
    # FLOPs of one no-grad forward (on CUDA FlopCounterMode counts SDPA; on CPU add attention)
    trainer = configure(trainer, "leapalign", "lean")
    with torch.no_grad(), trainer.autocast():
        f = count_flops(lambda: ad.velocity(x1, trainer.sigmas[0], cond))
    if not cuda:
        c = tr.config
        f += attention_flops(1, x1.shape[1] + cond.prompt_embeds.shape[1],
                             c.num_attention_heads * c.attention_head_dim, c.num_layers + c.num_single_layers)
    r["flops_forward"] = f
    r["rollout_flops"] = f * steps

    def run(method, policy, T):
        nonlocal trainer
        trainer = configure(trainer, method, policy, steps=T)
        out = {"T": T}
        if method == "leapalign" and T == steps:  # rollout alone (T no-grad forwards), its MFU
            with torch.no_grad(), trainer.autocast():
                ad.rollout(x1, trainer.sigmas, cond)  # warm-up
                sync()
                t = timer(lambda: ad.rollout(x1, trainer.sigmas, cond))
            out["rollout_s"] = t
            out["rollout_mfu"] = f * T / t / peak_flops
        trainer.step()  # warm-up
        sync()
        times, peaks = [], []
        for _ in range(iters):
            m = {}
            times.append(timer(lambda: m.update(trainer.step())))
            peaks.append(m["peak_mem_bytes"])
        out.update(step_s=statistics.median(times), step_times=times, peak_bytes=max(peaks),
                   model_calls=m.get("model_calls"), loss=m.get("loss"))
        return out

    todo = [(m, p, steps) for m in methods for p in policies]
    if t_check and "leapalign" in methods:
        todo += [("leapalign", p, t_check) for p in policies if p == "lean"]
    for method, policy, T in todo:
        key = f"{method}/{policy}" + ("" if T == steps else f"@T={T}")
        if time.perf_counter() > deadline:
            r["configs"][key] = {"skipped": "time budget spent"}
            log(f"[{res}] {key}: skipped (time budget)")
            continue
        try:
            out = run(method, policy, T)
        except torch.OutOfMemoryError as e:
            out = {"oom": str(e).splitlines()[0]}
        except Exception as e:  # noqa: BLE001  (record and go on: one config must not sink the run)
            out = {"error": f"{type(e).__name__}: {e}"[:300]}
        finally:
            trainer.optimizer.zero_grad(set_to_none=True)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        r["configs"][key] = out
        save()
        log(f"[{res}] {key}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in out.items() if k != "step_times"))
    for method in methods:
        base = r["configs"].get(f"{method}/baseline", {})
        for key, c in r["configs"].items():
            if key.startswith(method + "/") and "peak_bytes" in c and "peak_bytes" in base:
                c["mem_vs_baseline"] = c["peak_bytes"] / base["peak_bytes"]
                c["time_vs_baseline"] = c["step_s"] / base["step_s"]
    r["seconds"] = time.perf_counter() - t0
    del trainer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return r


# ----------------------------------------------------------------------------- memory modes
# One LeapAlign LoRA r64 iteration per mode, HPSv2.1 (ViT-H/14) as the reward, batch 1, prompt
# embeddings cached; the baseline first, in the same run: diffusers' gradient checkpointing on
# the bf16 base, decoder not checkpointed, HPSv2.1 in fp32 as released. {swap}: --swap-blocks.
MODES = {
    "baseline": ["model.policy=diffusers", "model.checkpoint_reward=false"],
    "lean": ["model.policy=lean"],
    "full": ["model.policy=full", "model.reward_ckpt=resnet"],
    "fp8": ["model.base_precision=fp8", "model.policy=full", "model.reward_ckpt=resnet",
            "reward.params.dtype=bfloat16"],
    "fp8+swap": ["model.base_precision=fp8", "model.policy=full", "model.reward_ckpt=resnet",
                 "reward.params.dtype=bfloat16", "model.swap_blocks={swap}"],
}


def mode_overrides(mode: str, swap: int) -> list[str]:
    return [o.format(swap=swap) for o in MODES[mode]]


def modes_cpu(res: int, modes, swap: int, steps: int, log) -> dict:
    """Each mode planned and measured on fake tensors by engine.plan (the whole iteration under
    PeakLiveBytes + the resident bytes, HPSv2.1 built at full size from its architecture)."""
    from engine import plan
    from engine.config import load_config

    r = {"res": res, "modes": {}}
    for mode in modes:
        t = time.perf_counter()
        cfg = load_config(ROOT / "configs" / "flux-dev-hpsv21-lora.yaml",
                          ["batch_size=1", f"model.height={res}", f"model.width={res}", f"num_steps={steps}",
                           "embed_cache_dir=cache", *mode_overrides(mode, swap)])
        p = plan.run_plan(cfg, model_config="flux-dev", device="cuda")
        r["modes"][mode] = {"overrides": mode_overrides(mode, swap), "peak_bytes": p["peak"],
                            "resident_bytes": p["resident_total"], "iteration_peak_bytes": p["iteration"]["peak"],
                            "swap_bytes_per_iteration": (p.get("swap") or {}).get("bytes_per_iteration", 0),
                            "swap_host_bytes": (p.get("swap") or {}).get("host_bytes", 0),
                            "fp8_dequant_bytes": p.get("fp8_dequant_bytes", 0),
                            "seconds": time.perf_counter() - t}
        log(f"[{res}] mode {mode}: peak {gib(p['peak'])} ({time.perf_counter() - t:.0f}s)")
    _vs_baseline(r)
    return r


def modes_gpu(res: int, modes, swap: int, steps: int, iters: int, log, device: str = "cuda",
              tiny: bool = False) -> dict:
    """Each mode on a fresh random-weight FLUX.1-dev + HPSv2.1 architecture (random weights) on
    the GPU: median CUDA-event time of trainer.step() after a warm-up, and its peak
    (torch.cuda.max_memory_allocated, reset by step()). ``tiny`` (a CPU smoke test of this path):
    the tiny model and the colour reward."""
    from engine import plan
    from engine.config import load_config

    cuda = device == "cuda"
    r = {"res": res, "modes": {}}
    for mode in modes:
        t = time.perf_counter()
        ov = mode_overrides(mode, swap)
        if tiny:
            ov = [o.replace("swap_blocks=" + str(swap), "swap_blocks=2") for o in ov]
        try:
            reward = None
            if not tiny:
                typed = load_config(ROOT / "configs" / "flux-dev-hpsv21-lora.yaml", ov).reward.typed()
                reward = plan._hps_arch(typed).to(device)   # the architecture, random weights: no download
            trainer = build_trainer(res, device, steps, tiny=tiny, reward=reward,
                                    overrides=[o for o in ov if not o.startswith("reward.")])
            trainer.step()
            if cuda:
                torch.cuda.synchronize()
            times, peaks = [], []
            for _ in range(iters):
                m = {}
                times.append((_cuda_time if cuda else _wall_time)(lambda: m.update(trainer.step())))
                peaks.append(m["peak_mem_bytes"])
            out = {"overrides": ov, "step_s": statistics.median(times), "peak_bytes": max(peaks)}
            if trainer.swap is not None:
                out["swap_bytes_per_iteration"] = trainer.swap.bytes_moved // (iters + 1)
                out["swap_misses"] = trainer.swap.misses
        except torch.OutOfMemoryError as e:
            out = {"overrides": ov, "oom": str(e).splitlines()[0]}
        except Exception as e:  # noqa: BLE001  (record and go on)
            out = {"overrides": ov, "error": f"{type(e).__name__}: {e}"[:300]}
        finally:
            trainer = reward = None
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        out["seconds"] = time.perf_counter() - t
        r["modes"][mode] = out
        log(f"[{res}] mode {mode}: " + ", ".join(f"{k}={v}" for k, v in out.items() if k != "overrides"))
    _vs_baseline(r)
    return r


def _vs_baseline(r: dict) -> None:
    base = r["modes"].get("baseline", {})
    for m in r["modes"].values():
        if "peak_bytes" in m and "peak_bytes" in base:
            m["mem_vs_baseline"] = m["peak_bytes"] / base["peak_bytes"]
        if "step_s" in m and "step_s" in base:
            m["time_vs_baseline"] = m["step_s"] / base["step_s"]


def markdown_modes(data) -> str:
    L = [f"# Memory modes: one LeapAlign LoRA r64 iteration of FLUX.1-dev + HPSv2.1, batch 1, T = {data['steps']} "
         f"({data['device_name']})", "",
         f"- {data['versions']}; {data['date']}", f"- command: `{data['command']}`",
         "- " + ("fake tensors (engine.plan: the whole iteration under PeakLiveBytes + the resident bytes; "
                 "HPSv2.1's ViT-H/14 built at full size, weights not read)" if data["fake"] else
                 "real tensors, random weights; peak = torch.cuda.max_memory_allocated over trainer.step(), "
                 "time = median CUDA-event time of trainer.step()"),
         "- baseline, in the same run: diffusers' gradient checkpointing on the bf16 base, VAE decoder not "
         "checkpointed, HPSv2.1 in fp32", ""]
    for r in data["results"]:
        L += [f"## {r['res']}x{r['res']}", "", "| mode | overrides | peak | vs baseline | time / iteration | "
              "host -> device per iteration | fp8 dequantize traffic per iteration |", "|---|---|---|---|---|---|---|"]
        for mode, m in r["modes"].items():
            if "peak_bytes" not in m:
                L.append(f"| {mode} | `{' '.join(m['overrides'])}` | {m.get('oom') or m.get('error')} | | | | |")
                continue
            sw = m.get("swap_bytes_per_iteration", 0)
            L.append(f"| {mode} | `{' '.join(m['overrides'])}` | {gib(m['peak_bytes'])} | "
                     f"{m.get('mem_vs_baseline', float('nan')):.2f}x | "
                     + (f"{m['step_s']:.2f} s ({m.get('time_vs_baseline', float('nan')):.2f}x)" if "step_s" in m
                        else "- (no GPU)") + f" | {gib(sw) if sw else '-'} | "
                     + (gib(m["fp8_dequant_bytes"]) if m.get("fp8_dequant_bytes") else "-") + " |")
        L.append("")
    return "\n".join(L) + "\n"


# ----------------------------------------------------------------------------- reports
def markdown_cpu(data) -> str:
    L = [f"# One training iteration at FLUX.1-dev size: memory terms ({data['device_name']})", ""]
    L += [f"- device: cpu ({data['device_name']}); {data['versions']}",
          "- FakeTensors (no RAM, no compute): bytes and FLOPs only, no times; LEAPALIGN_BACKEND=triton "
          "(lean blocks take the Triton ops' fake impls, i.e. what the real kernels save)",
          f"- FLUX.1-dev transformer (19 double + 38 single, width 3072), bf16, LoRA rank {LORA_RANK} on "
          "engine LoraConfig.targets, batch 1, 512 text tokens; Flux VAE config; reward ColourReward "
          "(no parameters, negligible cost)",
          f"- whole iteration through LeapTrainer's own pieces (method.loss with T={data['steps']}, reward_fn, "
          "loss.backward()); baseline = diffusers enable_gradient_checkpointing(), policy none, VAE decode + "
          "reward not checkpointed; none/full/lean run VAE decode + reward checkpointed (engine default: diffusers "
          "per block); `<policy>+vae_auto` = the same with engine.flux.vae.checkpoint_decoder(granularity=\"auto\") "
          "instead (exact, frozen ops)",
          f"- command: `{data.get('command', 'python bench/bench_step.py --device cpu ...')}`",
          f"- run: {data['date']}, {data['seconds']:.0f} s", ""]
    for r in data["results"]:
        w, fl = r["weights"], r["flops"]
        L += [f"## {r['res']}x{r['res']} ({r['image_tokens']} image + {r['text_tokens']} text tokens)", "",
              "| term | bytes |", "|---|---:|",
              f"| transformer weights (bf16) | {gib(w['transformer_base'])} |",
              f"| LoRA weights ({r['lora_params'] / 1e6:.1f} M params, bf16) | {gib(w['lora'])} |",
              f"| AdamW states (2x LoRA, computed) | {gib(w['adamw_states'])} |",
              f"| EMA fp32 (computed) | {gib(w['ema_fp32'])} |",
              f"| VAE weights (decoder {gib(w['vae_decoder'])}) | {gib(w['vae'])} |",
              f"| resident total | {gib(w['resident'])} |"]
        fwd = r.get("vae_decode_forward_flops")
        for label, v in r["vae_reward"].items():
            extra = ""
            if "recompute_flops" in v and fwd:
                extra = (f"; fwd+bwd {v['fwd_bwd_flops'] / 1e12:.2f} TFLOP, recompute +{v['recompute_flops'] / 1e12:.2f}"
                         f" ({v['recompute_flops'] / fwd:.2f} decode fwd)")
            L.append(f"| VAE decode + reward fwd+bwd peak, {label} | {gib(v['peak'])} (held after fwd "
                     f"{gib(v['held_after_fwd'])}{extra}) |")
        L.append(f"| reward alone (ColourReward) fwd+bwd peak | {gib(r['reward_alone_peak'])} |")
        if fwd:
            L += ["", f"VAE decode + reward forward: {fwd / 1e12:.2f} TFLOP (FlopCounterMode; the backward into the latent "
                      "alone costs about as much, the frozen weights need no gradient). vae_block_ckpt = diffusers' "
                      "enable_gradient_checkpointing(); vae_auto/resnet/block_frozen_ckpt = "
                      "engine.flux.vae.checkpoint_decoder at that granularity (bit-identical gradients)."]
        L += ["", f"FLOPs per forward: {fl['forward_matmul_counted'] / 1e12:.1f} TFLOP matmul counted, "
                  f"{fl['forward_with_attention'] / 1e12:.1f} with attention (by hand, "
                  f"{fl['attention_by_hand'] / 1e12:.1f}), {fl['forward_lora_with_attention'] / 1e12:.1f} with "
                  f"LoRA; rollout of T={data['steps']} forwards {fl['rollout_T_forwards'] / 1e15:.2f} PFLOP", "",
              "One graph-keeping pass, bytes held after its forward (engine.memory.held_bytes; parameters and "
              "the output excluded):", "",
              "| policy | LoRA (this run) | all weights trainable (LoRA layers in place) | no LoRA, all trainable |",
              "|---|---:|---:|---:|"]
        for p, v in r["pass_held"].items():
            L.append(f"| {p} | {gib(v['lora'])} | {gib(v['all_trainable'])} | {gib(v['no_lora_all_trainable'])} |")
        L += ["", "Whole iteration (leapalign), PeakLiveBytes across loss + backward (activations, LoRA grads), "
                  "plus resident weights/states:", "",
              "| policy | VAE decoder | T | (k, j) | held after loss fwd | activations peak | whole-iteration peak | vs baseline |",
              "|---|---|---:|---|---:|---:|---:|---:|"]
        for p, it in r["iteration"].items():
            vb = f"{it['vs_baseline']:.2f}x" if "vs_baseline" in it else "-"
            vk = it.get("vae_ckpt", None if p == "baseline" else "diffusers")
            vk = {None: "plain", "diffusers": "diffusers per block", "auto": "checkpoint_decoder auto"}.get(vk, vk)
            L.append(f"| {p.split('@')[0].split('+')[0]} | {vk} | {it['T']} | ({it['k']}, {it['j']}) | {gib(it['held_after_loss_forward'])} | "
                     f"{gib(it['activations_peak'])} | {gib(it['whole_iteration_peak'])} | {vb} |")
        L.append("")
    L += ["## Targets (memory; the time and MFU targets need a GPU)", "",
          "| res | target | value | result |", "|---|---|---:|---|"]
    for r in data["results"]:
        it = r["iteration"]
        for p in ("none", "full", "lean", "none+vae_auto", "full+vae_auto", "lean+vae_auto"):
            if p in it and "vs_baseline" in it[p]:
                v = it[p]["vs_baseline"]
                L.append(f"| {r['res']} | leapalign/{p} peak <= {TARGETS['mem_ratio_max']}x baseline | {v:.2f} | "
                         f"{'pass' if v <= TARGETS['mem_ratio_max'] else 'FAIL'} |")
        if "baseline" in it:
            floor = r["weights"]["resident"] / it["baseline"]["whole_iteration_peak"]
            L.append(f"| {r['res']} | (floor) resident weights + LoRA + AdamW + EMA alone vs baseline peak | "
                     f"{floor:.2f} | {'reachable' if floor <= TARGETS['mem_ratio_max'] else 'target below the floor'} |")
        t10 = [k for k in it if k.startswith("lean@")]
        if t10 and "lean" in it:
            a, b = it[t10[0]]["activations_peak"], it["lean"]["activations_peak"]
            L.append(f"| {r['res']} | peak does not grow with T (lean, {t10[0].split('=')[1]} vs {it['lean']['T']}) | "
                     f"{gib(a)} vs {gib(b)} | {'pass' if b <= a * 1.01 else 'FAIL'} |")
    L += ["", "Not measured here: times, MFU, the AdamW step and EMA update (computed bytes), the other methods "
              "(GPU run), a learned reward model's bytes."]
    return "\n".join(L) + "\n"


def markdown_gpu(data) -> str:
    L = [f"# One training iteration at {'tiny' if data.get('tiny') else 'FLUX.1-dev'} size ({data['device_name']})", "",
         f"- device: {data['device']} ({data['device_name']}); {data['versions']}",
         f"- T={data['steps']}, LoRA rank {LORA_RANK}, batch 1, bf16 autocast; {data['iters']} timed iterations "
         f"after 1 warm-up (median); peak = max_memory_allocated; MFU vs {data['peak_flops'] / 1e12:.0f} TFLOP/s",
         "- baseline = diffusers enable_gradient_checkpointing(), policy none, VAE decode + reward not checkpointed",
         f"- run: {data['date']}, {data['seconds']:.0f} s", ""]
    for r in data["results"]:
        L += [f"## {r['res']}x{r['res']}", "",
              f"forward {r['flops_forward'] / 1e12:.1f} TFLOP; rollout {r['rollout_flops'] / 1e15:.2f} PFLOP; "
              f"weights {gib(r['weights']['transformer_base'])} + LoRA {gib(r['weights']['lora'])} + VAE "
              f"{gib(r['weights']['vae'])}", "",
              "| method/policy | T | s/iter | peak | mem vs baseline | time vs baseline | rollout s | rollout MFU |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for key, c in r["configs"].items():
            if "step_s" not in c:
                L.append(f"| {key} | | {c.get('oom') and 'OOM' or c.get('skipped') or c.get('error', '')} | | | | | |")
                continue
            f = lambda k, fmt: fmt.format(c[k]) if k in c else "-"  # noqa: E731
            L.append(f"| {key} | {c['T']} | {c['step_s']:.2f} | {gib(c['peak_bytes'])} | {f('mem_vs_baseline', '{:.2f}x')} | "
                     f"{f('time_vs_baseline', '{:.2f}x')} | {f('rollout_s', '{:.2f}')} | {f('rollout_mfu', '{:.1%}')} |")
        L.append("")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--res", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    ap.add_argument("--steps", type=int, default=25, help="T, rollout steps")
    ap.add_argument("--t-check", type=int, default=10, help="also run leapalign/lean at this T (0: skip)")
    ap.add_argument("--iters", type=int, default=2, help="GPU: timed iterations after one warm-up")
    ap.add_argument("--peak-flops", type=float, default=790e12, help="bf16 dense peak for MFU")
    ap.add_argument("--budget-s", type=float, default=1e9, help="GPU: start no new config once a resolution has used its share of this many seconds")
    ap.add_argument("--real", action="store_true", help="CPU: run the GPU code path on real tensors (use with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="the tiny model (engine.flux.tiny): a smoke test of the real path")
    ap.add_argument("--name", default=None, help="output stem (default step_<device>)")
    ap.add_argument("--modes", nargs="+", default=None, choices=tuple(MODES),
                    help="measure these memory modes instead (LeapAlign LoRA + HPSv2.1, the baseline in the same run)")
    ap.add_argument("--swap-blocks", type=int, default=13, help="blocks swapped in the fp8+swap mode")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("LEAPALIGN_BACKEND", "triton" if a.device == "cuda" or not (a.real or a.tiny) else "torch")
    t0 = time.perf_counter()
    import diffusers
    import triton
    data = {"device": a.device, "device_name": device_name(a.device), "steps": a.steps, "iters": a.iters,
            "peak_flops": a.peak_flops, "tiny": a.tiny, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": f"torch {torch.__version__}, triton {triton.__version__}, diffusers {diffusers.__version__}",
            "backend_env": os.environ.get("LEAPALIGN_BACKEND"), "targets": TARGETS, "results": []}
    stem = a.name or f"step_{a.device}" + ("_tiny" if a.tiny else "")
    data["command"] = "python bench/bench_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    log = lambda s: print(f"[{time.perf_counter() - t0:6.1f}s] {s}", flush=True)  # noqa: E731
    fake = a.device == "cpu" and not (a.real or a.tiny)
    def save():  # after every resolution (and, on GPU, every config): a timeout leaves what ran
        data["seconds"] = time.perf_counter() - t0
        (out / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str))
        try:
            (out / f"{stem}.md").write_text((markdown_cpu if fake else markdown_gpu)(data))
        except (KeyError, TypeError):  # a resolution still half-way: the JSON has it
            pass

    if a.modes:
        stem = a.name or f"modes_{a.device}" + ("_tiny" if a.tiny else "")
        data["fake"] = fake
        modes = ["baseline", *[m for m in a.modes if m != "baseline"]]
        for res in a.res:
            data["results"].append(modes_cpu(res, modes, a.swap_blocks, a.steps, log) if fake else
                                   modes_gpu(res, modes, a.swap_blocks, a.steps, a.iters, log, a.device, a.tiny))
            data["seconds"] = time.perf_counter() - t0
            (out / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str))
            (out / f"{stem}.md").write_text(markdown_modes(data))
        log(f"wrote {out / stem}.json/.md")
        return 0
    for res in a.res:
        if fake:
            data["results"].append(cpu_resolution(res, a.policies, a.steps, a.t_check, log))
        else:
            r: dict = {}
            data["results"].append(r)
            deadline = time.perf_counter() + a.budget_s / len(a.res)  # each resolution its share
            gpu_resolution(res, a.methods, a.policies, a.steps, a.t_check, a.iters, a.peak_flops, deadline, log,
                           tiny=a.tiny, device=a.device, r=r, save=save)
        save()
    log(f"wrote {out / stem}.json/.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
