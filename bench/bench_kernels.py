"""pytest-benchmark of the five fused ops: torch eager, torch.compile, Triton and csrc CUDA.

Each op runs forward only (no graph, as in the rollout) and forward + backward (as in a
graph-keeping pass), at Flux-dev sizes on a GPU: batch 1, 4096 image + 512 text tokens, width
3072 = 24 heads x 128, MLP hidden 12288, bf16; leap_connect on the 4096 x 64 fp32 latent with a
bf16 velocity. Every case also records, in ``extra_info``, the bytes the op must move (each input
read once, each output written once; small per-row statistics included), the achieved bandwidth
and its fraction of a device-to-device copy of the same byte count timed in the same run, the
device name and the backend that actually ran (a ``kernels.backend.recording()`` of the first call).

Implementations:
  eager    the op's entry point with LEAPALIGN_BACKEND=torch, i.e. ``<op>_reference`` under autograd
  compile  ``torch.compile(<op>_reference)`` (CUDA only: on CPU it would spend the smoke budget compiling)
  triton   LEAPALIGN_BACKEND=triton (on CPU: the Triton interpreter, TRITON_INTERPRET=1)
  cuda     LEAPALIGN_BACKEND=cuda, only where csrc has the op and the extension loads

pytest.ini has ``testpaths = tests`` and ``addopts = --benchmark-disable``, so name this file and
enable benchmarking explicitly. From the repository root:

  GPU, real timings (then summarise; commit both under bench/results/):
    pytest bench/bench_kernels.py --benchmark-enable --benchmark-json=bench/results/kernels_h100.json
    python bench/summarize_kernels.py bench/results/kernels_h100.json > bench/results/kernels_h100.md
  CPU smoke test (tiny sizes, eager + Triton interpreter; each case runs once, < 1 min):
    pytest bench/bench_kernels.py
  CPU timings of the same smoke sizes (interpreter timings say nothing about a GPU):
    pytest bench/bench_kernels.py --benchmark-enable --benchmark-json=out.json
  A subset: -k selects on the ids "<op>-<fwd|fwd+bwd>-<eager|compile|triton|cuda>", e.g.
    pytest bench/bench_kernels.py --benchmark-enable -k "qk_norm_rope and not compile"

On CUDA the timer synchronises the device before reading the clock and each round runs several
back-to-back calls, so a round measures queued GPU work rather than one launch plus a sync. The
first ``cuda`` case may JIT-build the csrc extension (kernels/_csrc.py; minutes, once per
process); each ``compile`` case compiles outside the timed rounds.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch  # importing torch does not import triton

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA:
    # The kernels must be decorated in interpreter mode, so this precedes the kernels imports; it
    # stays set so that backend.pick("triton") accepts CPU tensors.
    os.environ["TRITON_INTERPRET"] = "1"

try:
    import kernels  # noqa: F401
except ImportError:  # plain `pytest bench/...` puts bench/, not the repo root, on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402

from kernels import backend  # noqa: E402

DEVICE = torch.device("cuda" if ON_CUDA else "cpu")


def device_name() -> str:
    if ON_CUDA:
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "CPU"


def _timer() -> float:
    if ON_CUDA:
        torch.cuda.synchronize()
    return time.perf_counter()


# rounds x back-to-back calls per round; the CPU numbers only keep the smoke run short
ROUNDS, ITERS, WARMUP = (30, 10, 3) if ON_CUDA else (3, 1, 1)
pytestmark = pytest.mark.benchmark(timer=_timer, disable_gc=True)


# ----------------------------------------------------------------------------- sizes and cases
if ON_CUDA:  # FLUX.1-dev at 1024x1024
    B, N_IMG, N_TXT, WIDTH, HEADS, HEAD_DIM, MLP, LATENT_C = 1, 4096, 512, 3072, 24, 128, 12288, 64
else:  # smoke sizes: same structure, tiny
    B, N_IMG, N_TXT, WIDTH, HEADS, HEAD_DIM, MLP, LATENT_C = 1, 16, 8, 64, 2, 32, 256, 16
N = N_IMG + N_TXT
ACT = torch.bfloat16


def _randn(*shape, dtype=ACT, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def _rope_tables(n, dh):
    ang = torch.rand(n, dh // 2, device=DEVICE) * 6.3
    return ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1)


@dataclass
class Case:
    """One op at one size. ``inputs`` are positional tensors (None allowed); ``grad`` marks the
    ones a training step differentiates; ``entry``/``ref`` map them to the op's outputs; the two
    byte counts are what the forward and the backward must move at least."""
    name: str
    op: str
    inputs: list
    grad: list
    entry: Callable
    ref: Callable
    bytes_fwd: int
    bytes_bwd: int


def _nb(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _case_leap_connect() -> Case:
    from kernels.leap_connect import leap_connect, leap_connect_reference

    xs = _randn(B, N_IMG, LATENT_C, dtype=torch.float32)
    v = _randn(B, N_IMG, LATENT_C)
    xr = _randn(B, N_IMG, LATENT_C, dtype=torch.float32)
    c, alpha = 0.35, 0.6
    lat32 = _nb(xs)
    return Case(
        "leap_connect", "leap_connect", [xs, v, xr], [True, True, False],
        entry=lambda xs, v, xr: leap_connect(xs, v, xr, c, alpha)[:2],
        ref=lambda xs, v, xr: leap_connect_reference(xs, v, xr, c, alpha)[:2],
        # read x_start, v, x_real; write conn, inp (dist is B float64s)
        bytes_fwd=_nb(xs, v, xr) + 2 * lat32,
        # read g_conn, g_inp; write g_x_start (fp32), g_v (bf16); nothing saved
        bytes_bwd=2 * lat32 + _nb(xs, v),
    )


def _case_mod_layernorm() -> Case:
    from kernels.mod_layernorm import mod_layernorm, mod_layernorm_reference

    x = _randn(B, N, WIDTH)
    scale, shift = _randn(B, WIDTH, scale=0.1), _randn(B, WIDTH, scale=0.1)
    stats = B * N * 8  # fp32 mean + rstd per row
    return Case(
        "mod_layernorm", "mod_layernorm", [x, scale, shift], [True, True, True],
        entry=lambda x, s, t: mod_layernorm(x, s, t, 1e-6),
        ref=lambda x, s, t: mod_layernorm_reference(x, s, t, 1e-6),
        bytes_fwd=_nb(x, scale, shift) + _nb(x) + stats,  # read x; write y, mean, rstd
        bytes_bwd=3 * _nb(x) + stats + 2 * _nb(scale),  # read g_y, x, stats; write g_x, g_scale, g_shift
    )


def _case_qk_norm_rope() -> Case:
    from kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_reference

    q, k = _randn(B, N, HEADS, HEAD_DIM, scale=2.0), _randn(B, N, HEADS, HEAD_DIM, scale=2.0)
    ws = [_randn(HEAD_DIM, scale=0.1) + 1 for _ in range(4)]
    cos, sin = _rope_tables(N, HEAD_DIM)
    rstd = 2 * B * N * HEADS * 4

    def entry(q, k, wq, wk, wqt, wkt, cos, sin):
        return qk_norm_rope(q, k, wq, wk, cos, sin, 1e-6, wq_txt=wqt, wk_txt=wkt, n_txt=N_TXT)

    def ref(q, k, wq, wk, wqt, wkt, cos, sin):
        return qk_norm_rope_reference(q, k, wq, wk, cos, sin, 1e-6, wq_txt=wqt, wk_txt=wkt, n_txt=N_TXT)

    return Case(
        "qk_norm_rope", "qk_norm_rope", [q, k, *ws, cos, sin], [True] * 6 + [False, False],
        entry=entry, ref=ref,
        bytes_fwd=2 * _nb(q) + _nb(cos, sin, *ws) + 2 * _nb(q) + rstd,  # read q, k, tables; write outs, rstd
        bytes_bwd=4 * _nb(q) + _nb(cos, sin) + rstd + 2 * _nb(q),  # read q, k, g_q, g_k, tables, rstd; write dq, dk
    )


def _case_gelu_tanh() -> Case:
    from kernels.gelu_tanh import gelu_tanh, gelu_tanh_reference

    x = _randn(B, N, MLP, scale=2.0)
    return Case(
        "gelu_tanh", "gelu_tanh", [x], [True], entry=gelu_tanh, ref=gelu_tanh_reference,
        bytes_fwd=2 * _nb(x),  # read x, write y
        bytes_bwd=3 * _nb(x),  # read x, g_y; write g_x
    )


def _case_gated_residual(fused: bool) -> Case:
    from kernels.gated_residual import gated_residual, gated_residual_reference

    x, y = _randn(B, N, WIDTH), _randn(B, N, WIDTH)
    gate = _randn(B, WIDTH, scale=0.5)
    act, vec = _nb(x), _nb(gate)
    if not fused:
        return Case(
            "gated_residual", "gated_residual", [x, gate, y], [True, True, True],
            entry=lambda x, g, y: gated_residual(x, g, y),
            ref=lambda x, g, y: gated_residual_reference(x, g, y),
            bytes_fwd=3 * act + vec,  # read x, y; write r
            bytes_bwd=3 * act + vec,  # read g_r, y; write g_y (g_x is g_r itself)
        )
    scale, shift = _randn(B, WIDTH, scale=0.1), _randn(B, WIDTH, scale=0.1)
    stats = B * N * 8
    return Case(
        "gated_residual+mod_ln", "gated_residual", [x, gate, y, scale, shift], [True] * 5,
        entry=lambda x, g, y, s, t: gated_residual(x, g, y, s, t, 1e-6),
        ref=lambda x, g, y, s, t: gated_residual_reference(x, g, y, s, t, 1e-6),
        bytes_fwd=4 * act + 3 * vec + stats,  # read x, y; write r, n, stats
        bytes_bwd=6 * act + 3 * vec + stats,  # read g_r, g_n, x, y, stats; write g_x, g_y
    )


CASES: dict[str, Callable[[], Case]] = {
    "leap_connect": _case_leap_connect,
    "mod_layernorm": _case_mod_layernorm,
    "qk_norm_rope": _case_qk_norm_rope,
    "gelu_tanh": _case_gelu_tanh,
    "gated_residual": lambda: _case_gated_residual(False),
    "gated_residual+mod_ln": lambda: _case_gated_residual(True),
}
IMPLS = ("eager", "compile", "triton", "cuda")
MODES = ("fwd", "fwd+bwd")


# ----------------------------------------------------------------------------- helpers
_copy_s: dict[int, float] = {}


def copy_seconds(nbytes: int) -> float:
    """Median time of a device-to-device copy that reads nbytes/2 and writes nbytes/2 bytes, timed
    like the benchmarks (rounds of back-to-back calls, synchronising timer)."""
    if nbytes not in _copy_s:
        src = torch.empty(max(nbytes // 2, 1), dtype=torch.uint8, device=DEVICE)
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        times = []
        for _ in range(max(ROUNDS, 5)):
            t0 = _timer()
            for _ in range(ITERS):
                dst.copy_(src)
            times.append((_timer() - t0) / ITERS)
        times.sort()
        _copy_s[nbytes] = times[len(times) // 2]
    return _copy_s[nbytes]


_compiled: dict[str, Callable] = {}


def _skip_reason(case: Case, impl: str) -> str | None:
    if impl == "compile" and not ON_CUDA:
        return "torch.compile is benchmarked on CUDA only (on CPU the smoke run would spend its budget compiling)"
    if impl == "cuda":
        if not ON_CUDA:
            return "no CUDA device"
        if not backend.csrc_has(case.op):
            return f"no csrc version of {case.op} ({backend.csrc_status()})"
    return None


def _runner(case: Case, impl: str, mode: str, monkeypatch) -> Callable[[], object]:
    if impl == "compile":
        if case.name not in _compiled:
            _compiled[case.name] = torch.compile(case.ref, dynamic=False)
        fn = _compiled[case.name]
    else:
        monkeypatch.setenv(backend.ENV_VAR, {"eager": "torch"}.get(impl, impl))
        fn = case.entry

    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(*case.inputs)
        return run

    leaves = [t.detach().requires_grad_(g) if t is not None else None for t, g in zip(case.inputs, case.grad)]
    wrt = [t for t, g in zip(leaves, case.grad) if g]
    with torch.no_grad():
        outs = case.ref(*case.inputs)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    gouts = [torch.randn_like(o, dtype=torch.float32).to(o.dtype) for o in outs]

    def run():
        out = fn(*leaves)
        out = out if isinstance(out, (tuple, list)) else (out,)
        return torch.autograd.grad(out, wrt, gouts)
    return run


# ----------------------------------------------------------------------------- the benchmark
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case_name", list(CASES))
def test_kernel(benchmark, case_name, mode, impl, monkeypatch):
    torch.manual_seed(0)
    case = CASES[case_name]()
    why = _skip_reason(case, impl)
    if why:
        pytest.skip(why)
    benchmark.group = f"{case.name} {mode}"
    run = _runner(case, impl, mode, monkeypatch)
    with backend.recording() as record:
        run()  # compile / autotune / first-call costs stay out of the timings
    benchmark.pedantic(run, rounds=ROUNDS, iterations=ITERS, warmup_rounds=WARMUP)

    ran = "torch.compile(reference)" if impl == "compile" else record.get(case.op)
    if impl != "compile":
        assert ran == {"eager": "torch"}.get(impl, impl), f"{impl} requested, {ran} ran"
    nbytes = case.bytes_fwd + (case.bytes_bwd if mode == "fwd+bwd" else 0)
    info = benchmark.extra_info
    info.update(op=case.name, mode=mode, impl=impl, backend=ran, device=device_name(),
                bytes=nbytes, sizes=dict(B=B, N_img=N_IMG, N_txt=N_TXT, width=WIDTH, heads=HEADS,
                                         head_dim=HEAD_DIM, mlp=MLP, latent_c=LATENT_C),
                triton_interpret=backend.triton_interpret())
    if benchmark.stats is not None:  # None under --benchmark-disable
        t = benchmark.stats.stats.median
        t_copy = copy_seconds(nbytes)
        info.update(median_s=t, gbps=nbytes / t / 1e9, copy_gbps=nbytes / t_copy / 1e9,
                    frac_of_copy=t_copy / t)
