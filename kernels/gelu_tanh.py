"""GELU with the tanh approximation (Flux's MLP activation), saving only its input.

``torch.nn.functional.gelu(x, approximate="tanh")`` under autograd saves its input too, but the
point of this op is to sit inside a lean block whose backward must not hold anything else, and to
compute in fp32 whatever the storage dtype: forward writes one tensor, backward reads x and dy
and recomputes tanh.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from kernels import backend
from kernels.backend import jit as _jit, tl  # tl is None where triton is not installed
from kernels.utils import Launch, cdiv

OP = "gelu_tanh"


# ----------------------------------------------------------------------------- torch reference
def gelu_tanh_reference(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")


# ----------------------------------------------------------------------------- Triton kernels
@_jit
def _tanh(u):
    # Built from exp so it runs under TRITON_INTERPRET (libdevice externs do not); exp(-2|u|) never
    # overflows, and the sign is restored afterwards.
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -t, t)


# Literals below: sqrt(2/pi) = 0.7978845608028654 and kappa = 0.044715 (inlined because jit code can
# read only constexpr globals).
@_jit
def _gelu_tanh_fwd_kernel(X, Y, n_elements, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    t = _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
    tl.store(Y + offs, (0.5 * x * (1.0 + t)).to(Y.dtype.element_ty), mask=mask)


@_jit
def _gelu_tanh_bwd_kernel(X, DY, DX, n_elements, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = x * x
    t = _tanh(0.7978845608028654 * (x + 0.044715 * x2 * x))
    # d/dx [x/2 (1 + t)] = (1 + t)/2 + x/2 (1 - t^2) sqrt(2/pi) (1 + 3 kappa x^2), same split as
    # torch's GeluBackward so fp32 results agree to rounding.
    dgelu = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x2)
    tl.store(DX + offs, (dy * dgelu).to(DX.dtype.element_ty), mask=mask)


_BLOCK = 1024  # 8 elements per thread at 4 warps: 16-byte vector accesses for bf16/fp16


def _flat(x: torch.Tensor) -> torch.Tensor:
    # The kernels index a flat buffer. A strided view is copied once rather than carrying N-d index
    # math: in Flux the activation's input is a Linear output, so this copy does not happen there.
    return x if x.is_contiguous() else x.contiguous()


def fwd_launch(x: torch.Tensor):
    """The forward kernel's launch on a dense x and its output (dense, x's dtype)."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # as the fake impl: dense strides
    n = x.numel()
    return Launch(_gelu_tanh_fwd_kernel, (cdiv(n, _BLOCK),), (x, y, n), dict(BLOCK=_BLOCK), 4,
                  reads=(x,), writes=(y,)), y


def bwd_launch(x: torch.Tensor, dy: torch.Tensor):
    """The backward kernel's launch on dense x, dy and its output dx (dense, x's dtype)."""
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n = x.numel()
    return Launch(_gelu_tanh_bwd_kernel, (cdiv(n, _BLOCK),), (x, dy, dx, n), dict(BLOCK=_BLOCK), 4,
                  reads=(x, dy), writes=(dx,)), dx


# Kernels are launched only inside ``torch.library.custom_op``s (namespace ``leapalign_triton``;
# ``leapalign`` is the csrc extension's): torch.compile sees opaque ops with known outputs, and
# under FakeTensorMode their fake impls allocate the output without launching anything, so the
# autograd.Function below saves the same tensor (the dense input) on fake tensors as on real ones.
@torch.library.custom_op("leapalign_triton::gelu_tanh_fwd", mutates_args=())
def _triton_fwd(x: torch.Tensor) -> torch.Tensor:
    """y = gelu_tanh(x), dense, x's dtype; x is read as a flat buffer (copied if strided)."""
    launch, y = fwd_launch(_flat(x))
    launch.run()  # a no-op for an empty x (zero programs)
    return y


@_triton_fwd.register_fake
def _(x):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("leapalign_triton::gelu_tanh_bwd", mutates_args=())
def _triton_bwd(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """dx = dy * gelu_tanh'(x), dense, x's dtype."""
    launch, dx = bwd_launch(_flat(x), _flat(dy))
    launch.run()
    return dx


@_triton_bwd.register_fake
def _(x, dy):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


class GeluTanhFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        # Made dense here, not only inside the op, because this is the tensor backward keeps.
        x = _flat(x)
        ctx.save_for_backward(x)
        return _triton_fwd(x)

    @staticmethod
    @once_differentiable  # the kernels build no graph: fail loudly on double backward
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return _triton_bwd(x, dy)


# ----------------------------------------------------------------------------- entry point
def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """``gelu(x, approximate="tanh")``, any shape, fp32/bf16/fp16; output is contiguous."""
    which = backend.pick(OP, x)
    if which == "torch":
        return gelu_tanh_reference(x)
    if which == "triton":
        return GeluTanhFunction.apply(x)
    raise RuntimeError(f"{OP} has no {which!r} implementation")
