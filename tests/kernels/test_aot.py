"""Every Triton kernel compiles for Hopper (sm_90) and Ampere (sm_80) on this CPU-only machine.

The interpreter that runs the other kernel tests accepts code the real compiler refuses; here each
op's launches at FLUX.1-dev sizes (``kernels.aot.cases``: the same ``*_launch`` functions the ops
run, on meta tensors) go through triton's JIT specialisation and ``triton.compile`` to a cubin.
Runs in a subprocess: this test process imported triton in interpreter mode (tests/conftest.py).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("triton")


def _run(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LEAPALIGN_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its default
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_every_kernel_compiles_for_sm90_and_sm80():
    """All launches of every op compile for both targets without spilling; and every entry kernel
    of the package (a module-level @jit whose name ends in _kernel) has a case, so a new kernel
    cannot slip by."""
    p = _run("""
        import importlib, pkgutil, sys
        import kernels
        from kernels import aot
        cases = aot.cases()
        launched = {c.launch.name for c in cases}
        top = set()
        for m in pkgutil.iter_modules(kernels.__path__):
            mod = importlib.import_module(f"kernels.{m.name}")
            for name, obj in vars(mod).items():
                if type(obj).__name__ == "JITFunction" and name.endswith("_kernel") and obj.__module__ == mod.__name__:
                    top.add(name)
        print("kernels:", sorted(top))
        print("without an AOT case:", sorted(top - launched))
        print("ops:", ",".join(sorted({c.op for c in cases})), "cases:", len(cases))
        sys.exit(aot.main(["--jobs", "2"]))  # a cold triton cache: ~40 s of compiling on 2 cores
    """)
    print(p.stdout[-4000:])
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    assert "without an AOT case: []" in p.stdout and "_qk_norm_rope_bwd_kernel" in p.stdout
    assert "ops: gated_residual,gelu_tanh,leap_connect,mod_layernorm,qk_norm_rope" in p.stdout
    n = int(p.stdout.split("cases:")[1].split()[0])
    assert f"{2 * n} of {2 * n} kernel launches compiled for sm_90, sm_80" in p.stdout, p.stdout[-2000:]
    # the target at FLUX.1-dev sizes: no spills (cuobjdump of each cubin: no stack, no local memory)
    assert "register spills: none" in p.stdout, p.stdout[-3000:]


def test_a_compile_error_names_the_kernel_and_its_arguments(tmp_path):
    """The check can fail: a kernel the interpreter would run (tl.arange of a non-power-of-2
    length is refused by the compiler) is reported with its name and arguments."""
    (tmp_path / "bad_kernel.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl

        @triton.jit
        def _bad_kernel(x_ptr, n, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)
    """))
    p = _run(f"""
        import sys, torch
        sys.path.insert(0, {str(tmp_path)!r})
        from bad_kernel import _bad_kernel
        from kernels import aot
        from kernels.utils import Launch
        x = torch.empty(96, dtype=torch.bfloat16, device="meta")
        case = aot.Case("bad", "fwd", "x=bf16", Launch(_bad_kernel, (1,), (x, 96), dict(BLOCK=96), 4))
        r = aot.compile_case(case, "sm_90")
        print(r.ok)
        print(r.error)
        good = aot.compile_case(aot.Case("bad", "fwd", "x=bf16", Launch(_bad_kernel, (1,), (x, 96), dict(BLOCK=128), 4)), "sm_80")
        print("good", good.ok, good.shared)
    """, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert lines[0] == "False", p.stdout
    assert "bad.fwd [x=bf16] _bad_kernel failed to compile for sm_90" in p.stdout
    assert "arguments: x_ptr=bf16(96,), n=96, BLOCK=96; num_warps=4" in p.stdout
    assert "good True" in p.stdout
