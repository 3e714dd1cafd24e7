"""Flux attention's QK RMSNorm + rotary embedding, fused: q and k in one kernel launch.

What it replaces (diffusers ``FluxAttnProcessor``)::

    q = attn.norm_q(q); k = attn.norm_k(k)                    # torch.nn.RMSNorm(Dh, eps=1e-6)
    eq = attn.norm_added_q(eq); ek = attn.norm_added_k(ek)    # double blocks: text tokens
    q = cat([eq, q], dim=1); k = cat([ek, k], dim=1)          # text BEFORE image
    q = apply_rotary_emb(q, (cos, sin), sequence_dim=1)       # interleaved pairs, cos/sin (N, Dh)
    k = apply_rotary_emb(k, (cos, sin), sequence_dim=1)

``qk_norm_rope(q, k, wq, wk, cos, sin, wq_txt=..., wk_txt=..., n_txt=...)`` takes the already
concatenated (B, N, H, Dh) q and k: tokens ``[0, n_txt)`` use the text weights, the rest the image
weights, so a double block is one call and a single block passes ``n_txt=0``.

Numerics follow what FluxAttention actually runs. In diffusers 0.42 its ``norm_q``/``norm_k`` are
``torch.nn.RMSNorm`` (not diffusers' own ``RMSNorm``), and torch >= 2.8 computes
``x * rsqrt(mean(x^2) + eps) * w`` in fp32 and rounds once to the *input* dtype (also when the
weight is fp32 while activations are bf16, e.g. layerwise casting that keeps norms in fp32).
diffusers' ``RMSNorm`` instead rounds ``x * rstd`` to the weight dtype before multiplying: one
extra bf16 rounding, identical in fp32; the tests check against both. ``apply_rotary_emb`` then computes in fp32
and rounds to the dtype of its input. The Triton kernel reproduces both roundings, so it matches
the module it stands in for, not merely a more exact value.

Memory: backward saves q and k (pre-norm, as given: when they are views of a fused qkv projection
that storage is kept alive by attention's saved v anyway), one fp32 rstd per (token, head), and
the weights and cos/sin tables (parameters, and tables shared by every block); the normalised,
rotated tensors are recomputed.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from kernels import backend
from kernels.backend import jit as _jit, tl  # tl is None where triton is not installed
from kernels.utils import Launch, next_power_of_2, persistent_programs

OP = "qk_norm_rope"


# ----------------------------------------------------------------------------- torch reference
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 for fp32/bf16/fp16, fp64 stays fp64 so the reference can be gradchecked.
    return torch.promote_types(dtype, torch.float32)


def rms_norm_reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """``torch.nn.RMSNorm(Dh, eps)`` on the last dim, as torch >= 2.8 computes it."""
    cdt = _compute_dtype(x.dtype)
    xf = x.to(cdt)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.to(cdt)
    return y.to(x.dtype)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers ``apply_rotary_emb(x, (cos, sin), use_real_unbind_dim=-1, sequence_dim=1)`` for
    x of shape (..., N, H, Dh) and cos/sin of shape (N, Dh)."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rot = torch.stack([-x_imag, x_real], dim=-1).flatten(-2)
    cdt = _compute_dtype(x.dtype)
    return (x.to(cdt) * cos + x_rot.to(cdt) * sin).to(x.dtype)


def qk_norm_rope_reference(q, k, wq, wk, cos, sin, eps=1e-6, *, wq_txt=None, wk_txt=None, n_txt=0):
    """Plain torch: per-token-range RMSNorm of q and k, then Flux RoPE. q, k: (..., N, H, Dh)."""
    _check(q, k, wq, wk, cos, sin, wq_txt, wk_txt, n_txt)

    def norm(x, w_img, w_txt):
        if n_txt == 0:
            return rms_norm_reference(x, w_img, eps)
        txt, img = x.split([n_txt, x.shape[-3] - n_txt], dim=-3)
        return torch.cat([rms_norm_reference(txt, w_txt, eps), rms_norm_reference(img, w_img, eps)], dim=-3)

    return rope_reference(norm(q, wq, wq_txt), cos, sin), rope_reference(norm(k, wk, wk_txt), cos, sin)


def _check(q, k, wq, wk, cos, sin, wq_txt, wk_txt, n_txt):
    if q.shape != k.shape or q.dim() < 3:
        raise ValueError(f"q and k must share a (..., N, H, Dh) shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    n, dh = q.shape[-3], q.shape[-1]
    if dh % 2:
        raise ValueError(f"head dim must be even for interleaved RoPE, got {dh}")
    if cos.shape != (n, dh) or sin.shape != (n, dh):
        raise ValueError(f"cos/sin must be ({n}, {dh}), got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.device != q.device or sin.device != q.device:
        raise ValueError(f"cos/sin are on {cos.device}/{sin.device}, q on {q.device}")
    if not 0 <= n_txt <= n:
        raise ValueError(f"n_txt must be in [0, {n}], got {n_txt}")
    if n_txt > 0 and (wq_txt is None or wk_txt is None):
        raise ValueError("n_txt > 0 needs both wq_txt and wk_txt")
    for name, w in (("wq", wq), ("wk", wk), ("wq_txt", wq_txt), ("wk_txt", wk_txt)):
        if w is not None and w.shape != (dh,):
            raise ValueError(f"{name} must be ({dh},), got {tuple(w.shape)}")


# ----------------------------------------------------------------------------- Triton kernels
# Layout: a program owns whole tokens and walks their heads in (BLOCK_H, BLOCK_D) tiles, so cos/sin
# and the weights are read once per token and the RMSNorm reduction (over Dh) stays inside a tile
# row. RoPE's pair partner x[d ^ 1] is read with a second, permuted load of the same tile: it hits
# the lines the first load just brought into L1, so DRAM traffic is unchanged, and it avoids the
# register shuffles (and spills, measured with ptxas for sm_90) of reshape/split/join.
@_jit
def _fwd_tensor(X, sx_b, sx_n, sx_h, sx_d, O, sy_b, sy_n, sy_h, sy_d, RSTD, W_img, W_txt,
                b, n, t, is_txt, cos, ssin, H, D, eps,
                BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    dp = d ^ 1
    dmask = d < D
    w = tl.load(tl.where(is_txt, W_txt, W_img) + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    wp = tl.load(tl.where(is_txt, W_txt, W_img) + dp, mask=dmask, other=0.0).to(tl.float32)[None, :]
    x_row = X + b * sx_b + n * sx_n
    o_row = O + b * sy_b + n * sy_n
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (h < H)[:, None] & dmask[None, :]
        x_tile = x_row + h[:, None] * sx_h
        x = tl.load(x_tile + d[None, :] * sx_d, mask=mask, other=0.0).to(tl.float32)
        xp = tl.load(x_tile + dp[None, :] * sx_d, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        tl.store(RSTD + t * H + h, rstd, mask=h < H)
        # RMSNorm's output is rounded to the activation dtype before RoPE reads it, as in the
        # module this replaces.
        y = (x * rstd[:, None] * w).to(O.dtype.element_ty).to(tl.float32)
        yp = (xp * rstd[:, None] * wp).to(O.dtype.element_ty).to(tl.float32)
        out = y * cos + yp * ssin
        tl.store(o_row + h[:, None] * sy_h + d[None, :] * sy_d, out.to(O.dtype.element_ty), mask=mask)


@_jit
def _qk_norm_rope_fwd_kernel(
    Q, sq_b, sq_n, sq_h, sq_d, K, sk_b, sk_n, sk_h, sk_d,
    QO, sqo_b, sqo_n, sqo_h, sqo_d, KO, sko_b, sko_n, sko_h, sko_d,
    RSTD_Q, RSTD_K, WQ, WK, WQ_TXT, WK_TXT,
    COS, SIN, sc_n, sc_d,
    N, H, D, n_txt, eps,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    b = t // N
    n = t % N
    is_txt = n < n_txt
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    cos = tl.load(COS + n * sc_n + d * sc_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(SIN + n * sc_n + d * sc_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    # rot(y) = (-y[2i+1], y[2i]) per pair, i.e. rot(y)[d] = -+ y[d ^ 1]: fold the sign into sin.
    ssin = tl.where((d % 2 == 0)[None, :], -sin, sin)
    _fwd_tensor(Q, sq_b, sq_n, sq_h, sq_d, QO, sqo_b, sqo_n, sqo_h, sqo_d, RSTD_Q, WQ, WQ_TXT,
                b, n, t, is_txt, cos, ssin, H, D, eps, BLOCK_H, BLOCK_D)
    _fwd_tensor(K, sk_b, sk_n, sk_h, sk_d, KO, sko_b, sko_n, sko_h, sko_d, RSTD_K, WK, WK_TXT,
                b, n, t, is_txt, cos, ssin, H, D, eps, BLOCK_H, BLOCK_D)


@_jit
def _bwd_tensor(X, sx_b, sx_n, sx_h, sx_d, G, sg_b, sg_n, sg_h, sg_d, DX, sdx_b, sdx_n, sdx_h, sdx_d,
                RSTD, W_img, W_txt, b, n, t, is_txt, cos, tsin, H, D,
                BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    dp = d ^ 1
    dmask = d < D
    w = tl.load(tl.where(is_txt, W_txt, W_img) + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    x_row = X + b * sx_b + n * sx_n
    g_row = G + b * sg_b + n * sg_n
    dx_row = DX + b * sdx_b + n * sdx_n
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (h < H)[:, None] & dmask[None, :]
        x = tl.load(x_row + h[:, None] * sx_h + d[None, :] * sx_d, mask=mask, other=0.0).to(tl.float32)
        g_tile = g_row + h[:, None] * sg_h
        g = tl.load(g_tile + d[None, :] * sg_d, mask=mask, other=0.0).to(tl.float32)
        gp = tl.load(g_tile + dp[None, :] * sg_d, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + t * H + h, mask=h < H, other=0.0)
        # RoPE is a rotation per pair; its transpose: dy[d] = g[d] cos[d] +- g[d^1] sin[d^1].
        dy = g * cos + gp * tsin
        nrm = x * rstd[:, None]
        dw += tl.sum(dy * nrm, axis=0)
        dn = dy * w
        # d/dx of x * rstd(x): rstd * (dn - nrm * mean(dn * nrm)); masked lanes are 0 and drop out.
        dx = rstd[:, None] * (dn - nrm * (tl.sum(dn * nrm, axis=1) / D)[:, None])
        tl.store(dx_row + h[:, None] * sdx_h + d[None, :] * sdx_d, dx.to(DX.dtype.element_ty), mask=mask)
    return dw


@_jit
def _qk_norm_rope_bwd_kernel(
    Q, sq_b, sq_n, sq_h, sq_d, K, sk_b, sk_n, sk_h, sk_d,
    GQ, sgq_b, sgq_n, sgq_h, sgq_d, GK, sgk_b, sgk_n, sgk_h, sgk_d,
    DQ, sdq_b, sdq_n, sdq_h, sdq_d, DK, sdk_b, sdk_n, sdk_h, sdk_d,
    RSTD_Q, RSTD_K, WQ, WK, WQ_TXT, WK_TXT,
    COS, SIN, sc_n, sc_d, DW_PARTIAL,
    T, N, H, D, n_txt,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Persistent programs striding over tokens: each keeps its weight-grad partial sums in registers
    # and writes one (4, D) row, [q_img, q_txt, k_img, k_txt], summed on the host. Deterministic,
    # unlike atomics, and the partial buffer is tiny (programs x 4 x D fp32).
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    d = tl.arange(0, BLOCK_D)
    dp = d ^ 1
    dmask = d < D
    acc_q_img = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_q_txt = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_k_img = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_k_txt = tl.zeros([BLOCK_D], dtype=tl.float32)
    for t32 in range(pid, T, n_prog):
        t = tl.cast(t32, tl.int64)
        b = t // N
        n = t % N
        is_txt = n < n_txt
        cos = tl.load(COS + n * sc_n + d * sc_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        sin_p = tl.load(SIN + n * sc_n + dp * sc_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        tsin = tl.where((d % 2 == 0)[None, :], sin_p, -sin_p)
        dwq = _bwd_tensor(Q, sq_b, sq_n, sq_h, sq_d, GQ, sgq_b, sgq_n, sgq_h, sgq_d,
                          DQ, sdq_b, sdq_n, sdq_h, sdq_d, RSTD_Q, WQ, WQ_TXT,
                          b, n, t, is_txt, cos, tsin, H, D, BLOCK_H, BLOCK_D)
        dwk = _bwd_tensor(K, sk_b, sk_n, sk_h, sk_d, GK, sgk_b, sgk_n, sgk_h, sgk_d,
                          DK, sdk_b, sdk_n, sdk_h, sdk_d, RSTD_K, WK, WK_TXT,
                          b, n, t, is_txt, cos, tsin, H, D, BLOCK_H, BLOCK_D)
        acc_q_txt += tl.where(is_txt, dwq, 0.0)
        acc_q_img += tl.where(is_txt, 0.0, dwq)
        acc_k_txt += tl.where(is_txt, dwk, 0.0)
        acc_k_img += tl.where(is_txt, 0.0, dwk)
    row = DW_PARTIAL + pid.to(tl.int64) * 4 * D
    tl.store(row + d, acc_q_img, mask=dmask)
    tl.store(row + D + d, acc_q_txt, mask=dmask)
    tl.store(row + 2 * D + d, acc_k_img, mask=dmask)
    tl.store(row + 3 * D + d, acc_k_txt, mask=dmask)


def _launch_cfg(h: int, dh: int, itemsize: int = 2) -> tuple[int, int, int]:
    # ~1024-element tiles: 8 elements a thread at 4 warps (16-byte accesses in bf16) and no spills
    # on sm_90 / sm_80 (bench/results/triton_aot.md); Flux's 24 heads of 128 are three 8-head
    # tiles with no padded rows. fp64 values take two registers each: half the tile, or the
    # backward spills (triton 3.6, sm_80 and sm_90).
    block_d = max(next_power_of_2(dh), 2)
    tile = 1024 if itemsize <= 4 else 512
    block_h = min(next_power_of_2(h), max(1, tile // block_d))
    num_warps = max(4, min(16, block_h * block_d // 256))
    return block_h, block_d, num_warps


def _as_4d(x: torch.Tensor) -> torch.Tensor:
    # Leading dims fold into one batch dim; reshape is a view for the fused-qkv case (the batch dims
    # of a column slice stay mergeable) and copies only for exotic layouts.
    return x.reshape(-1, *x.shape[-3:])


def _strides(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.stride())


def fwd_launch(q4, k4, wq, wk, wq_t, wk_t, cos, sin, eps: float, n_txt: int):
    """The forward kernel's launch on q4, k4 (B, N, H, Dh) of any strides and its outputs: dense
    q_out, k_out in their input's dtype and fp32 rstd_q, rstd_k (B, N, H)."""
    B, N, H, D = q4.shape
    q_out = torch.empty((B, N, H, D), dtype=q4.dtype, device=q4.device)
    k_out = torch.empty((B, N, H, D), dtype=k4.dtype, device=k4.device)
    rstd_q = torch.empty((B, N, H), dtype=torch.float32, device=q4.device)
    rstd_k = torch.empty_like(rstd_q)
    block_h, block_d, num_warps = _launch_cfg(H, D, max(q4.element_size(), k4.element_size()))
    launch = Launch(
        _qk_norm_rope_fwd_kernel, (B * N,),
        (q4, *_strides(q4), k4, *_strides(k4),
         q_out, *_strides(q_out), k_out, *_strides(k_out),
         rstd_q, rstd_k, wq, wk, wq_t, wk_t,
         cos, sin, cos.stride(0), cos.stride(1),
         N, H, D, int(n_txt), float(eps)),
        dict(BLOCK_H=block_h, BLOCK_D=block_d), num_warps,
        reads=(q4, k4, wq, wk, wq_t, wk_t, cos, sin), writes=(q_out, k_out, rstd_q, rstd_k))
    return launch, (q_out, k_out, rstd_q, rstd_k)


def bwd_launch(q4, k4, gq, gk, rstd_q, rstd_k, wq, wk, wq_t, wk_t, cos, sin, n_txt: int):
    """The backward kernel's launch and its outputs: dense dq, dk in q4's/k4's dtype and the
    fp32 weight-grad partials (programs, 4, Dh), zeroed, rows [q_img, q_txt, k_img, k_txt]."""
    B, N, H, D = q4.shape
    dq = torch.empty(q4.shape, dtype=q4.dtype, device=q4.device)
    dk = torch.empty(k4.shape, dtype=k4.dtype, device=k4.device)
    T = B * N
    progs = persistent_programs(T, q4.device)
    dw_partial = torch.zeros((progs, 4, D), dtype=torch.float32, device=q4.device)
    block_h, block_d, num_warps = _launch_cfg(H, D, max(q4.element_size(), k4.element_size()))
    launch = Launch(
        _qk_norm_rope_bwd_kernel, (progs if T > 0 else 0,),
        (q4, *_strides(q4), k4, *_strides(k4),
         gq, *_strides(gq), gk, *_strides(gk),
         dq, *_strides(dq), dk, *_strides(dk),
         rstd_q, rstd_k, wq, wk, wq_t, wk_t,
         cos, sin, cos.stride(0), cos.stride(1), dw_partial,
         T, N, H, D, int(n_txt)),
        dict(BLOCK_H=block_h, BLOCK_D=block_d), num_warps,
        reads=(q4, k4, gq, gk, rstd_q, rstd_k, wq, wk, wq_t, wk_t, cos, sin),
        writes=(dq, dk, dw_partial))
    return launch, (dq, dk, dw_partial)


# Kernels are launched only inside ``torch.library.custom_op``s (namespace ``leapalign_triton``;
# ``leapalign`` is the csrc extension's): torch.compile sees opaque ops with known outputs, and
# under FakeTensorMode their fake impls allocate the outputs (and the fp32 rstd backward keeps)
# without launching anything, so the autograd.Function below saves the same tensors on fake
# tensors as around the real kernels.
@torch.library.custom_op("leapalign_triton::qk_norm_rope_fwd", mutates_args=())
def _triton_fwd(q4: torch.Tensor, k4: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor,
                wq_t: torch.Tensor, wk_t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                eps: float, n_txt: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q4, k4 (B, N, H, Dh) any strides, dense (Dh,) weights; returns dense q_out, k_out in their
    input's dtype and fp32 rstd_q, rstd_k (B, N, H)."""
    launch, outs = fwd_launch(q4, k4, wq, wk, wq_t, wk_t, cos, sin, eps, n_txt)
    launch.run()
    return outs


@_triton_fwd.register_fake
def _(q4, k4, wq, wk, wq_t, wk_t, cos, sin, eps, n_txt):
    B, N, H, D = q4.shape
    rstd_q = torch.empty((B, N, H), dtype=torch.float32, device=q4.device)
    return (torch.empty((B, N, H, D), dtype=q4.dtype, device=q4.device),
            torch.empty((B, N, H, D), dtype=k4.dtype, device=k4.device),
            rstd_q, torch.empty_like(rstd_q))


@torch.library.custom_op("leapalign_triton::qk_norm_rope_bwd", mutates_args=())
def _triton_bwd(q4: torch.Tensor, k4: torch.Tensor, gq: torch.Tensor, gk: torch.Tensor,
                rstd_q: torch.Tensor, rstd_k: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor,
                wq_t: torch.Tensor, wk_t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                n_txt: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dense dq, dk in q4's/k4's dtype and the fp32 weight grads (4, Dh), rows
    [q_img, q_txt, k_img, k_txt]."""
    launch, (dq, dk, dw_partial) = bwd_launch(q4, k4, gq, gk, rstd_q, rstd_k, wq, wk, wq_t, wk_t,
                                              cos, sin, n_txt)
    launch.run()
    return dq, dk, dw_partial.sum(0)


@_triton_bwd.register_fake
def _(q4, k4, gq, gk, rstd_q, rstd_k, wq, wk, wq_t, wk_t, cos, sin, n_txt):
    D = q4.shape[-1]
    return (torch.empty(q4.shape, dtype=q4.dtype, device=q4.device),
            torch.empty(k4.shape, dtype=k4.dtype, device=k4.device),
            torch.empty((4, D), dtype=torch.float32, device=q4.device))


class QKNormRopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, wq, wk, wq_txt, wk_txt, cos, sin, eps, n_txt):
        shape = q.shape
        q4, k4 = _as_4d(q), _as_4d(k)
        # A single block passes no text weights; the kernel still wants four pointers, and with
        # n_txt = 0 it never selects the text ones. The kernel picks the text or image weight
        # pointer per token, so a pair must share a dtype (in Flux it always does; a mismatched
        # one is cast here, its gradient cast back in backward).
        wq_t = wq if wq_txt is None else wq_txt.to(wq.dtype)
        wk_t = wk if wk_txt is None else wk_txt.to(wk.dtype)
        ws = [w.contiguous() for w in (wq, wk, wq_t, wk_t)]
        q_out, k_out, rstd_q, rstd_k = _triton_fwd(q4, k4, *ws, cos, sin, eps, n_txt)
        ctx.save_for_backward(q4, k4, *ws, cos, sin, rstd_q, rstd_k)
        ctx.shape, ctx.n_txt = shape, n_txt
        ctx.txt_dtypes = (None if wq_txt is None else wq_txt.dtype, None if wk_txt is None else wk_txt.dtype)
        return q_out.view(shape), k_out.view(shape)

    @staticmethod
    @once_differentiable  # the kernels build no graph: fail loudly on double backward
    def backward(ctx, gq, gk):
        q4, k4, wq, wk, wq_t, wk_t, cos, sin, rstd_q, rstd_k = ctx.saved_tensors
        # autograd passes None for an output that did not reach the loss; a zero grad is exact.
        gq = torch.zeros_like(q4) if gq is None else _as_4d(gq)
        gk = torch.zeros_like(k4) if gk is None else _as_4d(gk)
        dq, dk, dw = _triton_bwd(q4, k4, gq, gk, rstd_q, rstd_k, wq, wk, wq_t, wk_t, cos, sin,
                                 ctx.n_txt)
        q_txt_dt, k_txt_dt = ctx.txt_dtypes
        if q_txt_dt is not None:
            dwq, dwq_txt = dw[0].to(wq.dtype), dw[1].to(q_txt_dt)
        else:  # no text weights: the image weight covered every token
            dwq, dwq_txt = (dw[0] + dw[1]).to(wq.dtype), None
        if k_txt_dt is not None:
            dwk, dwk_txt = dw[2].to(wk.dtype), dw[3].to(k_txt_dt)
        else:
            dwk, dwk_txt = (dw[2] + dw[3]).to(wk.dtype), None
        return dq.view(ctx.shape), dk.view(ctx.shape), dwq, dwk, dwq_txt, dwk_txt, None, None, None, None


# ----------------------------------------------------------------------------- entry point
def qk_norm_rope(q, k, wq, wk, cos, sin, eps=1e-6, *, wq_txt=None, wk_txt=None, n_txt=0):
    """RMSNorm (weight, eps) on q and k, then Flux's interleaved RoPE; returns (q_out, k_out).

    q, k: (..., N, H, Dh) in fp32/bf16/fp16, any strides (views of a fused qkv projection are
    read in place). wq, wk: (Dh,) image-token weights; wq_txt, wk_txt: (Dh,) weights for tokens
    [0, n_txt) (the text tokens a double block concatenates before the image tokens). cos, sin:
    (N, Dh) as from ``FluxPosEmbed``; they get no gradient. Outputs are contiguous, in q's dtype.
    """
    _check(q, k, wq, wk, cos, sin, wq_txt, wk_txt, n_txt)
    if n_txt == 0:  # text weights never apply; keep them out of the graph
        wq_txt = wk_txt = None
    which = backend.pick(OP, q, k, wq, wk, cos, sin, wq_txt, wk_txt)
    if which == "torch":
        return qk_norm_rope_reference(q, k, wq, wk, cos, sin, eps, wq_txt=wq_txt, wk_txt=wk_txt, n_txt=n_txt)
    if which == "triton":
        return QKNormRopeFunction.apply(q, k, wq, wk, wq_txt, wk_txt, cos, sin, float(eps), int(n_txt))
    raise RuntimeError(f"{OP} has no {which!r} implementation")
