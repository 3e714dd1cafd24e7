"""Compile every Triton kernel of this package for a GPU this machine does not have.

``TRITON_INTERPRET=1`` runs the kernels on CPU tensors but accepts code the real compiler
refuses and applies none of its register or shared-memory limits. This module builds each op's
launches at FLUX.1-dev sizes on ``meta`` tensors, through the same ``*_launch`` functions the ops
run (``kernels.utils.Launch``), specialises their arguments with triton's own JIT binder (so
the signature, constexprs, divisibility hints and ``num_warps`` are the ones a real launch
would get) and compiles them with ``triton.compile(ASTSource(...), target=GPUTarget(...))``,
which needs no GPU: the triton wheel brings ptxas.

Needs a process where triton was imported without ``TRITON_INTERPRET=1`` (the kernels must be
``JITFunction``s). ``python -m kernels.aot`` compiles everything for sm_90 and sm_80 and exits
non-zero, naming the kernel and its arguments, on the first version that fails.

Uses triton internals (``create_function_from_signature``, ``JITFunction._pack_args``) that are
the same in triton 3.6 and 3.9; a triton where they differ fails here with a clear error rather
than compiling something else.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from dataclasses import dataclass, field

import torch

from kernels import gated_residual as _gr
from kernels import gelu_tanh as _gelu
from kernels import leap_connect as _lc
from kernels import mod_layernorm as _ml
from kernels import qk_norm_rope as _qk
from kernels.utils import Launch, parse_ptxas

# FLUX.1-dev: width 3072, 24 heads of 128, MLP 4 x 3072, 4096 image tokens (1024^2: a 64 x 64
# grid of 2 x 2 patches of the 128^2 latent) + 512 T5 tokens, 64 packed latent channels; batch 2
# per GPU as in configs/ (the paper's runs).
FLUX = dict(batch=2, width=3072, heads=24, head_dim=128, mlp=12288, img=4096, txt=512, latent_c=64)
TARGETS = {"sm_90": 90, "sm_80": 80}
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
DT_NAME = {F32: "fp32", BF16: "bf16", F16: "fp16", torch.float64: "fp64"}
# Every floating dtype the ops accept (fp64 too: they take any floating tensor, and compute in fp32).
# (activation dtype, parameter dtype): one dtype throughout, and bf16 activations with fp32
# parameters (mixed precision that keeps norms / modulation in fp32).
ACT_PARAM = [(F32, F32), (BF16, BF16), (F16, F16), (F64, F64), (BF16, F32)]
# (x_start, v, x_real) of leap_connect: one dtype, and fp32 latents with a bf16 model output.
LATENT = [(F32, F32, F32), (BF16, BF16, BF16), (F16, F16, F16), (F64, F64, F64), (F32, BF16, F32)]


@dataclass
class Case:
    op: str        # the op (module) the kernel belongs to
    what: str      # which launch: fwd / bwd and the variant
    dtypes: str    # the argument dtypes, e.g. "x=bf16 scale=fp32"
    launch: Launch
    shape: str = ""

    @property
    def label(self) -> str:
        return f"{self.op}.{self.what} [{self.dtypes}] {self.launch.name}"


def _e(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def cases(sizes: dict | None = None) -> list[Case]:
    """Every kernel launch the ops make at ``sizes`` (FLUX.1-dev by default), for every dtype
    combination they accept, as meta-tensor launch descriptions."""
    s = {**FLUX, **(sizes or {})}
    B, D, H, Dh, L = s["batch"], s["width"], s["heads"], s["head_dim"], s["mlp"]
    M = s["img"] + s["txt"]  # the single-stream blocks: every token (the double blocks' rows are fewer)
    out: list[Case] = []
    rows = f"({B}, {M}, {D})"

    for a, p in ACT_PARAM:
        dts = f"x={DT_NAME[a]} params={DT_NAME[p]}"
        # modulated LayerNorm
        x3, sc, sh = _e(B, M, D, dtype=a), _e(B, D, dtype=p), _e(B, D, dtype=p)
        launch, (y, mean, rstd) = _ml.fwd_launch(x3, sc, sh, 1e-6)
        out.append(Case("mod_layernorm", "fwd", dts, launch, rows))
        launch, _ = _ml.bwd_launch(torch.empty_like(y), x3, sc, mean, rstd)
        out.append(Case("mod_layernorm", "bwd", dts, launch, rows))
        # gated residual, plain and with the fused LayerNorm
        gate, yb = _e(B, D, dtype=p), _e(B, M, D, dtype=a)
        launch, _ = _gr.fwd_launch(x3, gate, yb, None, None, 0.0)
        out.append(Case("gated_residual", "fwd", dts, launch, rows))
        launch, (r, n, mean, rstd) = _gr.fwd_launch(x3, gate, yb, sc, sh, 1e-6)
        out.append(Case("gated_residual", "fwd_ln", dts, launch, rows))
        g = torch.empty_like(r)
        launch, _ = _gr.bwd_launch(g, None, None, yb, gate, None, None, None, False)
        out.append(Case("gated_residual", "bwd (grad of r)", dts, launch, rows))
        launch, _ = _gr.bwd_launch(g, torch.empty_like(n), x3, yb, gate, sc, mean, rstd, True)
        out.append(Case("gated_residual", "bwd_ln (grads of r, n)", dts, launch, rows))
        launch, _ = _gr.bwd_launch(None, torch.empty_like(n), x3, yb, gate, sc, mean, rstd, True)
        out.append(Case("gated_residual", "bwd_ln (grad of n)", dts, launch, rows))
        # QK RMSNorm + RoPE, a double block's text + image tokens (rope tables are fp32)
        q4, k4 = _e(B, M, H, Dh, dtype=a), _e(B, M, H, Dh, dtype=a)
        w = [_e(Dh, dtype=p) for _ in range(4)]
        cos, sin = _e(M, Dh, dtype=F32), _e(M, Dh, dtype=F32)
        qk = f"({B}, {M}, {H}, {Dh})"
        launch, (qo, ko, rq, rk) = _qk.fwd_launch(q4, k4, *w, cos, sin, 1e-6, s["txt"])
        out.append(Case("qk_norm_rope", "fwd", dts, launch, qk))
        launch, _ = _qk.bwd_launch(q4, k4, torch.empty_like(qo), torch.empty_like(ko), rq, rk, *w,
                                   cos, sin, s["txt"])
        out.append(Case("qk_norm_rope", "bwd", dts, launch, qk))

    for a in (F32, BF16, F16, F64):
        h = _e(B, M, L, dtype=a)
        launch, _ = _gelu.fwd_launch(h)
        out.append(Case("gelu_tanh", "fwd", f"x={DT_NAME[a]}", launch, f"({B}, {M}, {L})"))
        launch, _ = _gelu.bwd_launch(h, torch.empty_like(h))
        out.append(Case("gelu_tanh", "bwd", f"x={DT_NAME[a]}", launch, f"({B}, {M}, {L})"))

    for xs_dt, v_dt, xr_dt in LATENT:
        dts = f"x_start={DT_NAME[xs_dt]} v={DT_NAME[v_dt]} x_real={DT_NAME[xr_dt]}"
        lat = (B, s["img"], s["latent_c"])
        xs, v, xr = _e(*lat, dtype=xs_dt), _e(*lat, dtype=v_dt), _e(*lat, dtype=xr_dt)
        launch, (conn, inp, _) = _lc.fwd_launch(xs, v, xr, 0.5)
        out.append(Case("leap_connect", "fwd", dts, launch, str(lat)))
        gc, gi = torch.empty_like(conn), torch.empty_like(inp)
        for what, args in (("bwd (grads of conn, inp)", (gc, gi, True, True)),
                           ("bwd (grad of conn)", (gc, None, True, True)),
                           ("bwd (grads of conn, inp; v only)", (gc, gi, False, True))):
            g1, g2, wxs, wv = args
            launch, _ = _lc.bwd_launch(g1, g2, 0.5, 0.7, xs_dt, v_dt, wxs, wv)
            out.append(Case("leap_connect", what, dts, launch, str(lat)))
    return out


# --------------------------------------------------------------------------- compile
class AOTError(RuntimeError):
    pass


def _kernel_of(launch: Launch):
    k = launch.kernel
    if type(k).__name__ != "JITFunction":
        raise AOTError(f"{launch.name} is a {type(k).__name__}, not a JITFunction: AOT compilation needs "
                       "a process where triton was imported without TRITON_INTERPRET=1")
    return k


def specialize(launch: Launch, capability: int):
    """(ASTSource, target, options) exactly as the JIT would build them for this launch on a GPU
    of ``capability`` (90: sm_90, 80: sm_80)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = _kernel_of(launch)
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    kwargs = {**launch.constexprs, "num_warps": launch.num_warps}
    try:
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, spec, opts = binder(*launch.args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
    except Exception as e:  # triton's internals moved: say so instead of compiling something else
        raise AOTError(f"cannot specialise {launch.name} with triton {triton.__version__}'s JIT binder "
                       f"({type(e).__name__}: {e})") from e
    return ASTSource(kernel, signature, constexprs, attrs), target, options


def describe_args(launch: Launch) -> str:
    names = _kernel_of(launch).arg_names
    vals = []
    for v in launch.args:
        if isinstance(v, torch.Tensor):
            vals.append(f"{DT_NAME.get(v.dtype, v.dtype)}{tuple(v.shape)}")
        else:
            vals.append(repr(v))
    parts = [f"{n}={v}" for n, v in zip(names, vals)]
    parts += [f"{k}={v}" for k, v in launch.constexprs.items()]
    return ", ".join(parts) + f"; num_warps={launch.num_warps}, grid={launch.grid}"


@dataclass
class Result:
    case: Case
    target: str
    ok: bool
    seconds: float
    error: str = ""
    shared: int | None = None
    num_warps: int | None = None
    ptxas: dict = field(default_factory=dict)  # registers, spill_stores, spill_loads, stack (with the log)
    usage: dict = field(default_factory=dict)  # cuobjdump of the cubin: REG, STACK, SHARED, LOCAL

    @property
    def spills(self) -> bool:
        """Local memory or a stack frame in the cubin (what spilled registers need)."""
        return bool(self.usage.get("LOCAL") or self.usage.get("STACK"))


def _cuobjdump() -> str | None:
    import os
    import shutil

    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else shutil.which("cuobjdump")


def cubin_usage(cubin: bytes) -> dict:
    """``cuobjdump --dump-resource-usage`` of one kernel's cubin: {"REG": n, "STACK": n, ...}
    (empty without cuobjdump). Works on a cached compile, unlike the ptxas log."""
    import re
    import subprocess
    import tempfile

    tool = _cuobjdump()
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"Function [\w$]+:\s*\n\s*(.*)", out)
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", m.group(1))} if m else {}


def compile_case(case: Case, target: str, ptxas_log: bool = False) -> Result:
    """Compile one launch for one target; a failure is returned with the kernel and its
    arguments named, never raised."""
    import triton

    t0 = time.perf_counter()
    try:
        src, tgt, options = specialize(case.launch, TARGETS[target])
        if ptxas_log:
            from triton import knobs

            buf = io.StringIO()
            before = knobs.nvidia.dump_ptxas_log
            knobs.nvidia.dump_ptxas_log = True
            try:
                with contextlib.redirect_stdout(buf):
                    compiled = triton.compile(src, target=tgt, options=options.__dict__)
            finally:
                knobs.nvidia.dump_ptxas_log = before
        else:
            compiled = triton.compile(src, target=tgt, options=options.__dict__)
    except Exception as e:
        msg = " ".join(str(e).split())
        return Result(case, target, False, time.perf_counter() - t0,
                      error=f"{case.label} failed to compile for {target} with triton {triton.__version__}: "
                            f"{type(e).__name__}: {msg[:1500]}\n  arguments: {describe_args(case.launch)}")
    r = Result(case, target, True, time.perf_counter() - t0,
               shared=int(compiled.metadata.shared), num_warps=int(compiled.metadata.num_warps),
               usage=cubin_usage(compiled.asm["cubin"]))
    if ptxas_log:
        parsed = parse_ptxas(buf.getvalue())
        entry = [v for (fn, _), v in parsed.items() if fn == compiled.metadata.name] or list(parsed.values())
        if entry:
            r.ptxas = entry[0]
    return r


_worker_cases: list | None = None


def _compile_in_worker(job):
    # a forked worker rebuilds the (meta-tensor) cases itself; only plain values cross processes
    global _worker_cases
    i, target, sizes, ptxas_log = job
    if _worker_cases is None:
        _worker_cases = cases(sizes)
    r = compile_case(_worker_cases[i], target, ptxas_log)
    return i, target, r.ok, r.seconds, r.error, r.shared, r.num_warps, r.ptxas, r.usage


def compile_all(targets=tuple(TARGETS), sizes=None, ptxas_log: bool = False, only: str | None = None,
                progress=None, jobs: int = 1) -> list[Result]:
    """Compile every case for every target, in order; ``jobs`` > 1 compiles in that many forked
    processes (each compile is single-threaded)."""
    all_cases = cases(sizes)
    todo = [(i, t) for i, c in enumerate(all_cases) if not (only and only not in c.op) for t in targets]
    results = []
    if jobs <= 1:
        for i, t in todo:
            r = compile_case(all_cases[i], t, ptxas_log)
            results.append(r)
            if progress:
                progress(r)
        return results
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as ex:
        for i, t, ok, sec, err, shared, warps, ptx, usage in ex.map(
                _compile_in_worker, [(i, t, sizes, ptxas_log) for i, t in todo]):
            r = Result(all_cases[i], t, ok, sec, err, shared, warps, ptx, usage)
            results.append(r)
            if progress:
                progress(r)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--only", default=None, help="only the ops whose name contains this")
    ap.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    args = ap.parse_args(argv)
    import triton

    t0 = time.perf_counter()

    def show(r: Result):
        use = " ".join(f"{k}={r.usage[k]}" for k in ("REG", "STACK", "LOCAL", "SHARED") if k in r.usage)
        print(("ok   " if r.ok else "FAIL ") + f"{r.target} {r.case.label} ({r.seconds:.2f}s) {use}"
              + ("" if r.ok else "\n" + r.error), flush=True)

    results = compile_all(args.targets, only=args.only, progress=show, jobs=args.jobs)
    bad = [r for r in results if not r.ok]
    print(f"triton {triton.__version__}: {len(results) - len(bad)} of {len(results)} kernel launches "
          f"compiled for {', '.join(args.targets)} in {time.perf_counter() - t0:.1f}s")
    ok = [r for r in results if r.ok]
    if ok and not any(r.usage for r in ok):
        print("register spills: not checked (no cuobjdump)")
    else:
        spilled = [f"{r.target} {r.case.label} STACK={r.usage.get('STACK')} LOCAL={r.usage.get('LOCAL')}"
                   for r in ok if r.spills]
        print("register spills: " + ("none" if not spilled else "; ".join(spilled)))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
