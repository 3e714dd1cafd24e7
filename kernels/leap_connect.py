"""LeapAlign's leap + latent connector + alpha discount as one op (method.md, steps 3-5).

    xhat = x_start - c * v                         the one-step leap (c = k - j, or j)
    conn = xhat + sg(x_real - xhat)                 value of x_real, gradient into xhat
    inp  = alpha * conn + (1 - alpha) * sg(conn)    value of x_real, gradient scaled by alpha
    dist = mean |x_real - xhat| per sample          float64, no gradient (the loss weight)

The forward is one pass: read the three tensors once, write the two value copies of ``x_real``
and a float64 partial sum per block, where the unfused expression runs about ten elementwise
kernels with fp32/fp64 temporaries of the latent's size. The backward is
``g = g_conn + alpha * g_inp``, ``grad_x_start = g``, ``grad_v = -c * g``: one pass, no saved tensor.

``x_start``/``x_real`` may be fp32 latents while ``v`` is the bf16 model output: each tensor is
read in its own dtype and the arithmetic is fp32. ``conn``/``inp`` have ``x_real``'s dtype; each
gradient has the dtype of the input it belongs to. ``x_real`` never receives a gradient.

Backends (``kernels.backend.pick``): ``torch`` (reference under autograd), ``triton`` (kernels
below, wrapped as the custom ops ``leapalign_triton::leap_connect_fwd/bwd``, which also run on
FakeTensors), ``cuda`` (csrc ``leapalign::leap_connect_fwd/bwd``).
"""
from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from kernels import backend
from kernels.backend import jit as _jit, tl  # tl is None where triton is not installed
from kernels.utils import Launch, cdiv, next_power_of_2

OP = "leap_connect"


# --------------------------------------------------------------------------- checks
def _check(x_start, v, x_real, c, alpha) -> tuple[float, float]:
    shapes = (tuple(x_start.shape), tuple(v.shape), tuple(x_real.shape))
    if not (shapes[0] == shapes[1] == shapes[2]):
        raise ValueError(f"{OP}: x_start, v and x_real must have one shape, got "
                         f"x_start {shapes[0]}, v {shapes[1]}, x_real {shapes[2]}")
    if x_start.dim() < 1 or x_start.numel() == 0:
        raise ValueError(f"{OP}: need a non-empty (B, ...) tensor, got shape {shapes[0]}")
    for name, t in (("x_start", x_start), ("v", v), ("x_real", x_real)):
        if not t.is_floating_point():
            raise ValueError(f"{OP}: {name} must be floating point, got {t.dtype}")
        if t.device != x_start.device:
            raise ValueError(f"{OP}: {name} is on {t.device}, x_start on {x_start.device}")
    c, alpha = float(c), float(alpha)
    if not math.isfinite(c):
        raise ValueError(f"{OP}: c must be finite, got {c}")
    if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"{OP}: alpha must be in [0, 1], got {alpha}")
    return c, alpha


# --------------------------------------------------------------------------- reference
def leap_connect_reference(x_start: torch.Tensor, v: torch.Tensor, x_real: torch.Tensor,
                           c: float, alpha: float = 1.0):
    """Plain torch version of :func:`leap_connect` (same outputs, gradients via autograd)."""
    c, alpha = _check(x_start, v, x_real, c, alpha)
    cdt = torch.float32
    for t in (x_start, v, x_real):  # fp32 math; fp64 when given fp64 (for gradcheck)
        cdt = torch.promote_types(cdt, t.dtype)
    xhat = x_start.to(cdt) - c * v.to(cdt)
    x_real = x_real.detach()
    # Written as x_real + (xhat - sg(xhat)) rather than xhat + sg(x_real - xhat): same gradient,
    # but the value is exactly x_real instead of x_real up to a rounding of xhat.
    conn = x_real + (xhat - xhat.detach()).to(x_real.dtype)
    # Likewise sg(conn) + alpha * (conn - sg(conn)) == alpha*conn + (1-alpha)*sg(conn).
    inp = conn.detach() + alpha * (conn - conn.detach())
    with torch.no_grad():
        diff = (x_real.to(cdt) - xhat).abs().to(torch.float64)
        dist = diff.reshape(diff.shape[0], -1).mean(dim=1)
    return conn, inp, dist


# --------------------------------------------------------------------------- triton kernels
@_jit
def _leap_connect_fwd_kernel(
    xs_ptr, v_ptr, xr_ptr, conn_ptr, inp_ptr, part_ptr,
    N, n_blocks, c,
    BLOCK: tl.constexpr,
):
    # grid = (B, n_blocks): one sample's N elements are split over n_blocks programs so that a
    # batch of 1 still fills the GPU; each writes a float64 partial sum, torch adds them up.
    b = tl.program_id(0)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    base = b.to(tl.int64) * N  # int64: B*N may pass 2**31 for big batches of big latents

    xr = tl.load(xr_ptr + base + offs, mask=mask, other=0.0)
    tl.store(conn_ptr + base + offs, xr, mask=mask)
    tl.store(inp_ptr + base + offs, xr, mask=mask)

    xs = tl.load(xs_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    d = tl.abs(xr.to(tl.float32) - (xs - c * v))
    # float64 accumulation: d_j, d_0 set the loss weight and can be tiny late in sampling.
    d = tl.where(mask, d, 0.0).to(tl.float64)
    tl.store(part_ptr + b * n_blocks + blk, tl.sum(d, axis=0))


@_jit
def _leap_connect_bwd_kernel(
    gc_ptr, gi_ptr, gxs_ptr, gv_ptr,
    numel, c, alpha,
    HAS_GC: tl.constexpr, HAS_GI: tl.constexpr,
    WRITE_XS: tl.constexpr, WRITE_V: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.full([BLOCK], 0.0, tl.float32)
    if HAS_GC:
        g += tl.load(gc_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GI:
        g += alpha * tl.load(gi_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if WRITE_XS:
        tl.store(gxs_ptr + offs, g.to(gxs_ptr.dtype.element_ty), mask=mask)
    if WRITE_V:
        tl.store(gv_ptr + offs, (-c * g).to(gv_ptr.dtype.element_ty), mask=mask)


def _block_settings(n: int) -> tuple[int, int]:
    block = min(4096, next_power_of_2(n))
    return block, 8 if block >= 2048 else 4


def fwd_launch(xs: torch.Tensor, v: torch.Tensor, xr: torch.Tensor, c: float):
    """The forward kernel's launch on dense (B, ...) inputs and its outputs: conn, inp (xr's
    dtype) and the float64 per-block partial sums (B, n_blocks) of |x_real - xhat|."""
    B = xs.shape[0]
    N = xs.numel() // B
    conn = torch.empty(xr.shape, dtype=xr.dtype, device=xr.device)
    inp = torch.empty_like(conn)
    BLOCK, num_warps = _block_settings(N)
    n_blocks = cdiv(N, BLOCK)
    part = torch.empty((B, n_blocks), dtype=torch.float64, device=xs.device)
    launch = Launch(_leap_connect_fwd_kernel, (B, n_blocks),
                    (xs, v, xr, conn, inp, part, N, n_blocks, float(c)),
                    dict(BLOCK=BLOCK), num_warps, reads=(xs, v, xr), writes=(conn, inp, part))
    return launch, (conn, inp, part)


def bwd_launch(g_conn, g_inp, c: float, alpha: float, xs_dtype: torch.dtype, v_dtype: torch.dtype,
               write_xs: bool, write_v: bool):
    """The backward kernel's launch on the dense incoming grads (at least one given) and its
    outputs grad_x_start, grad_v in the given dtypes, each 0-element when not written."""
    some = g_conn if g_conn is not None else g_inp
    numel = some.numel()
    shape = some.shape
    gxs = torch.empty(shape if write_xs else (0,), dtype=xs_dtype, device=some.device)
    gv = torch.empty(shape if write_v else (0,), dtype=v_dtype, device=some.device)
    BLOCK, num_warps = _block_settings(numel)
    launch = Launch(
        _leap_connect_bwd_kernel, (cdiv(numel, BLOCK),),
        (g_conn if g_conn is not None else some, g_inp if g_inp is not None else some,
         gxs if write_xs else gv, gv if write_v else gxs, numel, float(c), float(alpha)),
        dict(HAS_GC=g_conn is not None, HAS_GI=g_inp is not None,
             WRITE_XS=bool(write_xs), WRITE_V=bool(write_v), BLOCK=BLOCK), num_warps,
        reads=tuple(g for g in (g_conn, g_inp) if g is not None),
        writes=((gxs,) if write_xs else ()) + ((gv,) if write_v else ()))
    return launch, (gxs, gv)


# Kernels are launched only inside ``torch.library.custom_op``s (namespace ``leapalign_triton``;
# ``leapalign`` is the csrc extension's): torch.compile sees opaque ops with known outputs, and
# FakeTensorMode runs their fake impls, which allocate without launching anything. A custom op
# returns no optional tensors: a gradient that is not wanted comes back as a 0-element tensor.
@torch.library.custom_op("leapalign_triton::leap_connect_fwd", mutates_args=())
def _triton_fwd(xs: torch.Tensor, v: torch.Tensor, xr: torch.Tensor,
                c: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense (B, ...) inputs; returns conn, inp (copies of xr, its dtype) and float64 dist (B,)."""
    launch, (conn, inp, part) = fwd_launch(xs, v, xr, c)
    launch.run()
    return conn, inp, part.sum(dim=1) / (xs.numel() // xs.shape[0])


@_triton_fwd.register_fake
def _(xs, v, xr, c):
    conn = torch.empty(xr.shape, dtype=xr.dtype, device=xr.device)
    dist = torch.empty((xs.shape[0],), dtype=torch.float64, device=xs.device)
    return conn, torch.empty_like(conn), dist


@torch.library.custom_op("leapalign_triton::leap_connect_bwd", mutates_args=())
def _triton_bwd(g_conn: torch.Tensor | None, g_inp: torch.Tensor | None, c: float, alpha: float,
                xs_dtype: torch.dtype, v_dtype: torch.dtype, write_xs: bool, write_v: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense incoming grads (at least one given); returns grad_x_start, grad_v in the given dtypes,
    each 0-element when not written."""
    launch, (gxs, gv) = bwd_launch(g_conn, g_inp, c, alpha, xs_dtype, v_dtype, write_xs, write_v)
    launch.run()
    return gxs, gv


@_triton_bwd.register_fake
def _(g_conn, g_inp, c, alpha, xs_dtype, v_dtype, write_xs, write_v):
    some = g_conn if g_conn is not None else g_inp
    return (torch.empty(some.shape if write_xs else (0,), dtype=xs_dtype, device=some.device),
            torch.empty(some.shape if write_v else (0,), dtype=v_dtype, device=some.device))


# --------------------------------------------------------------------------- cuda (csrc)
def _cuda_ops():
    from kernels import _csrc
    _csrc.load()
    return torch.ops.leapalign


# --------------------------------------------------------------------------- autograd
class LeapConnectFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_start, v, x_real, c, alpha, impl):
        # The kernels index flat (B, N) rows; latents are small (a few MB), so a copy of a
        # strided input is cheaper than a strided N-d kernel. contiguous() is free otherwise.
        xs, vv, xr = x_start.contiguous(), v.contiguous(), x_real.contiguous()
        if impl == "cuda":
            # The csrc op wants x_start and x_real in one dtype: widen both to the wider one,
            # which is exact, so the copy cast back to x_real's dtype is still x_real bit for bit.
            wide = torch.promote_types(xs.dtype, xr.dtype)
            conn, dist = _cuda_ops().leap_connect_fwd(xs.to(wide), vv, xr.to(wide), c)
            conn = conn.to(xr.dtype)
            # conn and inp must be distinct tensors (their gradients differ and callers may
            # write into one), so inp is a second copy of the same latent.
            inp = conn.clone()
        else:
            conn, inp, dist = _triton_fwd(xs, vv, xr, c)
        ctx.mark_non_differentiable(dist)
        ctx.set_materialize_grads(False)
        # Nothing tensor-valued is saved: the backward is a pure scaling.
        ctx.c, ctx.alpha, ctx.impl = c, alpha, impl
        ctx.shape, ctx.xs_dtype, ctx.v_dtype = x_start.shape, x_start.dtype, v.dtype
        return conn, inp, dist

    @staticmethod
    @once_differentiable  # the kernels build no graph: fail loudly on double backward
    def backward(ctx, g_conn, g_inp, _g_dist):
        write_xs, write_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g_conn is None and g_inp is None) or not (write_xs or write_v):
            return None, None, None, None, None, None
        # Incoming grads may be expanded/strided (e.g. from .sum()); the flat kernel wants dense.
        g_conn = g_conn.contiguous() if g_conn is not None else None
        g_inp = g_inp.contiguous() if g_inp is not None else None
        if ctx.impl == "cuda":
            # The csrc backward takes the combined gradient; combine in fp32 like the kernel does.
            # (Never in place: .float() of an fp32 gradient is the caller's tensor itself.)
            if g_inp is None:
                g = g_conn.float()
            elif g_conn is None:
                g = ctx.alpha * g_inp.float()
            else:
                g = g_conn.float() + ctx.alpha * g_inp.float()
            gxs, gv = _cuda_ops().leap_connect_bwd(g, ctx.c)
            gxs = gxs.to(ctx.xs_dtype) if write_xs else None
            gv = gv.to(ctx.v_dtype) if write_v else None
        else:
            gxs, gv = _triton_bwd(g_conn, g_inp, ctx.c, ctx.alpha, ctx.xs_dtype, ctx.v_dtype,
                                  write_xs, write_v)
            gxs = gxs.view(ctx.shape) if write_xs else None
            gv = gv.view(ctx.shape) if write_v else None
        return gxs, gv, None, None, None, None


def leap_connect(x_start: torch.Tensor, v: torch.Tensor, x_real: torch.Tensor, c: float,
                 alpha: float = 1.0):
    """Leap ``xhat = x_start - c*v``, connect to ``x_real``, discount by ``alpha``.

    Returns ``(conn, inp, dist)``: ``conn`` and ``inp`` both hold ``x_real``'s values (its dtype);
    gradients reaching them go to ``x_start`` (as is) and ``v`` (times ``-c``), those through
    ``inp`` scaled by ``alpha``. ``dist`` is the per-sample mean |x_real - xhat|, float64 (B,).
    """
    c, alpha = _check(x_start, v, x_real, c, alpha)
    impl = backend.pick(OP, x_start, v, x_real)
    if impl == "torch":
        return leap_connect_reference(x_start, v, x_real, c, alpha)
    # x_real is detached so that its requires_grad cannot make conn/inp require grad on its own.
    return LeapConnectFunction.apply(x_start, v, x_real.detach(), c, alpha, impl)
