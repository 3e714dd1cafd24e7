"""One FLUX.1-dev double block and one single block under each backward policy: bytes saved for
backward, peak live bytes, forward+backward time and FLOPs, with the issue's targets checked.

    python bench/bench_block.py --out DIR [--device cpu|cuda] [--tokens-img N --tokens-txt N]

Blocks: diffusers' FluxTransformerBlock and FluxSingleTransformerBlock (mlp ratio 4) at FLUX.1-dev
width (3072 = 24 heads x 128), random seeded weights, bf16, batch 1, every parameter trainable
(full fine-tuning). Inputs as inside a graph-keeping pass: hidden_states, encoder_hidden_states and
temb require grad (they come from trainable layers); the RoPE tables do not.

Policies (engine.flux.lean):
  none   diffusers' own forward, plain autograd
  full   lean.apply_policy "full": non-reentrant checkpoint around the lean forward
  lean   lean.apply_policy "lean": the fused ops, which save only what matmuls and attention need
  ckpt   the baseline: diffusers' own block under torch.utils.checkpoint(use_reentrant=False)

Per block and policy:
  held bytes    what the forward leaves alive for the backward: storages it creates that are still
                alive after it (gc.collect() first), its outputs excepted -- lean.measure_saved_bytes'
                convention, which sees what selective checkpointing caches outside the autograd graph
                and leaves out the block's inputs and parameters. The targets use this figure. Also
                SavedBytes (bench/measure.py: saved-tensor hooks, parameters excluded, inputs counted
                when saved), which is blind to such caches, and what those hooks saw, by shape.
                Both also at 1/2 and 1/4 of the tokens, to fit bytes = a + b*tokens and extrapolate
                to FLUX.1-dev at 1024x1024 (4096 + 512 tokens) where fewer tokens were measured
  held/peak     CPU: PeakLiveBytes over forward+backward (held = live right after the forward);
                CUDA: memory_allocated / max_memory_allocated minus the level before the forward.
                Parameter gradients are pre-allocated (zeroed, not freed, between runs), so they
                count as resident like the weights; the transient gradient buffers autograd adds
                into them are in the peak. gc.collect() runs before the forward and before reading
                "held": under the Triton interpreter the last launch's arguments sit in a reference
                cycle (not so with LEAPALIGN_BACKEND=torch), which would count as held activations. CPU also reports the peak without tensors shaped like a
                parameter ("activations only": the weight-gradient transients left out).
  time          forward+backward; CUDA: median of CUDA events, 20 runs after 5 warm-ups; CPU:
                wall-clock median (under the Triton interpreter: says nothing about kernels)
  FLOPs         FlopCounterMode, forward and backward (recompute included). On CPU it has no
                formula for SDPA's CPU kernel, so this script registers one (4*B*H*Nq*Nk*Dh forward,
                twice that backward); where attention still goes uncounted (flash-attn package),
                measure.attention_flops is added by hand and the JSON says so.
  backends      a kernels.backend.recording() of the timed lean/full passes (fused ops and attention)

On CPU, TRITON_INTERPRET=1 is set before anything imports triton and the lean and full passes run
with LEAPALIGN_BACKEND=triton (``--backend``), so the fused Triton kernels really run, at full
width but few tokens: 64 image + 32 text by default, because the interpreter costs about 0.2 s per
token for one lean forward+backward of a double block on 2 cores (the whole CPU run: ~5 min). On
CPU the lean/full passes run once each for the measurements and once timed (``--interp-repeats``).
Held/saved bytes are linear in tokens (SDPA's flash kernels keep no N x N term), hence the fit.

Writes block_<device>.json (all raw figures) and block_<device>.md into --out (``--name`` changes
the stem); block_<device>.partial.json holds the raw figures so far while it runs.

    CPU (results committed as bench/results/block_cpu.*):
        python bench/bench_block.py --out bench/results
    GPU, FLUX.1-dev at 1024x1024 (4096 + 512 tokens; bench/gpu_suite.sh runs this):
        python bench/bench_block.py --device cuda --out bench/results
"""
from __future__ import annotations

import os
import sys


def _device_from_argv(argv) -> str:
    for i, a in enumerate(argv):
        if a == "--device" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--device="):
            return a.split("=", 1)[1]
    return "cpu"


if __name__ == "__main__" and _device_from_argv(sys.argv[1:]) == "cpu":
    # triton fixes interpret-vs-compile when first imported: this must precede every import below
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench.measure import GiB, PeakLiveBytes, SavedBytes, attention_flops, device_name  # noqa: E402
from engine.memory import _storage_key  # noqa: E402

POLICIES = ("none", "full", "lean", "ckpt")
RECOMPUTES = {"none": False, "lean": False, "full": True, "ckpt": True}
WIDTH, HEADS, HEAD_DIM, MLP_RATIO = 3072, 24, 128, 4.0
FLUX_BLOCKS = {"double": 19, "single": 38}  # FLUX.1-dev
FLUX_TOKENS = (4096, 512)  # 1024x1024: packed image tokens, text tokens
TARGETS = dict(lean_saved_max=0.40, lean_time_max=1.05, lean_vs_full_time_max=0.85)


# ----------------------------------------------------------------------------- helpers
def _grid(tokens: int) -> tuple[int, int]:
    """A packed-latent h x w with h*w == tokens, as square as possible."""
    h = int(tokens ** 0.5)
    while tokens % h:
        h -= 1
    return h, tokens // h


class _Container(torch.nn.Module):
    """Duck-types FluxTransformer2DModel for lean.apply_policy: one double and one single block."""

    gradient_checkpointing = False

    def __init__(self, double, single):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList([double])
        self.single_transformer_blocks = torch.nn.ModuleList([single])


def build_blocks(device: str, dtype, seed: int):
    from diffusers.models.transformers.transformer_flux import (
        FluxSingleTransformerBlock, FluxTransformerBlock)

    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            double = FluxTransformerBlock(dim=WIDTH, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM)
            single = FluxSingleTransformerBlock(dim=WIDTH, num_attention_heads=HEADS,
                                                attention_head_dim=HEAD_DIM, mlp_ratio=MLP_RATIO)
    finally:
        torch.set_default_dtype(old)
    for p in [*double.parameters(), *single.parameters()]:
        p.requires_grad_(True)
    return _Container(double, single)


def make_inputs(device: str, dtype, n_img: int, n_txt: int, seed: int) -> dict:
    """As lean.block_inputs, without a whole transformer: streams and temb require grad."""
    from diffusers import FluxPipeline
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    g = torch.Generator(device="cpu").manual_seed(seed)
    h, w = _grid(n_img)
    ids = torch.cat([torch.zeros(n_txt, 3), FluxPipeline._prepare_latent_image_ids(1, h, w, "cpu", torch.float32)])
    a0 = HEAD_DIM // 8  # FLUX.1-dev: [16, 56, 56] for its 128-wide heads
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=[a0, (HEAD_DIM - a0) // 2, (HEAD_DIM - a0) // 2])(ids)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_(True)

    return dict(hidden_states=rnd(1, n_img, WIDTH), encoder_hidden_states=rnd(1, n_txt, WIDTH),
                temb=rnd(1, WIDTH), image_rotary_emb=(cos.to(device), sin.to(device)))


def _set_backend(policy: str, forced: str) -> None:
    from kernels import backend

    if policy in ("lean", "full") and forced != "auto":
        os.environ[backend.ENV_VAR] = forced
    else:
        os.environ.pop(backend.ENV_VAR, None)


def make_forward(block, policy: str):
    """fn(inputs) -> (encoder_hidden_states, hidden_states) under ``policy``."""
    if policy == "ckpt":
        def fwd(x):  # positional, so checkpoint's input save goes through saved-tensor hooks
            return checkpoint(block, x["hidden_states"], x["encoder_hidden_states"], x["temb"],
                              x["image_rotary_emb"], use_reentrant=False)
    else:
        def fwd(x):
            return block(**x)
    return fwd


def _reset_input_grads(inputs) -> None:
    for v in inputs.values():
        if isinstance(v, torch.Tensor):
            v.grad = None


def _cpu_flash_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    b, h, nq, d = query
    return 4 * b * h * nq * key[-2] * d


def _cpu_flash_bwd_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    b, h, nq, d = query
    return 8 * b * h * nq * key[-2] * d


def _flop_mapping() -> dict:
    """Formulas for SDPA's CPU kernel, which torch's flop_counter does not know."""
    from torch.utils import flop_counter

    aten, m = torch.ops.aten, {}
    for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", _cpu_flash_flops),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_flash_bwd_flops)):
        op = getattr(aten, name, None)
        if op is not None and op not in flop_counter.flop_registry and op.default not in flop_counter.flop_registry:
            m[op] = fn
    return m


class _Saved(SavedBytes):
    """SavedBytes that also lists what it counted: (shape, dtype, storage bytes) per storage."""

    def __init__(self, exclude=()):
        super().__init__(exclude)
        self.items = []

    def _pack(self, t):
        before = self.bytes
        out = super()._pack(t)
        if self.bytes != before:
            self.items.append((list(t.shape), str(t.dtype).replace("torch.", ""), self.bytes - before))
        return out


def _out_bytes(out) -> int:
    """Bytes of the distinct storages behind a forward's output tensors."""
    sts = {}
    for o in torch.utils._pytree.tree_leaves(out):
        if isinstance(o, torch.Tensor):
            st = _storage_key(o)
            if st is not None:
                sts[id(st)] = st.nbytes()
    return sum(sts.values())


def _saved_summary(items, tokens: int) -> list:
    """Saved storages grouped by (shape, dtype), largest first, with bytes per token."""
    groups: dict = {}
    for shape, dtype, n in items:
        g = groups.setdefault((tuple(shape), dtype), {"shape": shape, "dtype": dtype, "count": 0, "bytes": 0})
        g["count"] += 1
        g["bytes"] += n
    out = sorted(groups.values(), key=lambda g: -g["bytes"])
    for g in out:
        g["bytes_per_token"] = g["bytes"] / tokens
    return out


class _Peak(PeakLiveBytes):
    """PeakLiveBytes that also keeps a peak without parameter-shaped storages (weight gradients)."""

    def __init__(self, param_shapes):
        super().__init__()
        self._shapes = param_shapes
        self.act_live = self.act_peak = 0

    def _account(self, shape: tuple, n: int) -> None:
        super()._account(shape, n)
        if shape not in self._shapes:
            self.act_live += n
            self.act_peak = max(self.act_peak, self.act_live)


# ----------------------------------------------------------------------------- one policy
def run_policy(block, policy: str, inputs: dict, small_inputs: list, gouts, args, device: str) -> dict:
    from engine.flux import lean
    from kernels import backend

    fwd = make_forward(block, policy)
    params = [*block.parameters(), *block.buffers()]
    tokens = inputs["hidden_states"].shape[1] + inputs["encoder_hidden_states"].shape[1]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        _reset_input_grads(inputs)
        out = fwd(inputs)
        torch.autograd.backward(out, gouts)

    r: dict = {"policy": policy}
    if device == "cuda":
        # first call (Triton JIT, cuBLAS workspaces, ...) also allocates the parameter gradients
        t0 = time.perf_counter()
        step()
        sync()
        r["first_call_s"] = time.perf_counter() - t0
    for p in block.parameters():  # resident from here on, like the weights
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        else:
            p.grad.zero_()

    def count_flops_pass(fn_fwd):
        """forward then backward under FlopCounterMode; returns the output-free flops record."""
        with FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as fc:
            out = fn_fwd()
            f_fwd = fc.get_total_flops()
            torch.autograd.backward(out, gouts)
            del out
        return f_fwd, fc

    # "held for backward": storages the forward creates that are still alive after it, its outputs
    # excepted (lean.measure_saved_bytes' convention: what selective checkpointing caches outside
    # the graph counts too; the inputs, resident anyway, do not). Also SavedBytes (saved-tensor
    # hooks, inputs included when saved), which cannot see such caches.
    big = None
    if device == "cuda":  # memory alone, then FLOPs: nothing else allocating during the memory pass
        _reset_input_grads(inputs)
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fwd(inputs)
        gc.collect()
        torch.cuda.synchronize()
        r["live_after_forward_bytes"] = torch.cuda.memory_allocated() - base
        torch.autograd.backward(out, gouts)
        del out
        torch.cuda.synchronize()
        r["peak_bytes"] = torch.cuda.max_memory_allocated() - base
        r["peak_method"] = "torch.cuda.max_memory_allocated - memory_allocated before the forward"
        _reset_input_grads(inputs)
        f_fwd, fc = count_flops_pass(lambda: fwd(inputs))
    else:  # one pass for held/saved bytes, peak and FLOPs: the interpreter is slow
        _reset_input_grads(inputs)
        gc.collect()
        shapes = {tuple(p.shape) for p in block.parameters()}
        holder = {}

        def fwd_saved():
            with torch.enable_grad(), _Saved(exclude=params) as sb:
                out = fwd(inputs)
            gc.collect()  # the Triton interpreter leaves its last launch's arguments in a reference cycle
            holder["live"] = pk.live
            big = {"held": pk.live - _out_bytes(out), "hooks": sb.bytes, "items": sb.items}
            holder["big"] = big
            return out

        with _Peak(shapes) as pk:
            for t in params:
                pk._track(t, new=False)
            f_fwd, fc = count_flops_pass(fwd_saved)
        big = holder["big"]
        r["live_after_forward_bytes"] = holder["live"]
        r["peak_bytes"] = pk.peak
        r["peak_activation_bytes"] = pk.act_peak
        r["peak_method"] = "PeakLiveBytes (bench/measure.py) over forward+backward"

    # at the measured size (on cuda), then at 1/2 and 1/4 of the tokens for the linear fit
    saved = []
    for i, x in enumerate([inputs, *small_inputs]):
        n = x["hidden_states"].shape[1] + x["encoder_hidden_states"].shape[1]
        if not (i == 0 and big is not None):
            _reset_input_grads(x)
            gc.collect()
            with _Peak(set()) as pk:
                for t in params:
                    pk._track(t, new=False)
                with torch.enable_grad(), _Saved(exclude=params) as sb:
                    out = fwd(x)
            gc.collect()
            m = {"held": pk.live - _out_bytes(out), "hooks": sb.bytes, "items": sb.items}
            del out
            if i == 0:
                big = m
        else:
            m = big
        saved.append({"tokens": n, "bytes": m["held"], "hook_bytes": m["hooks"]})
    r["saved_bytes"] = saved[0]["bytes"]
    r["hook_saved_bytes"] = saved[0]["hook_bytes"]
    r["saved_tensors"] = _saved_summary(big["items"], tokens)
    r["saved_bytes_by_tokens"] = saved

    f_total = fc.get_total_flops()
    ops = {str(op): n for op, n in fc.get_flop_counts().get("Global", {}).items()}
    attn_counted = sum(n for op, n in ops.items() if "attention" in op)
    by_hand = attention_flops(1, tokens, WIDTH, 1)  # forward; backward is twice that
    r["flops"] = {"forward": f_fwd, "backward": f_total - f_fwd, "total": f_total,
                  "attention_counted": attn_counted, "by_op": ops,
                  "attention_by_hand_fwd_bwd": by_hand * (4 if RECOMPUTES[policy] else 3)}
    if attn_counted == 0:  # e.g. the flash-attn package: add it by hand, forward (+ recompute) + backward
        r["flops"]["total"] += r["flops"]["attention_by_hand_fwd_bwd"]
        r["flops"]["attention_source"] = "added by hand (measure.attention_flops): not counted"
    else:
        r["flops"]["attention_source"] = ("FlopCounterMode" + (" + the formula registered here for SDPA's CPU kernel"
                                                              if any("for_cpu" in op for op in ops) else ""))

    # time
    interp = device == "cpu" and policy in ("lean", "full")
    warmup, repeats = (0, args.interp_repeats) if interp else (args.warmup, args.repeats)
    times = []
    with backend.recording() as ran:  # what the lean/full passes ran (kernels, attention)
        for i in range(warmup + repeats):
            if device == "cuda":
                _reset_input_grads(inputs)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fwd(inputs)
                torch.autograd.backward(out, gouts)
                end.record()
                del out
                torch.cuda.synchronize()
                dt = start.elapsed_time(end) / 1e3
            else:
                t0 = time.perf_counter()
                step()
                dt = time.perf_counter() - t0
            if i >= warmup:
                times.append(dt)
    r["time_s"] = statistics.median(times)
    r["times_s"] = times
    r["time_method"] = (f"median of CUDA events over {repeats} runs after {warmup} warm-ups"
                        if device == "cuda" else
                        f"CPU wall-clock median of {repeats} run(s) after {warmup} warm-up(s)"
                        + (", Triton interpreter" if interp else ""))
    r["attention"] = ran.get(lean.ATTENTION) if policy in ("lean", "full") else "diffusers dispatch (SDPA)"
    r["kernels"] = ({k: v for k, v in ran.items() if k != lean.ATTENTION}
                    if policy in ("lean", "full") else {})
    return r


# ----------------------------------------------------------------------------- analysis
def fit_linear(points: list[dict]) -> dict:
    """bytes = a + b * tokens through the two largest token counts; worst deviation at the others."""
    pts = sorted(points, key=lambda p: -p["tokens"])
    (n1, b1), (n2, b2) = (pts[0]["tokens"], pts[0]["bytes"]), (pts[1]["tokens"], pts[1]["bytes"])
    slope = (b1 - b2) / (n1 - n2)
    icpt = b1 - slope * n1
    dev = max((abs(p["bytes"] - (icpt + slope * p["tokens"])) / max(p["bytes"], 1) for p in pts[2:]), default=None)
    return {"bytes_per_token": slope, "intercept_bytes": icpt, "max_rel_deviation_other_points": dev}


def _ratio(a, b):
    return a / b if b else None


def analyse(results: dict, device: str, n_tok: int) -> dict:
    out = {"per_block": {}, "targets": []}
    flux_n = sum(FLUX_TOKENS)
    for kind, pol in results.items():
        none = pol["none"]
        blk = {}
        for name, r in pol.items():
            fit = fit_linear(r["saved_bytes_by_tokens"])
            blk[name] = {
                "saved_vs_none": _ratio(r["saved_bytes"], none["saved_bytes"]),
                "peak_vs_none": _ratio(r["peak_bytes"], none["peak_bytes"]),
                "time_vs_none": _ratio(r["time_s"], none["time_s"]),
                "flops_vs_none": _ratio(r["flops"]["total"], none["flops"]["total"]),
                "saved_fit": fit,
                "saved_bytes_at_4608_extrapolated": fit["intercept_bytes"] + fit["bytes_per_token"] * flux_n,
            }
        blk["lean_time_vs_full"] = _ratio(pol["lean"]["time_s"], pol["full"]["time_s"])
        out["per_block"][kind] = blk

    def target(kind, what, value, limit, measured_here):
        t = {"block": kind, "target": what, "value": value, "limit": limit}
        if not measured_here or value is None:
            t["result"] = "not measured on CPU"
        else:
            t["result"] = "pass" if value <= limit else "fail"
        out["targets"].append(t)

    on_gpu = device == "cuda"
    for kind, blk in out["per_block"].items():
        target(kind, f"lean held bytes <= {TARGETS['lean_saved_max']:.0%} of none ({n_tok} tokens, measured)",
               blk["lean"]["saved_vs_none"], TARGETS["lean_saved_max"], True)
        if n_tok != flux_n:
            ex = _ratio(blk["lean"]["saved_bytes_at_4608_extrapolated"], blk["none"]["saved_bytes_at_4608_extrapolated"])
            target(kind, f"lean held bytes <= {TARGETS['lean_saved_max']:.0%} of none (4608 tokens, EXTRAPOLATED)",
                   ex, TARGETS["lean_saved_max"], True)
        target(kind, f"lean fwd+bwd time <= {TARGETS['lean_time_max']}x none", blk["lean"]["time_vs_none"],
               TARGETS["lean_time_max"], on_gpu)
        target(kind, f"lean >= 15% faster than full (time lean/full <= {TARGETS['lean_vs_full_time_max']})",
               blk["lean_time_vs_full"], TARGETS["lean_vs_full_time_max"], on_gpu)
    # FLUX.1-dev as a whole: 19 double + 38 single blocks
    model = {}
    for name in POLICIES:
        model[name] = {
            "saved_bytes_measured_tokens": sum(FLUX_BLOCKS[k] * results[k][name]["saved_bytes"] for k in results),
            "saved_bytes_at_4608_extrapolated": sum(
                FLUX_BLOCKS[k] * out["per_block"][k][name]["saved_bytes_at_4608_extrapolated"] for k in results),
            "time_s": sum(FLUX_BLOCKS[k] * results[k][name]["time_s"] for k in results),
        }
    out["flux_dev_19_double_38_single"] = model
    return out


# ----------------------------------------------------------------------------- report
def _b(n) -> str:
    if n is None:
        return ""
    n = float(n)
    for unit, s in (("GiB", GiB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if abs(n) >= s:
            return f"{n / s:.3g} {unit}" if abs(n) / s < 1000 else f"{n / s:.0f} {unit}"
    return f"{n:.0f} B"


def _t(s) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _x(r) -> str:
    return "" if r is None else f"{r:.2f}x"


def markdown(data: dict) -> str:
    m, a = data["meta"], data["analysis"]
    cpu = m["device"] == "cpu"
    extrap = m["tokens_img"] + m["tokens_txt"] != sum(FLUX_TOKENS)
    L = [f"# FLUX.1-dev block: backward policies ({m['device_name']})", "",
         f"- device: {m['device']} ({m['device_name']}); torch {m['torch']}, triton {m['triton']}, diffusers {m['diffusers']}",
         f"- one block each, width {WIDTH} ({HEADS} heads x {HEAD_DIM}), bf16, batch 1, "
         f"{m['tokens_img']} image + {m['tokens_txt']} text tokens; all parameters trainable; random seeded weights",
         f"- lean/full ran with LEAPALIGN_BACKEND={m['backend_forced']}"
         + (" under the Triton interpreter (TRITON_INTERPRET=1)" if m["triton_interpret"] else ""),
         f"- run: {m['date']}, {m['wall_s']:.0f} s in all"]
    if cpu:
        L.append("- CPU times are wall-clock; for lean/full they time the Triton *interpreter*, so they say "
                 "nothing about GPU kernels and the time targets are not measured here")
    if extrap:
        L.append(f"- 4608-token figures are EXTRAPOLATED from saved bytes at {m['fit_tokens']} tokens "
                 "(linear fit bytes = a + b*tokens), not measured")
    for kind, pol in data["results"].items():
        blk = a["per_block"][kind]
        L += ["", f"## {kind} block", "",
              "| policy | held for bwd | vs none | SavedBytes (hooks) | live after fwd | peak fwd+bwd | vs none | "
              + ("peak w/o weight-grad transients | " if cpu else "")
              + "time fwd+bwd | vs none | GFLOP fwd+bwd | vs none | held B/token | held @4608" + (" (extrap.)" if extrap else "") + " | backends |",
              "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if cpu else "") + "---:|---:|---:|---:|---:|---:|---|"]
        for name, r in pol.items():
            x = blk[name]
            be = ", ".join(f"{k}={v}" for k, v in sorted(r["kernels"].items()))
            be = (f"attn {r['attention']}" + (f"; {be}" if be else ""))
            L.append(f"| {name} | {_b(r['saved_bytes'])} | {_x(x['saved_vs_none'])} | {_b(r['hook_saved_bytes'])} | "
                     f"{_b(r['live_after_forward_bytes'])} | "
                     f"{_b(r['peak_bytes'])} | {_x(x['peak_vs_none'])} | "
                     + (f"{_b(r.get('peak_activation_bytes'))} | " if cpu else "")
                     + f"{_t(r['time_s'])} | {_x(x['time_vs_none'])} | {r['flops']['total'] / 1e9:.1f} | "
                     f"{_x(x['flops_vs_none'])} | {x['saved_fit']['bytes_per_token']:.0f} | "
                     f"{_b(x['saved_bytes_at_4608_extrapolated'])} | {be} |")
        L.append(f"\nlean time / full time: {_x(blk['lean_time_vs_full'])}"
                 + (" (CPU, interpreter: not meaningful)" if cpu else ""))
    L += ["", "## What the saved-tensor hooks see, per policy (storages grouped by shape and dtype, largest first)", ""]
    for kind, pol in data["results"].items():
        for name in ("none", "lean"):
            groups = pol[name].get("saved_tensors", [])
            L.append(f"- {kind} / {name}: " + "; ".join(
                f"{g['count']}x {tuple(g['shape'])} {g['dtype']} ({g['bytes_per_token']:.0f} B/token)" for g in groups[:12])
                + ("; ..." if len(groups) > 12 else ""))
    fm = a["flux_dev_19_double_38_single"]
    L += ["", "## FLUX.1-dev, 19 double + 38 single blocks (sums of the per-block figures)", "",
          "| policy | held, measured tokens | held @4608 tokens" + (" (extrapolated)" if extrap else "")
          + " |" + ("" if cpu else " time fwd+bwd |"), "|---|---:|---:|" + ("" if cpu else "---:|")]
    for name, r in fm.items():
        L.append(f"| {name} | {_b(r['saved_bytes_measured_tokens'])} | {_b(r['saved_bytes_at_4608_extrapolated'])} |"
                 + ("" if cpu else f" {_t(r['time_s'])} |"))
    L += ["", "## Targets", "", "| block | target | value | result |", "|---|---|---:|---|"]
    for t in a["targets"]:
        v = "" if t["value"] is None else f"{t['value']:.3f}"
        L.append(f"| {t['block']} | {t['target']} | {v} | {t['result']} |")
    L += ["", "Held for bwd: the storages the forward creates that are still alive after it (gc.collect() first), "
          "its outputs excepted (lean.measure_saved_bytes' convention: selective-checkpoint caches count, the "
          "block's inputs and parameters do not); the targets use it. SavedBytes (hooks): saved-tensor hooks, "
          "each storage once, parameters left out, inputs counted when saved; blind to selective-checkpoint caches. "
          "Live after fwd: held + outputs. "
          "Peak: " + data["results"]["double"]["none"]["peak_method"] + "; parameter gradients pre-allocated, so "
          "resident like the weights; the peak holds the transient gradient buffers autograd adds into them"
          + ("; the 'w/o weight-grad transients' column leaves out storages shaped like a parameter." if cpu else "."),
          "FLOPs: FlopCounterMode, forward + backward (checkpoint recompute included); attention: "
          + data["results"]["double"]["lean"]["flops"]["attention_source"] + "."]
    return "\n".join(L) + "\n"


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    global WIDTH, HEADS, HEAD_DIM  # --heads / --head-dim shrink the blocks for a smoke test
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for the JSON and markdown")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--tokens-img", type=int, help="packed image tokens (default: 4096 on cuda, 64 on cpu)")
    p.add_argument("--tokens-txt", type=int, help="text tokens (default: 512 on cuda, 32 on cpu)")
    p.add_argument("--repeats", type=int, help="timed runs (default: 20 cuda, 3 cpu)")
    p.add_argument("--warmup", type=int, help="untimed runs before them (default: 5 cuda, 1 cpu)")
    p.add_argument("--interp-repeats", type=int, default=1,
                   help="cpu: timed runs of lean/full under the Triton interpreter, no warm-up (default 1)")
    p.add_argument("--backend", default=None, choices=("auto", "triton", "cuda", "torch"),
                   help="LEAPALIGN_BACKEND for the lean/full passes (default: triton on cpu, auto on cuda)")
    p.add_argument("--blocks", default="double,single")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="output file stem (default: block_<device>)")
    p.add_argument("--heads", type=int, default=24, help="attention heads (FLUX.1-dev: 24; fewer for a smoke test)")
    p.add_argument("--head-dim", type=int, default=128, help="head width (FLUX.1-dev: 128; a multiple of 16)")
    args = p.parse_args(argv)
    if args.head_dim % 16:
        p.error("--head-dim must be a multiple of 16 (Flux's RoPE axes split it 1/8 + 7/16 + 7/16)")
    HEADS, HEAD_DIM = args.heads, args.head_dim
    WIDTH = HEADS * HEAD_DIM
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--device cpu needs TRITON_INTERPRET=1 before triton is imported (run this file as a script)")
    n_img = args.tokens_img or (4096 if cuda else 64)
    n_txt = args.tokens_txt or (512 if cuda else 32)
    args.repeats = args.repeats or (20 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.backend = args.backend or ("auto" if cuda else "triton")
    dev, dtype = args.device, torch.bfloat16

    import diffusers
    import triton

    from engine.flux import lean
    from kernels import backend

    t_start = time.perf_counter()
    model = build_blocks(dev, dtype, args.seed)
    inputs = make_inputs(dev, dtype, n_img, n_txt, args.seed + 1)
    small = [make_inputs(dev, dtype, max(n_img // d, 1), max(n_txt // d, 1), args.seed + 1) for d in (2, 4)]
    blocks = {"double": model.transformer_blocks[0], "single": model.single_transformer_blocks[0]}
    # Everything alive now (modules, the blocks, their inputs) stays alive to the end: moved out of
    # the collector's reach, the many gc.collect() calls below scan only what the passes create
    # (a full collection over diffusers' and transformers' imports costs ~0.7 s on a CPU).
    gc.collect()
    gc.freeze()
    kinds = [k.strip() for k in args.blocks.split(",") if k.strip()]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"block_{dev}"
    partial = out / f"{stem}.partial.json"
    results = {}
    for kind in kinds:
        block = blocks[kind]
        g = torch.Generator(device="cpu").manual_seed(args.seed + 2)
        gouts = tuple(torch.randn(1, n, WIDTH, generator=g).to(dev, dtype) for n in (n_txt, n_img))
        results[kind] = {}
        for policy in POLICIES:
            lean.apply_policy(model, {"ckpt": "none"}.get(policy, policy))
            _set_backend(policy, args.backend)
            t0 = time.perf_counter()
            r = run_policy(block, policy, inputs, small, gouts, args, dev)
            r["wall_s"] = time.perf_counter() - t0
            results[kind][policy] = r
            # raw figures so far, in case a time limit ends the run (replaced by the full JSON at the end)
            partial.write_text(json.dumps({"partial": True, "tokens": [n_img, n_txt], "device": dev,
                                           "results": results}, indent=1) + "\n")
            print(f"{kind:6s} {policy:4s} held {_b(r['saved_bytes']):>10s}  hooks {_b(r['hook_saved_bytes']):>10s}  peak {_b(r['peak_bytes']):>10s}  "
                  f"time {_t(r['time_s']):>9s}  {r['flops']['total'] / 1e9:8.1f} GFLOP  "
                  f"attn {r['attention']}  kernels {r['kernels']}  ({r['wall_s']:.0f} s)", flush=True)
        for p_ in block.parameters():
            p_.grad = None
    lean.apply_policy(model, "none")
    os.environ.pop(backend.ENV_VAR, None)
    gc.unfreeze()

    n_tok = n_img + n_txt
    data = {
        "meta": {
            "device": dev, "device_name": device_name(dev), "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "tokens_img": n_img, "tokens_txt": n_txt, "width": WIDTH, "heads": HEADS, "head_dim": HEAD_DIM,
            "mlp_ratio": MLP_RATIO, "dtype": "bfloat16", "batch": 1, "seed": args.seed,
            "fit_tokens": [s["tokens"] for s in results[kinds[0]]["none"]["saved_bytes_by_tokens"]],
            "backend_forced": args.backend, "triton_interpret": backend.triton_interpret(),
            "csrc": backend.csrc_status() if cuda else "not used on cpu",
            "threads": torch.get_num_threads(), "repeats": args.repeats, "warmup": args.warmup,
            "targets": TARGETS,
            "params": {k: sum(p_.numel() for p_ in blocks[k].parameters()) for k in kinds},
        },
        "results": results,
    }
    data["analysis"] = analyse(results, dev, n_tok)
    data["meta"]["wall_s"] = time.perf_counter() - t_start
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    partial.unlink(missing_ok=True)
    md = markdown(data)
    (out / f"{stem}.md").write_text(md)
    print()
    for t in data["analysis"]["targets"]:
        v = "" if t["value"] is None else f"{t['value']:.3f}"
        print(f"{t['block']:6s} {t['target']}: {v} -> {t['result']}")
    print(f"wrote {out / (stem + '.json')} and {stem}.md in {data['meta']['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
