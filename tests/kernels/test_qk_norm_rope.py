"""qk_norm_rope: reference vs diffusers' Flux modules, Triton vs reference (forward and backward).

Without CUDA the Triton kernels run under TRITON_INTERPRET=1 on CPU tensors; with CUDA the same
tests run the compiled kernels on the GPU (so the interpreter is only switched on when there is no
GPU: interpreting on a GPU machine would test nothing that ships).
"""
import pytest
import torch

from kernels import backend
from kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_reference

from .conftest import ran

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OP = "qk_norm_rope"
# (B, N, H, Dh, n_txt): single token; odd N and heads that are no power of two; Flux's 24 x 128
# heads (three 8-head tiles); Dh that is not a power of two (masked lanes) with 20 heads (a
# 16-head tile plus a ragged one); a double block's text+image split.
SHAPES = [
    (1, 1, 1, 8, 0),
    (2, 7, 3, 32, 3),
    (1, 9, 24, 128, 4),
    (1, 5, 20, 48, 0),
    (3, 4, 5, 6, 1),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# fp32 to ~1e-5 relative; half types to ~1e-2 (one rounding step of the output dtype)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def assert_fwd_close(actual, expected, dtype):
    """Outputs vs a run in the same dtype. Both round the RMSNorm output to the activation dtype
    before RoPE; fp32-level differences (sum order, rsqrt) can put that intermediate on the other
    side of a rounding boundary. That moves an output by up to two of its ulps, or, where RoPE's
    a*cos - b*sin cancels to near zero, by about one ulp of the O(max) intermediate, hence a bound
    of 2 eps (|expected| + max |expected|) for the half types."""
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        return
    eps = torch.finfo(dtype).eps
    a, e = actual.double(), expected.double()
    bound = 2 * eps * (e.abs() + e.abs().max())
    bad = ((a - e).abs() > bound).sum().item()
    assert bad == 0, f"{bad} elements beyond 2 ulps; max err {(a - e).abs().max().item():.3g}"


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "triton")


def rope_tables(n, dh, generic=False, device=DEVICE, seed=2):
    """cos/sin (N, Dh). Flux's tables repeat each angle over a pair; ``generic`` tables do not, so
    the kernel must read cos/sin at both lanes of a pair rather than assume they are equal."""
    g = torch.Generator().manual_seed(seed)
    if generic:
        return torch.randn(n, dh, generator=g).to(device), torch.randn(n, dh, generator=g).to(device)
    ang = torch.rand(n, dh // 2, generator=g) * 6.3
    return ang.cos().repeat_interleave(2, -1).to(device), ang.sin().repeat_interleave(2, -1).to(device)


def make_inputs(b, n, h, dh, n_txt, dtype, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    # scale > 1 so the normalisation does real work
    q = (torch.randn(b, n, h, dh, generator=g) * 3).to(device, dtype)
    k = (torch.randn(b, n, h, dh, generator=g) * 2 + 0.5).to(device, dtype)
    ws = [(torch.randn(dh, generator=g) * 0.3 + 1).to(device, dtype) for _ in range(4)]
    wq, wk, wq_txt, wk_txt = ws
    return q, k, wq, wk, (wq_txt if n_txt else None), (wk_txt if n_txt else None)


def leaves(*ts):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in ts]


def assert_close_scaled(actual, expected, rtol, what=""):
    """max |a - e| <= rtol * max |e|: relative to the tensor's scale, so grads that are sums over
    many rows (the weight grads) and elements near zero are judged alike."""
    a, e = actual.double(), expected.double()
    err = (a - e).abs().max().item()
    scale = e.abs().max().item()
    assert err <= rtol * scale + 1e-30, f"{what}: max err {err:.3g} > {rtol} * {scale:.3g}"


def run_both(q, k, wq, wk, wq_txt, wk_txt, cos, sin, n_txt, grad_seed=1):
    """Triton (forced by the caller) on `dtype` leaves, reference in fp32 on upcast copies of the
    same values. Returns outputs and grads of both, plus the reference run in the input dtype."""
    ins = leaves(q, k, wq, wk, wq_txt, wk_txt)
    out = qk_norm_rope(ins[0], ins[1], ins[2], ins[3], cos, sin, wq_txt=ins[4], wk_txt=ins[5], n_txt=n_txt)
    assert ran(OP) == "triton"
    g = torch.Generator().manual_seed(grad_seed)
    gouts = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in out]
    live = [t for t in ins if t is not None]
    grads = torch.autograd.grad(out, live, gouts)

    ref_ins = leaves(*[t.float() if t is not None else None for t in (q, k, wq, wk, wq_txt, wk_txt)])
    ref = qk_norm_rope_reference(ref_ins[0], ref_ins[1], ref_ins[2], ref_ins[3], cos, sin,
                                 wq_txt=ref_ins[4], wk_txt=ref_ins[5], n_txt=n_txt)
    ref_live = [t for t in ref_ins if t is not None]
    ref_grads = torch.autograd.grad(ref, ref_live, [g.float() for g in gouts])
    same_dtype = qk_norm_rope_reference(q, k, wq, wk, cos, sin, wq_txt=wq_txt, wk_txt=wk_txt, n_txt=n_txt)
    return out, grads, ref, ref_grads, same_dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference(shape, dtype, triton_backend):
    b, n, h, dh, n_txt = shape
    q, k, wq, wk, wq_txt, wk_txt = make_inputs(b, n, h, dh, n_txt, dtype)
    cos, sin = rope_tables(n, dh)
    out, grads, ref, ref_grads, same_dtype = run_both(q, k, wq, wk, wq_txt, wk_txt, cos, sin, n_txt)
    tol = TOL[dtype]
    for o, r, s in zip(out, ref, same_dtype):
        assert o.dtype == dtype and o.shape == q.shape and o.is_contiguous()
        assert_fwd_close(o, s, dtype)
        # two roundings of the half type (RMSNorm output, RoPE output) vs none
        assert_close_scaled(o, r, tol if dtype == torch.float32 else 2 * tol, "forward vs fp32 reference")
    names = ["dq", "dk", "dwq", "dwk", "dwq_txt", "dwk_txt"]
    for name, gr, rg in zip(names, grads, ref_grads):
        assert gr.dtype == dtype
        assert_close_scaled(gr, rg, tol if dtype == torch.float32 else 2 * tol, name)


def test_generic_cos_sin_tables(triton_backend):
    q, k, wq, wk, wq_txt, wk_txt = make_inputs(2, 5, 3, 16, 2, torch.float32)
    cos, sin = rope_tables(5, 16, generic=True)
    out, grads, ref, ref_grads, _ = run_both(q, k, wq, wk, wq_txt, wk_txt, cos, sin, 2)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
    for gr, rg in zip(grads, ref_grads):
        assert_close_scaled(gr, rg, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n_txt", [0, 3])
def test_views_of_fused_qkv(dtype, n_txt, monkeypatch):
    """The real case: q and k are column slices of one (B, N, 3*H*Dh) projection, read in place."""
    b, n, h, dh = 2, 6, 3, 32
    g = torch.Generator().manual_seed(3)
    qkv = (torch.randn(b, n, 3 * h * dh, generator=g) * 2).to(DEVICE, dtype)
    w = [(torch.randn(dh, generator=g) * 0.3 + 1).to(DEVICE, dtype).requires_grad_() for _ in range(4)]
    # Column-major cos/sin as well, to exercise their strides.
    cos, sin = (t.t().contiguous().t() for t in rope_tables(n, dh))
    txt = dict(wq_txt=w[2], wk_txt=w[3]) if n_txt else {}
    gouts = None
    results = []
    for which in ("triton", "torch"):
        monkeypatch.setenv(backend.ENV_VAR, which)
        x = qkv.detach().clone().requires_grad_()
        q, k, _ = x.split(h * dh, dim=-1)
        q, k = q.unflatten(-1, (h, dh)), k.unflatten(-1, (h, dh))
        assert not q.is_contiguous()
        out = qk_norm_rope(q, k, w[0], w[1], cos, sin, n_txt=n_txt, **txt)
        assert ran(OP) == which
        if gouts is None:
            # a transposed (non-contiguous) incoming grad
            gouts = [torch.randn(o.shape[0], o.shape[2], o.shape[1], o.shape[3], generator=g)
                     .to(DEVICE, dtype).transpose(1, 2) for o in out]
        live = [x, w[0], w[1]] + ([w[2], w[3]] if n_txt else [])
        results.append((out, torch.autograd.grad(out, live, gouts)))
    (out_t, grads_t), (out_r, grads_r) = results
    tol = TOL[dtype]
    for o, r in zip(out_t, out_r):
        assert_fwd_close(o, r, dtype)
    for gt, gr in zip(grads_t, grads_r):
        assert_close_scaled(gt, gr, tol if dtype == torch.float32 else 3 * tol)
    # v's slice of the fused projection gets no gradient
    assert grads_t[0][..., 2 * h * dh:].abs().max() == 0


@pytest.mark.parametrize("lead", [(), (2, 2)], ids=["no-batch", "two-batch-dims"])
def test_leading_shapes(lead, triton_backend):
    n, h, dh = 4, 2, 16
    q, k, wq, wk, wq_txt, wk_txt = make_inputs(1, n, h, dh, 1, torch.float32)
    q = q.expand(*lead, n, h, dh) if lead else q[0]
    k = k.expand(*lead, n, h, dh) if lead else k[0]
    q, k = q.contiguous() + 0, k.contiguous() * 1.5
    cos, sin = rope_tables(n, dh)
    out, grads, ref, ref_grads, _ = run_both(q, k, wq, wk, wq_txt, wk_txt, cos, sin, 1)
    for o, r in zip(out, ref):
        assert o.shape == q.shape
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
    for gr, rg in zip(grads, ref_grads):
        assert_close_scaled(gr, rg, 1e-5)


def test_only_used_outputs_get_grads(triton_backend):
    q, k, wq, wk, _, _ = make_inputs(1, 3, 2, 8, 0, torch.float32)
    cos, sin = rope_tables(3, 8)
    q, k, wq, wk = leaves(q, k, wq, wk)
    q_out, _ = qk_norm_rope(q, k, wq, wk, cos, sin)
    dq, dk, dwk = torch.autograd.grad(q_out.sum(), [q, k, wk], allow_unused=True, materialize_grads=True)
    assert dk.abs().max() == 0 and dwk.abs().max() == 0 and dq.abs().max() > 0


def test_reference_gradcheck_float64():
    g = torch.Generator().manual_seed(5)
    b, n, h, dh, n_txt = 1, 3, 2, 6, 1
    ts = [torch.randn(b, n, h, dh, generator=g, dtype=torch.float64),
          torch.randn(b, n, h, dh, generator=g, dtype=torch.float64)]
    ts += [torch.randn(dh, generator=g, dtype=torch.float64) * 0.3 + 1 for _ in range(4)]
    ts = [t.requires_grad_() for t in ts]
    cos, sin = (t.double() for t in rope_tables(n, dh, generic=True, device="cpu"))

    def f(q, k, wq, wk, wq_txt, wk_txt):
        return qk_norm_rope_reference(q, k, wq, wk, cos, sin, wq_txt=wq_txt, wk_txt=wk_txt, n_txt=n_txt)

    assert torch.autograd.gradcheck(f, ts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("h, dh, axes, n_txt, grid", [(24, 128, [16, 56, 56], 5, (3, 4)),
                                                      (3, 32, [8, 12, 12], 2, (2, 3))],
                         ids=["flux-24x128", "small-3x32"])
def test_matches_diffusers_flux_modules(h, dh, axes, n_txt, grid, dtype, monkeypatch):
    """The reference (and the Triton path) against what FluxAttnProcessor runs: norm_added_q/k on
    the text tokens, norm_q/k on the image tokens, concatenation (text first), apply_rotary_emb
    with FluxPosEmbed tables; and against diffusers' own RMSNorm class."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.normalization import RMSNorm
    from diffusers.models.transformers.transformer_flux import FluxAttention, FluxPosEmbed

    torch.manual_seed(0)
    attn = FluxAttention(query_dim=8, heads=h, dim_head=dh, added_kv_proj_dim=8, eps=1e-6)
    norms = [attn.norm_q, attn.norm_k, attn.norm_added_q, attn.norm_added_k]
    with torch.no_grad():
        for m in norms:  # ones would hide a swapped or missing weight
            m.weight.copy_(torch.randn(dh) * 0.3 + 1)
    attn.to(dtype)
    rows, cols = grid
    img_ids = torch.zeros(rows, cols, 3)
    img_ids[..., 1] = torch.arange(rows)[:, None]
    img_ids[..., 2] = torch.arange(cols)[None, :]
    ids = torch.cat([torch.zeros(n_txt, 3), img_ids.reshape(-1, 3)])
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=axes)(ids)
    n_img = rows * cols
    q_img, k_img = (torch.randn(2, n_img, h, dh) * 2).to(dtype), torch.randn(2, n_img, h, dh).to(dtype)
    q_txt, k_txt = (torch.randn(2, n_txt, h, dh) * 2).to(dtype), torch.randn(2, n_txt, h, dh).to(dtype)

    with torch.no_grad():
        exp_q = apply_rotary_emb(torch.cat([attn.norm_added_q(q_txt), attn.norm_q(q_img)], 1), (cos, sin), sequence_dim=1)
        exp_k = apply_rotary_emb(torch.cat([attn.norm_added_k(k_txt), attn.norm_k(k_img)], 1), (cos, sin), sequence_dim=1)
        q, k = torch.cat([q_txt, q_img], 1), torch.cat([k_txt, k_img], 1)
        w = dict(wq_txt=attn.norm_added_q.weight, wk_txt=attn.norm_added_k.weight, n_txt=n_txt)
        got_q, got_k = qk_norm_rope_reference(q, k, attn.norm_q.weight, attn.norm_k.weight, cos, sin, 1e-6, **w)
        tight = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=0, atol=0)
        torch.testing.assert_close(got_q, exp_q, **tight)
        torch.testing.assert_close(got_k, exp_k, **tight)

        # diffusers.models.normalization.RMSNorm rounds x*rstd to the weight dtype before the
        # weight multiply: identical in fp32, one extra bf16 rounding otherwise (judged against
        # the tensor's scale: RoPE's a*cos - b*sin can cancel to near zero, where one ulp of a or
        # b is a large relative error).
        dnorm = RMSNorm(dh, eps=1e-6).to(dtype)
        dnorm.weight.copy_(attn.norm_q.weight)
        d_q = apply_rotary_emb(torch.cat([attn.norm_added_q(q_txt), dnorm(q_img)], 1), (cos, sin), sequence_dim=1)
        if dtype == torch.float32:
            torch.testing.assert_close(got_q, d_q, **tight)
        else:
            assert_close_scaled(got_q, d_q, 2**-6, "vs diffusers RMSNorm")

        if DEVICE == "cpu":
            monkeypatch.setenv(backend.ENV_VAR, "triton")
            tq, tk = qk_norm_rope(q, k, attn.norm_q.weight, attn.norm_k.weight, cos, sin, 1e-6, **w)
            assert ran(OP) == "triton"
            assert_fwd_close(tq, exp_q, dtype)
            assert_fwd_close(tk, exp_k, dtype)


def test_backend_choice_is_recorded(monkeypatch):
    q, k, wq, wk, _, _ = make_inputs(1, 2, 1, 4, 0, torch.float32)
    cos, sin = rope_tables(2, 4)
    monkeypatch.setenv(backend.ENV_VAR, "torch")
    qk_norm_rope(q, k, wq, wk, cos, sin)
    assert ran(OP) == "torch"
    monkeypatch.delenv(backend.ENV_VAR)
    qk_norm_rope(q, k, wq, wk, cos, sin)
    assert ran(OP) == "triton"  # interpreter on CPU, compiled on CUDA
    monkeypatch.setenv(backend.ENV_VAR, "cuda")
    with pytest.raises(RuntimeError):  # no csrc version of this op, and forcing never falls back
        qk_norm_rope(q, k, wq, wk, cos, sin)


def test_rejects_bad_arguments():
    q, k, wq, wk, _, _ = make_inputs(1, 3, 2, 8, 0, torch.float32)
    cos, sin = rope_tables(3, 8)
    with pytest.raises(ValueError):
        qk_norm_rope(q, k, wq, wk, cos, sin, n_txt=1)  # text weights missing
    with pytest.raises(ValueError):
        qk_norm_rope(q, k, wq, wk, cos[:2], sin[:2])
    with pytest.raises(ValueError):
        qk_norm_rope(q[..., :7], k[..., :7], wq[:7], wk[:7], cos[:, :7], sin[:, :7])  # odd Dh


@pytest.mark.gpu
@pytest.mark.parametrize("n_txt", [0, 512])
def test_cuda_bf16_flux_size(n_txt, triton_backend):
    b, n, h, dh = 1, 4608, 24, 128
    q, k, wq, wk, wq_txt, wk_txt = make_inputs(b, n, h, dh, n_txt, torch.bfloat16, device="cuda")
    cos, sin = rope_tables(n, dh, device="cuda")
    out, grads, ref, ref_grads, same_dtype = run_both(q, k, wq, wk, wq_txt, wk_txt, cos, sin, n_txt)
    for o, r, s in zip(out, ref, same_dtype):
        assert_fwd_close(o, s, torch.bfloat16)
        assert_close_scaled(o, r, 2e-2)
    for gr, rg in zip(grads, ref_grads):
        assert_close_scaled(gr, rg, 2e-2)


# ----------------------------------------------------------------------------- fake tensors
@pytest.mark.parametrize("n_txt", [0, 2])
def test_fake_tensors_save_what_the_kernels_save(n_txt, monkeypatch):
    """FakeTensorMode with triton forced: the custom ops' fake impls stand in for the kernels, so
    the saved bytes are the kernels' (see test_mod_layernorm.fake_matches_real). q and k are views
    of one fused qkv projection, as in Flux: their storage is counted once."""
    from .test_mod_layernorm import fake_matches_real

    b, n, h, dh = 2, 5, 3, 16
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(b, n, 3 * h * dh, generator=g).to(DEVICE, torch.bfloat16)
    ws = [(torch.randn(dh, generator=g) * 0.3 + 1).to(DEVICE, torch.bfloat16) for _ in range(4)]
    cos, sin = rope_tables(n, dh)
    gq, gk = (torch.randn(b, n, h, dh, generator=g).to(DEVICE, torch.bfloat16) for _ in range(2))

    def make(convert):
        x = convert(qkv).requires_grad_(True)
        q, k, _ = (t.unflatten(-1, (h, dh)) for t in x.split(h * dh, dim=-1))
        w = [convert(t).requires_grad_(True) for t in ws]
        txt = (w[2], w[3]) if n_txt else (None, None)
        wrt = [x, w[0], w[1], *(w[2:] if n_txt else [])]
        return [q, k, w[0], w[1], convert(cos), convert(sin), *txt], wrt, [convert(gq), convert(gk)]

    def fn(q, k, wq, wk, cos, sin, wq_txt, wk_txt):
        return qk_norm_rope(q, k, wq, wk, cos, sin, wq_txt=wq_txt, wk_txt=wk_txt, n_txt=n_txt)

    def ref(q, k, wq, wk, cos, sin, wq_txt, wk_txt):
        return qk_norm_rope_reference(q, k, wq, wk, cos, sin, wq_txt=wq_txt, wk_txt=wk_txt, n_txt=n_txt)

    kernel_bytes, _ = fake_matches_real(OP, fn, ref, make, monkeypatch)
    # qkv once, the weights, cos/sin (fp32) and fp32 rstd per (token, head) for q and for k
    n_w = 4 if n_txt else 2
    assert kernel_bytes == qkv.numel() * 2 + n_w * dh * 2 + 2 * n * dh * 4 + 2 * b * n * h * 4


def test_opcheck_custom_ops():
    b, n, h, dh, n_txt = 2, 4, 3, 16, 1
    q, k, wq, wk, wq_txt, wk_txt = make_inputs(b, n, h, dh, n_txt, torch.float32)
    cos, sin = rope_tables(n, dh)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # strided
    ops = torch.ops.leapalign_triton
    args = (q, k, wq, wk, wq_txt, wk_txt, cos, sin)
    torch.library.opcheck(ops.qk_norm_rope_fwd.default, (*args, 1e-6, n_txt))
    _, _, rstd_q, rstd_k = ops.qk_norm_rope_fwd(*args, 1e-6, n_txt)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    torch.library.opcheck(ops.qk_norm_rope_bwd.default,
                          (q, k, gq, gk, rstd_q, rstd_k, wq, wk, wq_txt, wk_txt, cos, sin, n_txt))
