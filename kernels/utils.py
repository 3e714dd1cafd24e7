"""Helpers shared by the fused ops: row layout, launch settings, and the launch description.

Every Triton kernel of this package is launched through a :class:`Launch`: the op's
``*_launch`` function allocates the kernel's outputs and returns the one description (kernel,
grid, arguments, constexprs, ``num_warps``) that the op runs. ``kernels.aot`` builds the same
descriptions on ``meta`` tensors at FLUX.1-dev sizes and compiles them for sm_90 / sm_80 without
a GPU, so what is compiled ahead of time is what the op launches, not a second copy of it.

Needs no triton: the ops import this where only the torch references run.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

import torch

# An H100 / H200 SXM has 132 SMs: the count that ``meta`` tensors (the AOT descriptions, which
# have no device to ask) size their grids and per-program work with.
AOT_SM_COUNT = 132


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 at least (bf16/fp16 statistics are too coarse); fp64 when given fp64, so that
    gradcheck of a reference is meaningful."""
    dt = torch.float32
    for t in tensors:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample (B, D) vector as (B, 1, ..., 1, D), matching x's rank."""
    return t.reshape(t.shape[0], *([1] * (x.dim() - 2)), t.shape[-1])


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x (B, ..., D) as a (B, M, D) tensor; a view whenever the middle dims merge into one stride.

    The row kernels take all three strides, so sliced or transposed-batch inputs need no copy;
    only layouts where the middle dims cannot be flattened (reshape's own rule) are copied.
    """
    B, D = x.shape[0], x.shape[-1]
    return x.reshape(B, -1, D)


def row_settings(D: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps) for kernels that hold one whole row of width D in registers."""
    block = next_power_of_2(D)
    if block > 65536:
        raise ValueError(f"feature width {D} is too wide for a one-row-per-program kernel")
    # Enough warps that each thread keeps <= ~16 elements of the row (4 KiB rows: 8 warps).
    num_warps = 4
    if block >= 32768:
        num_warps = 32
    elif block >= 8192:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    return block, num_warps


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int | None:
    """SMs of a CUDA device; :data:`AOT_SM_COUNT` for ``meta`` tensors; None elsewhere (CPU)."""
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "meta":
        return AOT_SM_COUNT
    return None


def grad_chunks(B: int, M: int, device: torch.device) -> int:
    """How many programs per sample reduce (B, D) parameter-like grads over the M rows.

    Each program accumulates its rows' partial sums in registers and writes one (D,) partial;
    torch sums the partials. That is deterministic (no atomics) and keeps the whole GPU busy
    when B is 1 or 2, the usual case for Flux fine-tuning.
    """
    sms = sm_count(device)
    # The interpreter runs programs one after another: a few is as good as many there.
    target = 2 * sms if sms is not None else 4
    return max(1, min(M, cdiv(target, B)))


def persistent_programs(tokens: int, device: torch.device, per_sm: int = 4) -> int:
    """Programs of a persistent kernel striding over ``tokens`` work items."""
    sms = sm_count(device)
    if sms is None:  # interpreter: the count only sets the size of the partial buffers
        return max(1, min(tokens, 8))
    return max(1, min(tokens, per_sm * sms))


def check_launchable(kernel, t: torch.Tensor) -> None:
    # triton decides interpret-vs-compile for every @jit (its own library included) when it is
    # first imported, so CPU tensors need a process that imported triton with TRITON_INTERPRET=1.
    if t.device.type == "cpu" and type(kernel).__name__ != "InterpretedFunction":
        raise RuntimeError(
            "triton kernels on CPU tensors need TRITON_INTERPRET=1 set before triton is first "
            "imported in this process (triton was imported in compile mode)")


def _nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@dataclass
class Launch:
    """One kernel launch: what the op runs and what ``kernels.aot`` compiles.

    ``args`` are the kernel's runtime arguments in order, ``constexprs`` its ``tl.constexpr``
    keywords; ``reads``/``writes`` name the tensors the kernel streams (placeholders for unused
    pointers are left out), from which :meth:`bytes_moved` gives the ideal traffic of the launch.
    """

    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    reads: tuple = ()
    writes: tuple = ()

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        return getattr(fn, "__name__", str(fn))

    def bytes_moved(self) -> tuple[int, int]:
        """(bytes read, bytes written) if each streamed tensor is touched exactly once."""
        return _nbytes(self.reads), _nbytes(self.writes)

    def run(self) -> None:
        first = next(a for a in self.args if isinstance(a, torch.Tensor))
        check_launchable(self.kernel, first)
        if all(g > 0 for g in self.grid):
            self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps)


# --------------------------------------------------------------------------- ptxas -v
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(log: str) -> dict[tuple[str, str | None], dict]:
    """ptxas -v output -> {(function, arch or None): {registers, spill_stores, spill_loads, stack}}."""
    res: dict = {}
    func, arch = None, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([\w$]+)' for '(\w+)'", line)
        if m:
            func, arch = m.group(1), m.group(2)
            res.setdefault((func, arch), {})
            continue
        m = re.search(r"Function properties for ([\w$]+)", line)
        if m:
            if m.group(1) != func:  # a device function's own properties: not the entry
                func = None
            continue
        m = _PTXAS_FRAME.search(line)
        if m and func is not None:
            res[(func, arch)].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                                     spill_loads=int(m.group(3)))
            continue
        m = _PTXAS_USED.search(line)
        if m:
            key = (func, arch) if func is not None else None
            if key is None:  # "Used N registers" follows the entry it belongs to
                key = next(reversed(res), None)
            if key is not None:
                res[key]["registers"] = int(m.group(1))
    return res
