"""Loader of the csrc CUDA extension: ``torch.ops.leapalign.*`` raw forward/backward ops.

The extension (sources ``csrc/*.cpp`` + ``csrc/*.cu``) registers, with ``TORCH_LIBRARY``:

* ``leap_connect_fwd(Tensor x_start, Tensor v, Tensor x_real, float c) -> (Tensor out, Tensor dist)``
* ``leap_connect_bwd(Tensor g, float c) -> (Tensor g_x_start, Tensor g_v)``
* ``mod_layernorm_fwd(Tensor x, Tensor scale, Tensor shift, float eps) -> (Tensor y, Tensor mean, Tensor rstd)``
* ``mod_layernorm_bwd(Tensor g_y, Tensor x, Tensor scale, Tensor mean, Tensor rstd) -> (Tensor g_x, Tensor g_scale, Tensor g_shift)``

CUDA implementations only, no autograd (the autograd.Functions in ``kernels/leap_connect.py`` and
``kernels/mod_layernorm.py`` call them); the fake (meta) implementations below make them
traceable by torch.compile. ``load()`` finds the extension, in this order:

1. ``kernels._C``, built by ``setup.py`` when a CUDA torch is present
   (``LEAPALIGN_SKIP_CUDA_BUILD=1`` skips that build);
2. a JIT build with ninja (``torch.utils.cpp_extension.load``, cached in torch's extensions
   directory), only when torch has CUDA, a GPU is visible and nvcc is found;
   ``LEAPALIGN_NO_JIT=1`` turns this off.

The outcome (module or reason) is cached; a failed build is never retried in one process.
Importing this module is cheap: it loads and builds nothing.
"""
from __future__ import annotations

import importlib
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import torch

NAMESPACE = "leapalign"
OPS = ("leap_connect", "mod_layernorm")
OP_NAMES = ("leap_connect_fwd", "leap_connect_bwd", "mod_layernorm_fwd", "mod_layernorm_bwd")
CSRC_DIR = Path(__file__).resolve().parent.parent / "csrc"
JIT_NAME = "leapalign_C"
SKIP_BUILD_ENV = "LEAPALIGN_SKIP_CUDA_BUILD"  # read by setup.py
NO_JIT_ENV = "LEAPALIGN_NO_JIT"
# Flags shared with setup.py so both builds compile the same thing.
EXTRA_CFLAGS = ["-O3"]
EXTRA_CUDA_CFLAGS = ["-O3"]
# The GPUs compiled for ahead of time (tests, resource report): A100 and H100/H200.
# CUDA 13 dropped everything before sm_75.
AOT_ARCHS = ("80", "90")

_lock = threading.RLock()
# None: not tried yet; ("ok", module_or_None, where) or ("fail", reason).
_state: tuple | None = None
_fakes_registered = False


def sources() -> list[str]:
    """The extension's sources: exactly ``csrc/*.cpp`` and ``csrc/*.cu``, sorted."""
    return sorted(str(p) for pat in ("*.cpp", "*.cu") for p in CSRC_DIR.glob(pat))


def _ops_registered() -> bool:
    try:
        ns = getattr(torch.ops, NAMESPACE)
        return all(hasattr(ns, n) for n in OP_NAMES)
    except Exception:
        return False


def find_nvcc() -> str | None:
    """nvcc under $CUDA_HOME / $CUDA_PATH (or torch's CUDA_HOME), else on PATH."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")



def nvcc_compile_command(src: Path, obj: Path, nvcc: str, archs=AOT_ARCHS, ptxas_verbose: bool = False) -> list[str]:
    """nvcc command compiling one csrc file to an object as the extension build would, for
    ``archs``; with ``ptxas_verbose`` ptxas reports registers and spills per kernel and arch
    (``kernels.utils.parse_ptxas`` reads them)."""
    import sysconfig

    from torch.utils import cpp_extension

    src, obj = Path(src), Path(obj)
    torch_inc = Path(cpp_extension.include_paths()[0])
    cmd = [nvcc, "-c", str(src), "-o", str(obj), "-std=c++20", *EXTRA_CUDA_CFLAGS, "-Xcompiler", "-fPIC"]
    if src.suffix == ".cu":
        cmd += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        cmd += list(cpp_extension.COMMON_NVCC_FLAGS)  # the __CUDA_NO_HALF_* defines torch adds
        if ptxas_verbose:
            cmd += ["-Xptxas", "-v"]
    cmd += [
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-DTORCH_EXTENSION_NAME=_C",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
    ]
    if not (torch_inc / "c10/cuda/impl/cuda_cmake_macros.h").exists():
        # CPU wheels lack this CMake-generated header; it only sets Windows dllexport macros.
        cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    for inc in [*cpp_extension.include_paths(), sysconfig.get_paths()["include"], str(CSRC_DIR)]:
        cmd += ["-I", inc]
    return cmd


def demangle(names: list[str]) -> dict[str, str]:
    """C++ symbol -> readable name (c++filt when present; the symbol itself otherwise)."""
    import subprocess

    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _attempt() -> tuple:
    """One try at getting the ops registered; never raises."""
    notes = []
    if _ops_registered():
        return ("ok", None, f"torch.ops.{NAMESPACE} (already registered in this process)")
    try:
        mod = importlib.import_module(f"{__package__ or 'kernels'}._C")
        if _ops_registered():
            return ("ok", mod, f"kernels._C ({getattr(mod, '__file__', '?')})")
        notes.append("kernels._C imported but did not register the ops")
    except ModuleNotFoundError as e:
        if e.name and e.name.endswith("._C"):
            notes.append("kernels._C is not built")
        else:
            notes.append(f"kernels._C failed to import: {e}")
    except Exception as e:  # an ABI mismatch shows up as an ImportError with a symbol name
        notes.append(f"kernels._C failed to import: {type(e).__name__}: {e}")

    def fail(why: str) -> tuple:
        return ("fail", "; ".join(notes + [why]))

    if torch.version.cuda is None:
        return fail(f"torch {torch.__version__} is a CPU build, no JIT build")
    if not torch.cuda.is_available():
        return fail("no CUDA device, no JIT build")
    if os.environ.get(NO_JIT_ENV, "0") == "1":
        return fail(f"JIT build disabled by {NO_JIT_ENV}=1")
    srcs = sources()
    if not srcs:
        return fail(f"no sources in {CSRC_DIR}")
    try:
        from torch.utils import cpp_extension
    except Exception as e:
        return fail(f"torch.utils.cpp_extension unavailable: {e}")
    if find_nvcc() is None:
        return fail("nvcc not found (set CUDA_HOME or put nvcc on PATH), no JIT build")
    if not cpp_extension.is_ninja_available():
        return fail("ninja not found (pip install ninja), no JIT build")
    try:
        mod = cpp_extension.load(
            name=JIT_NAME,
            sources=srcs,
            extra_cflags=EXTRA_CFLAGS,
            extra_cuda_cflags=EXTRA_CUDA_CFLAGS,
            extra_include_paths=[str(CSRC_DIR)],
            verbose=False,
        )
    except Exception as e:
        return fail(f"JIT build failed: {type(e).__name__}: {e}")
    if not _ops_registered():
        return fail(f"JIT-built {JIT_NAME} did not register the ops")
    return ("ok", mod, f"JIT build {getattr(mod, '__file__', JIT_NAME)}")


def load() -> Any:
    """The loaded extension module (None if the ops were registered by other means).

    Raises ImportError with the reason when it cannot be had; the outcome is cached.
    """
    global _state
    with _lock:
        if _state is None:
            _state = _attempt()
            if _state[0] == "ok":
                try:
                    _register_fakes()
                except Exception as e:  # keep the ops usable eagerly; say why compile may fail
                    _state = ("ok", _state[1], f"{_state[2]} (fake impls not registered: {e})")
        state = _state
    if state[0] == "ok":
        return state[1]
    raise ImportError(f"leapalign csrc extension unavailable: {state[1]}")


def has_op(name: str) -> bool:
    """True when the CUDA implementation of fused op ``name`` is loaded. Never raises."""
    if name not in OPS:
        return False
    try:
        load()
        return True
    except Exception:
        return False


def status() -> str:
    """One line: where the extension was loaded from, or why it is unavailable."""
    try:
        load()
    except Exception:
        pass
    state = _state
    if state is None:
        return "csrc not loaded"
    if state[0] == "ok":
        return f"csrc loaded from {state[2]}"
    line = " ".join(str(state[1]).split())
    return f"csrc unavailable: {line[:400]}{'...' if len(line) > 400 else ''}"


# ---- fake (meta) implementations: shapes, dtypes and strides of the real outputs -------------


def fake_leap_connect_fwd(x_start, v, x_real, c):
    torch._check(x_start.dim() >= 1, lambda: "leap_connect_fwd: x_start needs a batch dimension")
    torch._check(
        v.shape == x_start.shape and x_real.shape == x_start.shape,
        lambda: "leap_connect_fwd: x_start, v and x_real must have the same shape",
    )
    torch._check(
        x_start.dtype == x_real.dtype, lambda: "leap_connect_fwd: x_start and x_real must share a dtype"
    )
    out = x_real.new_empty(x_real.shape)
    dist = x_start.new_empty((x_start.shape[0],), dtype=torch.float64)
    return out, dist


def fake_leap_connect_bwd(g, c):
    return g.new_empty(g.shape), g.new_empty(g.shape)


def fake_mod_layernorm_fwd(x, scale, shift, eps):
    torch._check(x.dim() == 3, lambda: "mod_layernorm_fwd: x must be (B, M, D)")
    B, M, D = x.shape
    torch._check(
        scale.dim() == 2 and scale.shape[0] == B and scale.shape[1] == D,
        lambda: "mod_layernorm_fwd: scale must be (B, D)",
    )
    torch._check(shift.shape == scale.shape, lambda: "mod_layernorm_fwd: shift must be (B, D)")
    y = x.new_empty(x.shape)
    mean = x.new_empty((B * M,), dtype=torch.float32)
    rstd = x.new_empty((B * M,), dtype=torch.float32)
    return y, mean, rstd


def fake_mod_layernorm_bwd(g_y, x, scale, mean, rstd):
    torch._check(x.dim() == 3, lambda: "mod_layernorm_bwd: x must be (B, M, D)")
    torch._check(g_y.shape == x.shape, lambda: "mod_layernorm_bwd: g_y must have x's shape")
    B, M, D = x.shape
    g_x = x.new_empty(x.shape)
    g_scale = scale.new_empty((B, D))
    g_shift = scale.new_empty((B, D))
    return g_x, g_scale, g_shift


_FAKES = {
    "leap_connect_fwd": fake_leap_connect_fwd,
    "leap_connect_bwd": fake_leap_connect_bwd,
    "mod_layernorm_fwd": fake_mod_layernorm_fwd,
    "mod_layernorm_bwd": fake_mod_layernorm_bwd,
}


def _register_fakes() -> None:
    """Registers the fake impls once (called from this module: the C++ side names it with
    ``m.set_python_module("kernels._csrc")``, which torch checks)."""
    global _fakes_registered
    with _lock:
        if _fakes_registered:
            return
        for name, fn in _FAKES.items():
            torch.library.register_fake(f"{NAMESPACE}::{name}", fn)
        _fakes_registered = True


# torch imports this module by name when it needs a fake impl of an op that is already
# registered (set_python_module); register them then. Cheap: no load, no build.
if _ops_registered():
    try:
        _register_fakes()
    except Exception:
        pass
