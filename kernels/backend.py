"""Which implementation of a fused op runs: ``cuda`` (csrc), ``triton`` or ``torch``.

The choice is made per call from where the tensors live and what is built:

* ``cuda``   the csrc extension is built/loadable, has this op, and the inputs are CUDA tensors;
* ``triton`` the inputs are CUDA tensors and triton imports, or ``TRITON_INTERPRET=1`` is set
             (the interpreter then runs the kernels on CPU tensors), or the inputs are FakeTensors
             (FakeTensorMode, any device): each op's triton path is a ``torch.library.custom_op``
             whose fake impl only allocates, so no kernel is launched and the autograd wrapper
             saves exactly what the kernels would (how bench/measure.py sizes FLUX on a CPU);
* ``torch``  the plain PyTorch reference.

``LEAPALIGN_BACKEND=cuda|triton|torch`` forces one; forcing one that cannot run is an error,
never a silent fallback, so a benchmark always measures what it says it measures.

What ran is reported to whoever asks for it, through a record::

    with backend.recording() as ran:
        y = mod_layernorm(x, scale, shift)
    ran["mod_layernorm"]   # "triton"

Each open record maps every op picked inside its ``with`` block to the backend of its latest
call; nothing is written anywhere when no record is open.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch references keep working where triton is not installed
    triton = tl = None

# The op modules decorate their kernels with this: with ``from __future__ import annotations`` the
# ``tl.constexpr`` annotations stay strings, so kernels can be defined (never launched) without
# triton, and ``pick`` never chooses triton then.
jit = triton.jit if triton is not None else (lambda fn: fn)

BACKENDS = ("cuda", "triton", "torch")
ENV_VAR = "LEAPALIGN_BACKEND"

# The records of the ``recording()`` blocks now open (innermost last): written only while one is.
_records: list[dict[str, str]] = []


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_importable() -> bool:
    return triton is not None


def csrc_has(op: str) -> bool:
    """True when the compiled csrc extension provides ``op`` (loading it lazily)."""
    try:
        from kernels import _csrc
    except ImportError:
        return False
    return _csrc.has_op(op)


def csrc_status() -> str:
    """One line saying whether the CUDA extension is usable, and if not, why."""
    try:
        from kernels import _csrc
    except ImportError as e:
        return f"csrc unavailable: {e}"
    return _csrc.status()


def _is_fake(t: torch.Tensor | None) -> bool:
    # Under torch.compile dynamo traces with fake tensors of its own and must not see them here
    # (is_fake is on its skip list: a graph break); the choice is made from device and env then.
    if t is None or torch.compiler.is_compiling():
        return False
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def _available(name: str, op: str, on_cuda: bool, fake: bool = False) -> tuple[bool, str]:
    if name == "torch":
        return True, ""
    if name == "triton":
        if not triton_importable():
            return False, "triton is not installed"
        if on_cuda or triton_interpret() or fake:
            return True, ""
        return False, "inputs are on CPU and TRITON_INTERPRET=1 is not set"
    if name == "cuda":
        if not on_cuda:
            return False, "inputs are not CUDA tensors"
        if not csrc_has(op):
            return False, csrc_status()
        return True, ""
    raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {name!r}")


def choose(op: str, on_cuda: bool, fake: bool = False) -> str:
    """The backend a call of ``op`` runs on, for inputs on a CUDA device or not (``fake``:
    FakeTensors); records nothing, so it also tells in advance what will run."""
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced:
        ok, why = _available(forced, op, on_cuda, fake)
        if not ok:
            raise RuntimeError(f"{ENV_VAR}={forced} was forced for op {op!r}, but it cannot run: {why}")
        return forced
    return next(b for b in BACKENDS if _available(b, op, on_cuda, fake)[0])


def pick(op: str, *tensors: torch.Tensor | None) -> str:
    """Choose the backend for one call of ``op`` on ``tensors``; open records note the choice."""
    choice = choose(op, any(t is not None and t.is_cuda for t in tensors), any(_is_fake(t) for t in tensors))
    note(op, choice)
    return choice


def note(op: str, name: str) -> None:
    """Tell every open record that ``op`` ran on ``name`` (``pick`` does this for the fused ops;
    callers with a dispatch of their own, e.g. the lean blocks' attention, use it too)."""
    for rec in _records:
        rec[op] = name


@contextlib.contextmanager
def recording() -> Iterator[dict[str, str]]:
    """A dict filled, while the block runs, with op -> backend of that op's latest call."""
    rec: dict[str, str] = {}
    _records.append(rec)
    try:
        yield rec
    finally:
        # remove this record by identity (records nest, and equal dicts are not the same record)
        for i in range(len(_records) - 1, -1, -1):
            if _records[i] is rec:
                del _records[i]
                break
