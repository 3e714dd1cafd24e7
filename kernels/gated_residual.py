"""Gated residual ``r = x + gate * y``, optionally followed by the modulated LayerNorm of ``r``.

Flux's blocks end each branch with ``hidden = hidden + gate[:, None] * branch_out`` and, in the
double blocks, immediately normalise the result for the MLP:
``norm2(hidden) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]``. With ``scale``/``shift`` given,
this op does both in one pass over the rows and returns ``(r, n)``; otherwise it returns ``r``.

What backward keeps (the lean choice):
* plain:  ``y`` and ``gate`` only; ``grad_x`` is the incoming gradient itself.
* fused:  ``x``, ``y``, ``gate``, ``scale`` and fp32 mean/rstd per row; ``r`` is recomputed from
  ``x + gate * y`` in the backward kernel instead of being saved. Saving ``r`` or ``x`` costs the
  same bytes for this op alone, but ``x`` is the block's residual-stream input, which the block's
  first modulated LayerNorm already saves (same storage, counted once), whereas ``r`` is a fresh
  tensor nothing else keeps. So recomputing ``r`` makes the fused op's own cost ``y`` plus
  B*M*8 bytes of statistics.

Backends: ``torch`` (reference under autograd), ``triton`` (kernels below, wrapped as the custom
ops ``leapalign_triton::gated_residual[_ln]_fwd/bwd``, which also run on FakeTensors). There is no csrc op
for this one (``LEAPALIGN_BACKEND=cuda`` is refused by ``backend.pick``).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from kernels import backend
from kernels.backend import jit as _jit, tl  # tl is None where triton is not installed
from kernels.mod_layernorm import check_args as _check_mod_ln, mod_layernorm_reference
from kernels.utils import Launch, as_rows, bcast, cdiv, compute_dtype, grad_chunks, row_settings

OP = "gated_residual"


# --------------------------------------------------------------------------- reference
def _check(x, gate, y, scale, shift, eps) -> None:
    if x.dim() < 2:
        raise ValueError(f"{OP}: x must be (B, ..., D), got shape {tuple(x.shape)}")
    if y.shape != x.shape:
        raise ValueError(f"{OP}: y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    want = (x.shape[0], x.shape[-1])
    if tuple(gate.shape) != want:
        raise ValueError(f"{OP}: gate must be (B, D) = {want} for x of shape {tuple(x.shape)}, "
                         f"got {tuple(gate.shape)}")
    for name, t in (("x", x), ("gate", gate), ("y", y)):
        if not t.is_floating_point():
            raise ValueError(f"{OP}: {name} must be floating point, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{OP}: {name} is on {t.device}, x on {x.device}")
    if (scale is None) != (shift is None):
        raise ValueError(f"{OP}: give both scale and shift, or neither")
    if scale is not None:
        _check_mod_ln(x, scale, shift, eps)


def gated_residual_reference(x, gate, y, scale=None, shift=None, eps: float = 1e-6):
    """Plain torch: ``r = x + gate * y`` (fp32 math, x's dtype); with scale/shift also ``n``.

    ``n`` is normalised from the unrounded fp32 ``r``, as the fused kernel does.
    """
    _check(x, gate, y, scale, shift, eps)
    cdt = compute_dtype(x, gate, y)
    r = x.to(cdt) + bcast(gate.to(cdt), x) * y.to(cdt)
    if scale is None:
        return r.to(x.dtype)
    n = mod_layernorm_reference(r, scale, shift, eps)
    return r.to(x.dtype), n.to(x.dtype)


# --------------------------------------------------------------------------- triton kernels
@_jit
def _gated_residual_fwd_kernel(
    x_ptr, gate_ptr, y_ptr, scale_ptr, shift_ptr,
    r_ptr, n_ptr, mean_ptr, rstd_ptr,
    M, D,
    sx_b, sx_m, sx_d,
    sy_b, sy_m, sy_d,
    sg_b, sg_d, ssc_b, ssc_d, ssh_b, ssh_d,
    eps,
    FUSED_LN: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)  # b * M + m: layout of r, n, mean, rstd
    b = (row // M).to(tl.int64)
    m = (row % M).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D

    x = tl.load(x_ptr + b * sx_b + m * sx_m + cols * sx_d, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + b * sy_b + m * sy_m + cols * sy_d, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + b * sg_b + cols * sg_d, mask=mask, other=0.0).to(tl.float32)
    r = x + gate * y
    out = row.to(tl.int64) * D + cols
    tl.store(r_ptr + out, r.to(r_ptr.dtype.element_ty), mask=mask)

    if FUSED_LN:
        # Normalise the fp32 r, not its rounded copy: backward recomputes exactly this value.
        mean = tl.sum(r, axis=0) / D
        rc = tl.where(mask, r - mean, 0.0)
        var = tl.sum(rc * rc, axis=0) / D
        rstd = tl.rsqrt(var + eps)
        scale = tl.load(scale_ptr + b * ssc_b + cols * ssc_d, mask=mask, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + b * ssh_b + cols * ssh_d, mask=mask, other=0.0).to(tl.float32)
        n = rc * rstd * (1.0 + scale) + shift
        tl.store(n_ptr + out, n.to(n_ptr.dtype.element_ty), mask=mask)
        tl.store(mean_ptr + row, mean)
        tl.store(rstd_ptr + row, rstd)


@_jit
def _gated_residual_bwd_kernel(
    gr_ptr, gn_ptr, x_ptr, y_ptr, gate_ptr, scale_ptr, mean_ptr, rstd_ptr,
    gx_ptr, gy_ptr, ggate_part_ptr, gscale_part_ptr, gshift_part_ptr,
    M, D, rows_per_prog, n_chunks,
    sgr_b, sgr_m, sgr_d,
    sgn_b, sgn_m, sgn_d,
    sx_b, sx_m, sx_d,
    sy_b, sy_m, sy_d,
    sg_b, sg_d, ssc_b, ssc_d,
    HAS_GR: tl.constexpr,
    HAS_GN: tl.constexpr,
    WRITE_GX: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    b64 = b.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D

    gate = tl.load(gate_ptr + b64 * sg_b + cols * sg_d, mask=mask, other=0.0).to(tl.float32)
    acc_ggate = tl.full([BLOCK_D], 0.0, tl.float32)
    acc_gscale = tl.full([BLOCK_D], 0.0, tl.float32)
    acc_gshift = tl.full([BLOCK_D], 0.0, tl.float32)
    # Loaded unconditionally (a (D,) row, once per program) so the name exists in every
    # specialisation; without the LN branch scale_ptr is a placeholder and the value is unused.
    one_plus_scale = 1.0 + tl.load(scale_ptr + b64 * ssc_b + cols * ssc_d, mask=mask,
                                   other=0.0).to(tl.float32)

    # int64 bounds give an int64 loop index (offsets below may pass 2**31).
    start = chunk.to(tl.int64) * rows_per_prog
    end = tl.minimum(start + rows_per_prog, M)
    for m64 in range(start, end):
        row = b64 * M + m64
        y = tl.load(y_ptr + b64 * sy_b + m64 * sy_m + cols * sy_d, mask=mask, other=0.0).to(tl.float32)
        g = tl.full([BLOCK_D], 0.0, tl.float32)  # total gradient reaching r
        if HAS_GR:
            g += tl.load(gr_ptr + b64 * sgr_b + m64 * sgr_m + cols * sgr_d, mask=mask,
                         other=0.0).to(tl.float32)
        if HAS_GN:
            x = tl.load(x_ptr + b64 * sx_b + m64 * sx_m + cols * sx_d, mask=mask,
                        other=0.0).to(tl.float32)
            gn = tl.load(gn_ptr + b64 * sgn_b + m64 * sgn_m + cols * sgn_d, mask=mask,
                         other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + row)
            rstd = tl.load(rstd_ptr + row)
            # r recomputed exactly as the forward computed it (same fp32 ops), not saved.
            rhat = tl.where(mask, (x + gate * y - mean) * rstd, 0.0)
            acc_gscale += gn * rhat
            acc_gshift += gn
            ghat = gn * one_plus_scale
            c1 = tl.sum(rhat * ghat, axis=0) / D
            c2 = tl.sum(ghat, axis=0) / D
            g += (ghat - (rhat * c1 + c2)) * rstd
        acc_ggate += g * y
        out = row * D + cols
        if WRITE_GX:
            tl.store(gx_ptr + out, g.to(gx_ptr.dtype.element_ty), mask=mask)
        tl.store(gy_ptr + out, (g * gate).to(gy_ptr.dtype.element_ty), mask=mask)

    part = (b64 * n_chunks + chunk) * D + cols
    tl.store(ggate_part_ptr + part, acc_ggate, mask=mask)
    if HAS_GN:
        tl.store(gscale_part_ptr + part, acc_gscale, mask=mask)
        tl.store(gshift_part_ptr + part, acc_gshift, mask=mask)


# --------------------------------------------------------------------------- triton ops
# Kernels are launched only inside ``torch.library.custom_op``s (namespace ``leapalign_triton``;
# ``leapalign`` is the csrc extension's), so that torch.compile sees opaque ops with known output
# metadata and FakeTensorMode runs their fake impls: under fake tensors the autograd.Function
# below then saves exactly what it saves around the real kernels. A custom op returns no
# optional tensors, hence one op per variant (plain / fused LayerNorm), and an unwritten grad_x
# comes back as a 0-element tensor.
def fwd_launch(x3, gate, y3, scale, shift, eps):
    """The forward kernel's launch and its outputs (r, n, mean, rstd); without scale/shift
    (plain residual) n, mean and rstd are r itself (never written)."""
    B, M, D = x3.shape
    fused = scale is not None
    r = torch.empty((B, M, D), dtype=x3.dtype, device=x3.device)
    if fused:
        n = torch.empty_like(r)
        mean = torch.empty(B * M, dtype=torch.float32, device=x3.device)
        rstd = torch.empty_like(mean)
        sc, sh = scale, shift
    else:
        # Placeholders: the FUSED_LN=False specialisation never touches these pointers.
        n = mean = rstd = r
        sc = sh = gate
    BLOCK_D, num_warps = row_settings(D)
    launch = Launch(
        _gated_residual_fwd_kernel, (B * M,),
        (x3, gate, y3, sc, sh, r, n, mean, rstd, M, D,
         *x3.stride(), *y3.stride(), *gate.stride(), *sc.stride(), *sh.stride(), float(eps)),
        dict(FUSED_LN=fused, BLOCK_D=BLOCK_D), num_warps,
        reads=(x3, gate, y3) + ((scale, shift) if fused else ()),
        writes=(r,) + ((n, mean, rstd) if fused else ()))
    return launch, (r, n, mean, rstd)


def _fwd_run(x3, gate, y3, scale, shift, eps):
    launch, outs = fwd_launch(x3, gate, y3, scale, shift, eps)
    launch.run()
    return outs


@torch.library.custom_op("leapalign_triton::gated_residual_fwd", mutates_args=())
def _triton_fwd(x3: torch.Tensor, gate: torch.Tensor, y3: torch.Tensor) -> torch.Tensor:
    """r = x + gate * y for x3, y3 (B, M, D) of any strides; r dense in x3's dtype."""
    return _fwd_run(x3, gate, y3, None, None, 0.0)[0]


@_triton_fwd.register_fake
def _(x3, gate, y3):
    return torch.empty(x3.shape, dtype=x3.dtype, device=x3.device)


@torch.library.custom_op("leapalign_triton::gated_residual_ln_fwd", mutates_args=())
def _triton_ln_fwd(x3: torch.Tensor, gate: torch.Tensor, y3: torch.Tensor, scale: torch.Tensor,
                   shift: torch.Tensor, eps: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(r, n, mean, rstd): r and n dense (B, M, D) in x3's dtype, fp32 mean/rstd (B*M,)."""
    return _fwd_run(x3, gate, y3, scale, shift, eps)


@_triton_ln_fwd.register_fake
def _(x3, gate, y3, scale, shift, eps):
    B, M, D = x3.shape
    r = torch.empty((B, M, D), dtype=x3.dtype, device=x3.device)
    mean = torch.empty(B * M, dtype=torch.float32, device=x3.device)
    return r, torch.empty_like(r), mean, torch.empty_like(mean)


def bwd_launch(gr3, gn3, x3, y3, gate, scale, mean, rstd, write_gx):
    """The backward kernel's launch and its outputs (grad_x or None, grad_y, and the fp32
    per-program partials (B, n_chunks, D) of grad_gate, grad_scale, grad_shift; the last two are
    the grad_gate buffer itself when no gradient reaches n)."""
    B, M, D = y3.shape
    dev = y3.device
    has_gr, has_gn = gr3 is not None, gn3 is not None
    gx = torch.empty((B, M, D), dtype=x3.dtype, device=dev) if write_gx else None
    gy = torch.empty((B, M, D), dtype=y3.dtype, device=dev)
    n_chunks = grad_chunks(B, M, dev)
    rows_per_prog = cdiv(M, n_chunks)
    ggate_part = torch.empty((B, n_chunks, D), dtype=torch.float32, device=dev)
    gscale_part = torch.empty_like(ggate_part) if has_gn else ggate_part
    gshift_part = torch.empty_like(ggate_part) if has_gn else ggate_part
    # Unused pointers get any valid tensor; their constexpr branches are compiled out.
    gr_arg = gr3 if has_gr else y3
    gn_arg = gn3 if has_gn else y3
    x_arg = x3 if x3 is not None else y3
    sc_arg = scale if scale is not None else gate
    mean_arg = mean if mean is not None else ggate_part
    rstd_arg = rstd if rstd is not None else ggate_part
    BLOCK_D, num_warps = row_settings(D)
    launch = Launch(
        _gated_residual_bwd_kernel, (B, n_chunks),
        (gr_arg, gn_arg, x_arg, y3, gate, sc_arg, mean_arg, rstd_arg,
         gx if write_gx else gy, gy, ggate_part, gscale_part, gshift_part,
         M, D, rows_per_prog, n_chunks,
         *gr_arg.stride(), *gn_arg.stride(), *x_arg.stride(), *y3.stride(),
         *gate.stride(), *sc_arg.stride()),
        dict(HAS_GR=has_gr, HAS_GN=has_gn, WRITE_GX=bool(write_gx), BLOCK_D=BLOCK_D), num_warps,
        reads=(y3, gate) + ((gr3,) if has_gr else ()) + ((gn3, x3, scale, mean, rstd) if has_gn else ()),
        writes=(gy, ggate_part) + ((gx,) if write_gx else ()) + ((gscale_part, gshift_part) if has_gn else ()))
    return launch, (gx, gy, ggate_part, gscale_part, gshift_part)


def _bwd_run(gr3, gn3, x3, y3, gate, scale, mean, rstd, write_gx):
    launch, (gx, gy, ggate_part, gscale_part, gshift_part) = bwd_launch(
        gr3, gn3, x3, y3, gate, scale, mean, rstd, write_gx)
    launch.run()
    has_gn = gn3 is not None
    gscale = gscale_part.sum(1) if has_gn else None
    gshift = gshift_part.sum(1) if has_gn else None
    return gx, gy, ggate_part.sum(1), gscale, gshift


@torch.library.custom_op("leapalign_triton::gated_residual_bwd", mutates_args=())
def _triton_bwd(gr3: torch.Tensor, y3: torch.Tensor, gate: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Only the gradient reaching r: (grad_y dense in y3's dtype, fp32 grad_gate (B, D)).
    grad_x is gr3 itself and needs no kernel."""
    _, gy, ggate, _, _ = _bwd_run(gr3, None, None, y3, gate, None, None, None, False)
    return gy, ggate


@_triton_bwd.register_fake
def _(gr3, y3, gate):
    B, M, D = y3.shape
    return (torch.empty((B, M, D), dtype=y3.dtype, device=y3.device),
            torch.empty((B, D), dtype=torch.float32, device=y3.device))


@torch.library.custom_op("leapalign_triton::gated_residual_ln_bwd", mutates_args=())
def _triton_ln_bwd(gr3: torch.Tensor | None, gn3: torch.Tensor, x3: torch.Tensor, y3: torch.Tensor,
                   gate: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                   write_gx: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A gradient reaches n (and maybe r): (grad_x, grad_y, grad_gate, grad_scale, grad_shift);
    grad_x/grad_y dense in x3's/y3's dtype (grad_x 0-element unless write_gx), the rest fp32 (B, D)."""
    gx, gy, ggate, gscale, gshift = _bwd_run(gr3, gn3, x3, y3, gate, scale, mean, rstd, write_gx)
    if gx is None:
        gx = x3.new_empty(0)
    return gx, gy, ggate, gscale, gshift


@_triton_ln_bwd.register_fake
def _(gr3, gn3, x3, y3, gate, scale, mean, rstd, write_gx):
    B, M, D = y3.shape
    gx = torch.empty((B, M, D) if write_gx else (0,), dtype=x3.dtype, device=y3.device)
    gy = torch.empty((B, M, D), dtype=y3.dtype, device=y3.device)
    ggate = torch.empty((B, D), dtype=torch.float32, device=y3.device)
    return gx, gy, ggate, torch.empty_like(ggate), torch.empty_like(ggate)


# --------------------------------------------------------------------------- autograd
class GatedResidualFunction(torch.autograd.Function):
    """Triton path; outputs ``(r,)`` or ``(r, n)``."""

    @staticmethod
    def forward(ctx, x, gate, y, scale, shift, eps):
        fused = scale is not None
        x3, y3 = as_rows(x), as_rows(y)
        ctx.set_materialize_grads(False)
        ctx.fused = fused
        ctx.shape = x.shape
        ctx.dtypes = (x.dtype, gate.dtype, y.dtype,
                      scale.dtype if fused else None, shift.dtype if fused else None)
        if fused:
            r, n, mean, rstd = _triton_ln_fwd(x3, gate, y3, scale, shift, eps)
            # x3/y3 are views of the inputs when possible: no new storage for x or y.
            ctx.save_for_backward(x3, y3, gate, scale, mean, rstd)
            return r.view(x.shape), n.view(x.shape)
        r = _triton_fwd(x3, gate, y3)
        ctx.save_for_backward(y3, gate)
        return r.view(x.shape)

    @staticmethod
    @once_differentiable  # the kernels build no graph: fail loudly on double backward
    def backward(ctx, *grads):
        need = ctx.needs_input_grad
        if ctx.fused:
            g_r, g_n = grads
            x3, y3, gate, scale, mean, rstd = ctx.saved_tensors
        else:
            (g_r,), g_n = grads, None
            y3, gate = ctx.saved_tensors
        if g_r is None and g_n is None:
            return None, None, None, None, None, None
        shape3 = y3.shape
        gr3 = g_r.reshape(shape3) if g_r is not None else None
        x_dt, gate_dt, y_dt, sc_dt, sh_dt = ctx.dtypes
        if g_n is None:
            # Only r reached the loss (always so without the LN branch): grad_x is the incoming
            # gradient itself, no kernel write needed.
            gy, ggate = _triton_bwd(gr3, y3, gate)
            gx = g_r.to(x_dt) if need[0] else None
            gscale = gshift = None
        else:
            gx, gy, ggate, gscale, gshift = _triton_ln_bwd(
                gr3, g_n.reshape(shape3), x3, y3, gate, scale, mean, rstd, need[0])
            gx = gx.view(ctx.shape) if need[0] else None
        return (gx,
                ggate.to(gate_dt) if need[1] else None,
                gy.view(ctx.shape) if need[2] else None,
                gscale.to(sc_dt) if need[3] and gscale is not None else None,
                gshift.to(sh_dt) if need[4] and gshift is not None else None,
                None)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor,
                   scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                   eps: float = 1e-6):
    """``r = x + gate * y`` for x, y (B, ..., D), gate (B, D); returns r, or (r, n) with
    ``n = mod_layernorm(r, scale, shift, eps)`` when scale/shift are given. Outputs have x's dtype."""
    _check(x, gate, y, scale, shift, eps)
    impl = backend.pick(OP, x, gate, y, scale, shift)
    if impl == "torch":
        return gated_residual_reference(x, gate, y, scale, shift, eps)
    if impl == "triton":
        return GatedResidualFunction.apply(x, gate, y, scale, shift, float(eps))
    raise RuntimeError(f"{OP} has no {impl!r} implementation")
