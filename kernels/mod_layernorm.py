"""Modulated LayerNorm: ``LayerNorm(x, no affine) * (1 + scale) + shift``, fused.

This is Flux's AdaLayerNormZero modulation, ``norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]``,
where ``x`` is (B, ..., D) and ``scale``/``shift`` are per-sample (B, D) vectors broadcast over the
token dims. Plain autograd keeps the normalised activations (and a second copy after the
multiply) alive for backward; this op keeps only ``x``, one fp32 mean and rstd per row and
``scale`` (B, D), and recomputes ``xhat`` in the backward kernel. ``x`` is usually held anyway
(it is the residual stream), so the op adds almost nothing to the saved bytes.

Backends (``kernels.backend.pick``): ``torch`` runs :func:`mod_layernorm_reference` under plain
autograd, ``triton`` the kernels below (wrapped as the custom ops
``leapalign_triton::mod_layernorm_fwd/bwd``, which also run on FakeTensors), ``cuda`` the csrc ops
``leapalign::mod_layernorm_fwd/bwd``.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
import torch.nn.functional as F

from kernels import backend
from kernels.backend import jit as _jit, tl  # tl is None where triton is not installed
from kernels.utils import Launch, as_rows, bcast, cdiv, compute_dtype, grad_chunks, row_settings

OP = "mod_layernorm"


# --------------------------------------------------------------------------- reference
def _check(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> None:
    if x.dim() < 2:
        raise ValueError(f"{OP}: x must be (B, ..., D), got shape {tuple(x.shape)}")
    want = (x.shape[0], x.shape[-1])
    for name, t in (("scale", scale), ("shift", shift)):
        if tuple(t.shape) != want:
            raise ValueError(
                f"{OP}: {name} must be (B, D) = {want} for x of shape {tuple(x.shape)}, "
                f"got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{OP}: {name} is on {t.device}, x on {x.device}")
    for name, t in (("x", x), ("scale", scale), ("shift", shift)):
        if not t.is_floating_point():
            raise ValueError(f"{OP}: {name} must be floating point, got {t.dtype}")
    if not (eps > 0):
        raise ValueError(f"{OP}: eps must be > 0, got {eps}")


check_args = _check  # public: gated_residual validates its LayerNorm arguments with it


def mod_layernorm_reference(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                            eps: float = 1e-6) -> torch.Tensor:
    """Plain torch: LayerNorm without affine, then ``* (1 + scale) + shift``; fp32 math, x's dtype out."""
    _check(x, scale, shift, eps)
    cdt = compute_dtype(x, scale, shift)
    n = F.layer_norm(x.to(cdt), (x.shape[-1],), eps=eps)
    y = n * (1 + bcast(scale.to(cdt), x)) + bcast(shift.to(cdt), x)
    return y.to(x.dtype)


# --------------------------------------------------------------------------- triton kernels
@_jit
def _mod_ln_fwd_kernel(
    x_ptr, scale_ptr, shift_ptr, y_ptr, mean_ptr, rstd_ptr,
    M, D,
    sx_b, sx_m, sx_d,
    ssc_b, ssc_d, ssh_b, ssh_d,
    eps,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)  # row = b * M + m, the layout of mean/rstd and of y
    b = (row // M).to(tl.int64)  # int64: B*M*D can pass 2**31 at large batch x resolution
    m = (row % M).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D

    x = tl.load(x_ptr + b * sx_b + m * sx_m + cols * sx_d, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(mask, x - mean, 0.0)  # padding lanes must not enter the variance
    var = tl.sum(xc * xc, axis=0) / D
    rstd = tl.rsqrt(var + eps)

    scale = tl.load(scale_ptr + b * ssc_b + cols * ssc_d, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + b * ssh_b + cols * ssh_d, mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd * (1.0 + scale) + shift

    tl.store(y_ptr + row.to(tl.int64) * D + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@_jit
def _mod_ln_bwd_kernel(
    gy_ptr, x_ptr, scale_ptr, mean_ptr, rstd_ptr,
    gx_ptr, gscale_part_ptr, gshift_part_ptr,
    M, D, rows_per_prog, n_chunks,
    sg_b, sg_m, sg_d,
    sx_b, sx_m, sx_d,
    ssc_b, ssc_d,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    b64 = b.to(tl.int64)

    one_plus_scale = 1.0 + tl.load(scale_ptr + b64 * ssc_b + cols * ssc_d, mask=mask,
                                   other=0.0).to(tl.float32)
    acc_gscale = tl.full([BLOCK_D], 0.0, tl.float32)
    acc_gshift = tl.full([BLOCK_D], 0.0, tl.float32)

    # int64 bounds give an int64 loop index (offsets below may pass 2**31).
    start = chunk.to(tl.int64) * rows_per_prog
    end = tl.minimum(start + rows_per_prog, M)
    for m64 in range(start, end):
        row = b64 * M + m64
        x = tl.load(x_ptr + b64 * sx_b + m64 * sx_m + cols * sx_d, mask=mask, other=0.0).to(tl.float32)
        gy = tl.load(gy_ptr + b64 * sg_b + m64 * sg_m + cols * sg_d, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        # Recomputing xhat costs one subtract and one multiply; saving it would cost a full
        # activation per call.
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        acc_gscale += gy * xhat
        acc_gshift += gy
        gxhat = gy * one_plus_scale
        c1 = tl.sum(xhat * gxhat, axis=0) / D
        c2 = tl.sum(gxhat, axis=0) / D
        gx = (gxhat - (xhat * c1 + c2)) * rstd
        tl.store(gx_ptr + row * D + cols, gx.to(gx_ptr.dtype.element_ty), mask=mask)

    part = (b64 * n_chunks + chunk) * D + cols
    tl.store(gscale_part_ptr + part, acc_gscale, mask=mask)
    tl.store(gshift_part_ptr + part, acc_gshift, mask=mask)


# --------------------------------------------------------------------------- triton ops
# The kernels are launched only from inside ``torch.library.custom_op``s, never directly from the
# autograd.Function: a custom op is opaque to torch.compile (one node in the graph, its fake impl
# gives the output metadata) and runs on FakeTensors, where its fake impl allocates the same
# outputs (y, and the fp32 mean/rstd that backward keeps) without launching anything. So under
# FakeTensorMode the Function below saves exactly the tensors the kernels would, and a fake
# full-size model measures the real saved bytes. The ops live in ``leapalign_triton``: the
# ``leapalign`` namespace belongs to the csrc extension's TORCH_LIBRARY.
def fwd_launch(x3: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float):
    """The forward kernel's launch on x3 (B, M, D) of any strides, and its outputs
    (y (B, M, D) dense in x3's dtype, fp32 mean and rstd (B*M,)), allocated on x3's device."""
    B, M, D = x3.shape
    y = torch.empty((B, M, D), dtype=x3.dtype, device=x3.device)
    mean = torch.empty(B * M, dtype=torch.float32, device=x3.device)
    rstd = torch.empty(B * M, dtype=torch.float32, device=x3.device)
    BLOCK_D, num_warps = row_settings(D)
    launch = Launch(
        _mod_ln_fwd_kernel, (B * M,),
        (x3, scale, shift, y, mean, rstd, M, D,
         *x3.stride(), *scale.stride(), *shift.stride(), float(eps)),
        dict(BLOCK_D=BLOCK_D), num_warps,
        reads=(x3, scale, shift), writes=(y, mean, rstd))
    return launch, (y, mean, rstd)


@torch.library.custom_op("leapalign_triton::mod_layernorm_fwd", mutates_args=())
def _triton_fwd(x3: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x3 (B, M, D), any strides; returns y (B, M, D) dense in x3's dtype, fp32 mean, rstd (B*M,)."""
    launch, outs = fwd_launch(x3, scale, shift, eps)
    launch.run()
    return outs


@_triton_fwd.register_fake
def _(x3, scale, shift, eps):
    B, M, D = x3.shape
    y = torch.empty((B, M, D), dtype=x3.dtype, device=x3.device)
    mean = torch.empty(B * M, dtype=torch.float32, device=x3.device)
    return y, mean, torch.empty_like(mean)


def bwd_launch(gy3: torch.Tensor, x3: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor,
               rstd: torch.Tensor):
    """The backward kernel's launch and its outputs: grad_x (B, M, D) dense in x3's dtype and the
    fp32 per-program partials of grad_scale, grad_shift (B, n_chunks, D)."""
    B, M, D = x3.shape
    gx = torch.empty((B, M, D), dtype=x3.dtype, device=x3.device)
    n_chunks = grad_chunks(B, M, x3.device)
    rows_per_prog = cdiv(M, n_chunks)
    gscale_part = torch.empty((B, n_chunks, D), dtype=torch.float32, device=x3.device)
    gshift_part = torch.empty_like(gscale_part)
    BLOCK_D, num_warps = row_settings(D)
    launch = Launch(
        _mod_ln_bwd_kernel, (B, n_chunks),
        (gy3, x3, scale, mean, rstd, gx, gscale_part, gshift_part,
         M, D, rows_per_prog, n_chunks,
         *gy3.stride(), *x3.stride(), *scale.stride()),
        dict(BLOCK_D=BLOCK_D), num_warps,
        reads=(gy3, x3, scale, mean, rstd), writes=(gx, gscale_part, gshift_part))
    return launch, (gx, gscale_part, gshift_part)


@torch.library.custom_op("leapalign_triton::mod_layernorm_bwd", mutates_args=())
def _triton_bwd(gy3: torch.Tensor, x3: torch.Tensor, scale: torch.Tensor,
                mean: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns grad_x (B, M, D) dense in x3's dtype and fp32 grad_scale, grad_shift (B, D)."""
    launch, (gx, gscale_part, gshift_part) = bwd_launch(gy3, x3, scale, mean, rstd)
    launch.run()
    return gx, gscale_part.sum(1), gshift_part.sum(1)


@_triton_bwd.register_fake
def _(gy3, x3, scale, mean, rstd):
    B, M, D = x3.shape
    gx = torch.empty((B, M, D), dtype=x3.dtype, device=x3.device)
    gscale = torch.empty((B, D), dtype=torch.float32, device=x3.device)
    return gx, gscale, torch.empty_like(gscale)


# --------------------------------------------------------------------------- cuda (csrc) wrappers
def _cuda_ops():
    from kernels import _csrc
    _csrc.load()
    return torch.ops.leapalign


def _cuda_fwd(x3, scale, shift, eps):
    # The csrc contract takes dense (B, M, D) / (B, D) tensors of one dtype.
    return _cuda_ops().mod_layernorm_fwd(x3.contiguous(), scale.to(x3.dtype).contiguous(),
                                         shift.to(x3.dtype).contiguous(), float(eps))


def _cuda_bwd(gy3, x3, scale, mean, rstd):
    return _cuda_ops().mod_layernorm_bwd(gy3.contiguous(), x3, scale, mean, rstd)


# --------------------------------------------------------------------------- autograd
class ModLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, shift, eps, impl):
        x3 = as_rows(x)
        if impl == "cuda":
            x3 = x3.contiguous()
            scale_s = scale.to(x.dtype).contiguous()
            y, mean, rstd = _cuda_fwd(x3, scale_s, shift, eps)
        else:
            scale_s = scale
            y, mean, rstd = _triton_fwd(x3, scale, shift, eps)
        # x3 is a view of x whenever possible, so this usually shares x's storage.
        ctx.save_for_backward(x3, scale_s, mean, rstd)
        ctx.impl = impl
        ctx.dtypes = (x.dtype, scale.dtype, shift.dtype)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    @once_differentiable  # the kernels build no graph: fail loudly on double backward
    def backward(ctx, gy):
        x3, scale_s, mean, rstd = ctx.saved_tensors
        gy3 = gy.reshape(x3.shape)
        if ctx.impl == "cuda":
            gx, gscale, gshift = _cuda_bwd(gy3, x3, scale_s, mean, rstd)
        else:
            gx, gscale, gshift = _triton_bwd(gy3, x3, scale_s, mean, rstd)
        x_dt, sc_dt, sh_dt = ctx.dtypes
        need = ctx.needs_input_grad
        return (gx.to(x_dt).view(ctx.x_shape) if need[0] else None,
                gscale.to(sc_dt) if need[1] else None,
                gshift.to(sh_dt) if need[2] else None,
                None, None)


def mod_layernorm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                  eps: float = 1e-6) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale) + shift`` for x (B, ..., D), scale/shift (B, D); y has x's dtype."""
    _check(x, scale, shift, eps)
    impl = backend.pick(OP, x, scale, shift)
    if impl == "torch":
        return mod_layernorm_reference(x, scale, shift, eps)
    return ModLayerNormFunction.apply(x, scale, shift, float(eps), impl)
