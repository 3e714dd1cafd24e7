"""csrc CUDA extension: it compiles (nvcc, no GPU needed), the loader degrades cleanly without
CUDA, and on a GPU every op matches a plain torch computation of the same formula."""
from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kernels import _csrc  # noqa: E402
from kernels.utils import parse_ptxas  # noqa: E402

CSRC = ROOT / "csrc"
ARCHS = _csrc.AOT_ARCHS  # A100 and H100; CUDA 13 dropped everything before sm_75


# ------------------------------------------------------------------ compile check (CPU machine)


def _nvcc() -> str | None:
    return _csrc.find_nvcc()


def compile_command(src: Path, obj: Path, nvcc: str) -> list[str]:
    """nvcc command compiling one csrc file to an object, as the extension build would, with
    ptxas reporting registers and spills per kernel."""
    return _csrc.nvcc_compile_command(src, obj, nvcc, ARCHS, ptxas_verbose=True)


def test_csrc_compiles_with_nvcc(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found on PATH or under CUDA_HOME: cannot compile csrc here")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    print(version.strip().splitlines()[-1])
    srcs = sorted([*CSRC.glob("*.cpp"), *CSRC.glob("*.cu")])
    assert [s.name for s in srcs if s.suffix == ".cpp"], "no .cpp registration file in csrc/"
    assert [s.name for s in srcs if s.suffix == ".cu"], "no .cu file in csrc/"
    assert set(_csrc.sources()) == {str(s) for s in srcs}

    def build(src: Path):
        obj = tmp_path / f"{src.name}.o"
        cmd = compile_command(src, obj, nvcc)
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        return src, obj, cmd, p, time.perf_counter() - t0

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(srcs)) as ex:
        results = list(ex.map(build, srcs))
    wall = time.perf_counter() - t0
    failures = []
    for src, obj, cmd, p, dt in results:
        print(f"{src.name}: rc={p.returncode} {dt:.1f}s\n  {' '.join(cmd)}")
        if p.returncode != 0 or not obj.exists():
            failures.append(f"--- {src.name} (rc={p.returncode})\n{' '.join(cmd)}\n{p.stdout}{p.stderr}")
    print(f"compiled {len(srcs)} files in {wall:.1f}s wall")
    assert not failures, "csrc failed to compile:\n" + "\n".join(failures)

    # Registers and spills per kernel and arch (ptxas -v), as bench/aot_kernels.py reports them.
    usage = {}
    for src, _, _, p, _ in results:
        if src.suffix == ".cu":
            usage.update(parse_ptxas(p.stdout + p.stderr))
    names = _csrc.demangle(sorted({f for f, _ in usage}))
    for (fn, arch), u in sorted(usage.items()):
        print(f"{arch} {names[fn]}: {u.get('registers')} registers, {u.get('spill_stores')} B spill stores, "
              f"{u.get('spill_loads')} B spill loads, {u.get('stack')} B stack")
    archs = {arch for _, arch in usage}
    assert archs == {f"sm_{a}" for a in ARCHS}, f"ptxas -v reported {sorted(archs)}"
    assert all("registers" in u and "spill_stores" in u for u in usage.values()), usage

    # Link the objects into one shared object (undefined symbols are resolved by torch at load
    # time): every leapalign:: function the registration file uses must be defined here.
    so = tmp_path / "_C.so"
    link = subprocess.run(
        ["g++", "-shared", "-o", str(so), *[str(obj) for _, obj, *_ in results]],
        capture_output=True, text=True,
    )
    assert link.returncode == 0, link.stdout + link.stderr
    nm = shutil.which("nm")
    if nm:
        undef = subprocess.run([nm, "-C", "-u", str(so)], capture_output=True, text=True).stdout
        ours = [ln for ln in undef.splitlines() if "leapalign::" in ln]
        assert not ours, "undefined leapalign symbols:\n" + "\n".join(ours)
        defined = subprocess.run([nm, "-D", "--defined-only", str(so)], capture_output=True, text=True).stdout
        assert "PyInit__C" in defined, "the module init function PyInit__C is not exported"


# ------------------------------------------------------------------ loader on a machine without CUDA


def test_import_is_cheap_and_builds_nothing():
    code = textwrap.dedent(
        """
        import sys
        import kernels
        had_cpp_extension = "torch.utils.cpp_extension" in sys.modules
        import kernels._csrc as c
        assert c._state is None, c._state  # nothing loaded, nothing built
        assert had_cpp_extension or "torch.utils.cpp_extension" not in sys.modules
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert p.returncode == 0 and "ok" in p.stdout, p.stdout + p.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_no_cuda_has_no_op_and_says_why(monkeypatch):
    from torch.utils import cpp_extension

    def no_build(*a, **k):
        raise AssertionError("tried to build on a machine without CUDA")

    monkeypatch.setattr(cpp_extension, "load", no_build)
    monkeypatch.setattr(_csrc, "_state", None)
    assert _csrc.has_op("leap_connect") is False
    assert _csrc.has_op("mod_layernorm") is False
    assert _csrc.has_op("no_such_op") is False
    line = _csrc.status()
    print(line)
    assert "\n" not in line and line.startswith("csrc unavailable:")
    assert "CPU build" in line or "no CUDA device" in line
    with pytest.raises(ImportError, match="unavailable"):
        _csrc.load()
    # cached: a second call gives the same answer without trying again
    assert _csrc.status() == line


def test_fake_impls_shapes():
    m = torch.device("meta")
    xs = torch.empty(2, 5, 33, device=m)
    v = torch.empty(2, 5, 33, device=m, dtype=torch.bfloat16)
    out, dist = _csrc.fake_leap_connect_fwd(xs, v, xs, 0.5)
    assert out.shape == xs.shape and out.dtype == xs.dtype and out.is_contiguous()
    assert dist.shape == (2,) and dist.dtype == torch.float64
    gx, gv = _csrc.fake_leap_connect_bwd(v, 0.5)
    assert gx.shape == gv.shape == v.shape and gx.dtype == gv.dtype == torch.bfloat16
    x = torch.empty(2, 7, 33, device=m, dtype=torch.float16)
    s = torch.empty(2, 33, device=m, dtype=torch.float16)
    y, mean, rstd = _csrc.fake_mod_layernorm_fwd(x, s, s, 1e-6)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert mean.shape == rstd.shape == (14,) and mean.dtype == rstd.dtype == torch.float32
    g_x, g_s, g_h = _csrc.fake_mod_layernorm_bwd(x, x, s, mean, rstd)
    assert g_x.shape == x.shape and g_s.shape == g_h.shape == (2, 33) and g_s.dtype == torch.float16


# ------------------------------------------------------------------ GPU: against plain torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(2, 1, 33), (2, 4608, 33), (2, 1, 3072), (2, 4608, 3072)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def _ops():
    if not _csrc.has_op("leap_connect"):
        pytest.fail(f"CUDA is available but the extension is not: {_csrc.status()}")
    return torch.ops.leapalign


def _close(out, ref, tol, what):
    """|out - ref| <= tol * (|ref| + max|ref|), elementwise (output rounding + sum order)."""
    out, ref = out.float(), ref.float()
    err = (out - ref).abs()
    bound = tol * (ref.abs() + ref.abs().max())
    assert bool((err <= bound).all()), f"{what}: max err {err.max().item():.3g}, max |ref| {ref.abs().max().item():.3g}"


def ref_leap_connect(xs, v, xr, c):
    xhat = xs.float() - c * v.float()
    diff = (xr.float() - xhat).abs().double()
    return xr.clone(), diff.reshape(diff.shape[0], -1).mean(dim=1)


def ref_mod_layernorm(x, scale, shift, eps):
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    var = xf.var(-1, unbiased=False, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    y = (xf - mean) * rstd * (1 + scale.float()[:, None, :]) + shift.float()[:, None, :]
    return y, mean.flatten(), rstd.flatten()


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("lat,vel", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                     (torch.float32, torch.float16), (torch.bfloat16, torch.bfloat16),
                                     (torch.float16, torch.float16), (torch.bfloat16, torch.float32)])
def test_leap_connect_fwd(shape, lat, vel):
    ops = _ops()
    torch.manual_seed(0)
    xs = torch.randn(shape, device="cuda").to(lat)
    v = torch.randn(shape, device="cuda").to(vel)
    xr = torch.randn(shape, device="cuda").to(lat)
    c = 0.37
    out, dist = ops.leap_connect_fwd(xs, v, xr, c)
    ref_out, ref_dist = ref_leap_connect(xs, v, xr, c)
    assert out.dtype == lat and torch.equal(out, ref_out) and out.data_ptr() != xr.data_ptr()
    assert dist.dtype == torch.float64 and dist.shape == (shape[0],)
    torch.testing.assert_close(dist, ref_dist, rtol=1e-6, atol=0)
    _, dist2 = ops.leap_connect_fwd(xs, v, xr, c)
    assert torch.equal(dist, dist2), "dist is not deterministic"


@pytest.mark.gpu
def test_leap_connect_fwd_odd_and_strided():
    ops = _ops()
    base = torch.randn(3, 7, 9, device="cuda")
    xs, xr = base[:, :, 1:], torch.randn(3, 7, 8, device="cuda")
    v = torch.randn(3, 8, 7, device="cuda", dtype=torch.bfloat16).transpose(1, 2)  # not contiguous
    out, dist = ops.leap_connect_fwd(xs, v, xr, -1.25)
    ref_out, ref_dist = ref_leap_connect(xs, v, xr, -1.25)
    assert torch.equal(out, ref_out)
    torch.testing.assert_close(dist, ref_dist, rtol=1e-6, atol=0)
    with pytest.raises(RuntimeError, match="share a dtype"):
        ops.leap_connect_fwd(xs, v, xr.bfloat16(), 1.0)
    with pytest.raises(RuntimeError, match="same shape"):
        ops.leap_connect_fwd(xs, v[:, :1], xr, 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 4608, 3072), (2, 1, 33), (3, 5, 7)])
def test_leap_connect_bwd(shape, dtype):
    ops = _ops()
    g = torch.randn(shape, device="cuda").to(dtype)
    c = 0.37
    gx, gv = ops.leap_connect_bwd(g, c)
    assert gx.dtype == gv.dtype == dtype
    assert torch.equal(gx, g) and gx.data_ptr() != g.data_ptr()
    torch.testing.assert_close(gv, -c * g, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(3, 5, 12288)])
def test_mod_layernorm_fwd(shape, dtype):
    ops = _ops()
    torch.manual_seed(0)
    B, M, D = shape
    x = (torch.randn(shape, device="cuda") * 2 + 0.5).to(dtype)
    scale = (torch.randn(B, D, device="cuda") * 0.3).to(dtype)
    shift = torch.randn(B, D, device="cuda").to(dtype)
    y, mean, rstd = ops.mod_layernorm_fwd(x, scale, shift, 1e-6)
    ry, rmean, rrstd = ref_mod_layernorm(x, scale, shift, 1e-6)
    assert y.dtype == dtype and y.shape == x.shape
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (B * M,)
    torch.testing.assert_close(mean, rmean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd, rrstd, rtol=1e-5, atol=0)
    _close(y, ry, TOL[dtype], "y")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(3, 5, 12288)])
def test_mod_layernorm_bwd(shape, dtype):
    ops = _ops()
    torch.manual_seed(0)
    B, M, D = shape
    x = (torch.randn(shape, device="cuda") * 2 + 0.5).to(dtype)
    scale = (torch.randn(B, D, device="cuda") * 0.3).to(dtype)
    shift = torch.randn(B, D, device="cuda").to(dtype)
    g_y = torch.randn(shape, device="cuda").to(dtype)
    _, mean, rstd = ops.mod_layernorm_fwd(x, scale, shift, 1e-6)
    g_x, g_scale, g_shift = ops.mod_layernorm_bwd(g_y, x, scale, mean, rstd)

    xf = x.float().requires_grad_()
    sf = scale.float().requires_grad_()
    hf = shift.float().requires_grad_()
    ry, _, _ = ref_mod_layernorm(xf, sf, hf, 1e-6)
    rg_x, rg_s, rg_h = torch.autograd.grad(ry, (xf, sf, hf), g_y.float())
    assert g_x.dtype == g_scale.dtype == g_shift.dtype == dtype
    assert g_scale.shape == g_shift.shape == (B, D)
    _close(g_x, rg_x, TOL[dtype] * (4 if dtype == torch.float32 else 1), "g_x")
    _close(g_scale, rg_s, TOL[dtype] * (10 if dtype == torch.float32 else 1), "g_scale")
    _close(g_shift, rg_h, TOL[dtype] * (10 if dtype == torch.float32 else 1), "g_shift")
    again = ops.mod_layernorm_bwd(g_y, x, scale, mean, rstd)
    assert all(torch.equal(a, b) for a, b in zip((g_x, g_scale, g_shift), again)), "not deterministic"


@pytest.mark.gpu
def test_mod_layernorm_checks():
    ops = _ops()
    x = torch.randn(2, 4, 8, device="cuda")
    s = torch.randn(2, 8, device="cuda")
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.mod_layernorm_fwd(torch.randn(2, 8, 4, device="cuda").transpose(1, 2), s, s, 1e-6)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.mod_layernorm_fwd(x, s.half(), s, 1e-6)
    with pytest.raises(RuntimeError, match=r"\(B, D\)"):
        ops.mod_layernorm_fwd(x, s[:1], s, 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    ops = _ops()
    x = torch.randn(2, 3, 33, device="cuda").to(dtype)
    v = torch.randn(2, 3, 33, device="cuda").to(dtype)
    s = (torch.randn(2, 33, device="cuda") * 0.1).to(dtype)
    torch.library.opcheck(ops.leap_connect_fwd.default, (x.float(), v, x.float(), 0.5))
    torch.library.opcheck(ops.leap_connect_bwd.default, (x, 0.5))
    torch.library.opcheck(ops.mod_layernorm_fwd.default, (x, s, s, 1e-6))
    _, mean, rstd = ops.mod_layernorm_fwd(x, s, s, 1e-6)
    torch.library.opcheck(ops.mod_layernorm_bwd.default, (v, x, s, mean, rstd))


@pytest.mark.gpu
def test_compiles_under_torch_compile():
    ops = _ops()

    def f(x, s, h):
        y, _, _ = ops.mod_layernorm_fwd(x, s, h, 1e-6)
        out, dist = ops.leap_connect_fwd(y, y, y, 0.5)
        return out * 2, dist

    x = torch.randn(2, 16, 64, device="cuda")
    s = torch.randn(2, 64, device="cuda")
    eager = f(x, s, s)
    compiled = torch.compile(f, fullgraph=True)(x, s, s)
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])
