"""leap_connect: Triton against the torch reference, plus the connector/discount semantics."""
import pytest
import torch

from kernels import backend
from kernels.leap_connect import leap_connect, leap_connect_reference

from .conftest import assert_close, ran

SHAPES = [
    (2, 16, 64),      # packed Flux latent, few tokens
    (1, 4, 8, 8),     # unpacked latent, a single sample
    (3, 1000),        # per-sample size not a power of two
    (2, 5000),        # more than one 4096 block per sample, with a tail
    (1, 3, 3072),     # Flux width
]
DTYPES = [  # (x_start, v, x_real)
    (torch.float32,) * 3,
    (torch.bfloat16,) * 3,
    (torch.float16,) * 3,
    (torch.float32, torch.bfloat16, torch.float32),  # bf16 model, fp32 latents
]
C, ALPHA = 0.37, 0.3


def _inputs(shape, dtypes, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, v, xr, w1, w2 = (torch.randn(shape, generator=g) for _ in range(5))
    return [t.to(dt).to(device) for t, dt in zip((xs, v, xr, w1, w2), dtypes + (dtypes[2],) * 2)]


def _run(fn, xs, v, xr, c, alpha, g_conn, g_inp):
    xs, v, xr = (t.detach().requires_grad_(True) for t in (xs, v, xr))
    conn, inp, dist = fn(xs, v, xr, c, alpha)
    used = [(o, g) for o, g in ((conn, g_conn), (inp, g_inp)) if g is not None]
    torch.autograd.backward([o for o, _ in used], [g for _, g in used])
    assert xr.grad is None, "x_real must never receive a gradient"
    assert not dist.requires_grad
    return conn.detach(), inp.detach(), dist, xs.grad, v.grad


def _compare(xs, v, xr, c, alpha, g_conn, g_inp, dtype):
    out = _run(leap_connect, xs, v, xr, c, alpha, g_conn, g_inp)
    assert ran("leap_connect") == "triton"
    ref = _run(leap_connect_reference, xs, v, xr, c, alpha, g_conn, g_inp)
    conn, inp, dist = out[:3]
    # The connector's value is the real latent, bit for bit, in its dtype.
    assert conn.dtype == inp.dtype == xr.dtype
    assert torch.equal(conn, xr) and torch.equal(inp, xr)
    assert dist.dtype == torch.float64 and dist.shape == (xs.shape[0],)
    torch.testing.assert_close(dist, ref[2], rtol=1e-6, atol=0)
    for name, a, e, t in (("grad_x_start", out[3], ref[3], xs), ("grad_v", out[4], ref[4], v)):
        assert a.dtype == t.dtype, f"{name} must have its input's dtype"
        assert_close(a, e, dtype, name)


@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: "-".join(str(t)[6:] for t in d))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference(shape, dtypes, device, monkeypatch):
    monkeypatch.setenv("LEAPALIGN_BACKEND", "triton")
    xs, v, xr, g_conn, g_inp = _inputs(shape, dtypes, device)
    _compare(xs, v, xr, C, ALPHA, g_conn, g_inp, dtypes[1])


@pytest.mark.parametrize("alpha", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("used", ["conn", "inp", "both"])
def test_alpha_and_partial_use(alpha, used, device, monkeypatch):
    monkeypatch.setenv("LEAPALIGN_BACKEND", "triton")
    xs, v, xr, g_conn, g_inp = _inputs((2, 3, 40), DTYPES[0], device)
    g_conn = g_conn if used in ("conn", "both") else None
    g_inp = g_inp if used in ("inp", "both") else None
    _compare(xs, v, xr, -1.25, alpha, g_conn, g_inp, torch.float32)


def test_gradient_formula(device, monkeypatch):
    """grad_x_start = g_conn + alpha*g_inp and grad_v = -c * that, exactly as the method says."""
    monkeypatch.setenv("LEAPALIGN_BACKEND", "triton")
    xs, v, xr, g_conn, g_inp = _inputs((2, 8, 16), DTYPES[0], device)
    _, _, _, gxs, gv = _run(leap_connect, xs, v, xr, C, ALPHA, g_conn, g_inp)
    g = g_conn + ALPHA * g_inp
    assert_close(gxs, g, torch.float32, "grad_x_start")
    assert_close(gv, -C * g, torch.float32, "grad_v")
    # dist is the mean |x_real - (x_start - c v)| per sample.
    dist = leap_connect(xs, v, xr, C, ALPHA)[2]
    want = (xr.double() - (xs.double() - C * v.double())).abs().flatten(1).mean(1)
    torch.testing.assert_close(dist, want, rtol=1e-6, atol=0)


def test_non_contiguous_inputs(device, monkeypatch):
    monkeypatch.setenv("LEAPALIGN_BACKEND", "triton")
    g = torch.Generator().manual_seed(5)
    B, S, C_ = 2, 12, 64
    xs = torch.randn(S, B, C_, generator=g).to(device).transpose(0, 1)
    v = torch.randn(B, S, 2 * C_, generator=g).bfloat16().to(device)[..., ::2]
    xr = torch.randn(B, C_, S, generator=g).to(device).transpose(1, 2)
    g_conn = torch.randn(B, S, C_, generator=g).to(device)
    g_inp = torch.randn(S, B, C_, generator=g).to(device).transpose(0, 1)
    assert not (xs.is_contiguous() or v.is_contiguous() or xr.is_contiguous())
    _compare(xs, v, xr, C, ALPHA, g_conn, g_inp, torch.bfloat16)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_saves_nothing_for_backward(impl, device, monkeypatch):
    monkeypatch.setenv("LEAPALIGN_BACKEND", impl)
    xs, v, xr, _, _ = _inputs((2, 16, 64), DTYPES[3], device)
    xs.requires_grad_(True)
    v.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        conn, inp, _ = leap_connect(xs, v, xr, C, ALPHA)
    assert ran("leap_connect") == impl
    if impl == "triton":
        assert saved == [], f"saved {[tuple(t.shape) for t in saved]}"
    (conn.sum() + inp.sum()).backward()  # and the graph still works without them
    assert xs.grad is not None and v.grad is not None


def test_outputs_are_independent(device, monkeypatch):
    """conn and inp carry different gradients, so they must not alias x_real or each other."""
    monkeypatch.setenv("LEAPALIGN_BACKEND", "triton")
    xs, v, xr, _, _ = _inputs((2, 4, 8), DTYPES[0], device)
    conn, inp, _ = leap_connect(xs.requires_grad_(True), v, xr, C, ALPHA)
    ptrs = {t.untyped_storage().data_ptr() for t in (conn, inp, xr)}
    assert len(ptrs) == 3


def test_torch_backend_is_the_reference(monkeypatch):
    monkeypatch.setenv("LEAPALIGN_BACKEND", "torch")
    xs, v, xr, _, _ = _inputs((2, 3, 16), DTYPES[0], "cpu")
    out = leap_connect(xs, v, xr, C, ALPHA)
    assert ran("leap_connect") == "torch"
    for a, e in zip(out, leap_connect_reference(xs, v, xr, C, ALPHA)):
        assert torch.equal(a, e)


def test_reference_gradcheck():
    """The connector's gradient is by design not the derivative of its value (the value is
    x_real, the gradient flows to xhat), so gradcheck applies where the two agree: x_real tied to
    xhat itself, alpha = 1. The alpha scaling is then checked against the closed form."""
    g = torch.Generator().manual_seed(0)
    xs, v = (torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
             for _ in range(2))

    def tied(xs, v):
        conn, inp, _ = leap_connect_reference(xs, v, (xs - 0.7 * v).detach(), 0.7, 1.0)
        return conn, inp

    assert torch.autograd.gradcheck(tied, (xs, v))

    w = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    xr = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    for alpha in (0.0, 0.3, 1.0):
        conn, inp, _ = leap_connect_reference(xs, v, xr, 0.7, alpha)
        gxs, gv = torch.autograd.grad((inp * w).sum(), (xs, v))
        torch.testing.assert_close(gxs, alpha * w, rtol=1e-12, atol=0)
        torch.testing.assert_close(gv, -0.7 * alpha * w, rtol=1e-12, atol=0)
        assert torch.equal(conn.detach(), xr) and torch.equal(inp.detach(), xr)


def test_argument_errors():
    a = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"x_start \(2, 3\), v \(2, 4\), x_real \(2, 3\)"):
        leap_connect(a, torch.randn(2, 4), a, 1.0)
    with pytest.raises(ValueError, match="alpha"):
        leap_connect(a, a, a, 1.0, alpha=1.5)
    with pytest.raises(ValueError, match="alpha"):
        leap_connect(a, a, a, 1.0, alpha=float("nan"))
    with pytest.raises(ValueError, match="c must be finite"):
        leap_connect(a, a, a, float("inf"))


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["cuda", "triton", "torch"])
def test_gpu_backends_bf16(impl, monkeypatch):
    if impl == "cuda" and not backend.csrc_has("leap_connect"):
        pytest.skip(backend.csrc_status())
    if impl == "triton" and not backend.triton_importable():
        pytest.skip("triton not installed")
    monkeypatch.setenv("LEAPALIGN_BACKEND", impl)
    for dtypes in (DTYPES[1], DTYPES[3]):
        xs, v, xr, g_conn, g_inp = _inputs((2, 4096, 64), dtypes, "cuda")
        out = _run(leap_connect, xs, v, xr, C, ALPHA, g_conn, g_inp)
        assert ran("leap_connect") == impl
        ref = _run(leap_connect_reference, xs, v, xr, C, ALPHA, g_conn, g_inp)
        assert torch.equal(out[0], xr) and torch.equal(out[1], xr)
        torch.testing.assert_close(out[2], ref[2], rtol=1e-5, atol=0)
        assert_close(out[3], ref[3], torch.bfloat16, "grad_x_start")
        assert_close(out[4], ref[4], torch.bfloat16, "grad_v")


def test_cuda_branch_glue_against_fake_csrc(monkeypatch):
    """The csrc dispatch (dtype widening, inp copy, fp32 gradient combine) on CPU, with the
    extension replaced by torch ops that keep its contract and its dtype checks."""
    import types

    import kernels.leap_connect as lc

    def fwd(xs, v, xr, c):
        assert xs.dtype == xr.dtype, "csrc wants x_start and x_real in one dtype"
        xhat = xs.float() - c * v.float()
        return xr.clone(), (xr.float() - xhat).abs().double().flatten(1).mean(1)

    def bwd(g, c):
        return g.clone(), -c * g

    monkeypatch.setattr(lc, "_cuda_ops", lambda: types.SimpleNamespace(
        leap_connect_fwd=fwd, leap_connect_bwd=bwd))
    monkeypatch.setattr(backend, "pick", lambda op, *ts: "cuda")
    # bf16 model output, fp32 start point, bf16 target: all three dtype paths at once.
    xs, v, xr, g_conn, g_inp = _inputs((2, 6, 10), (torch.float32, torch.bfloat16, torch.bfloat16),
                                       "cpu")
    out = _run(leap_connect, xs, v, xr, C, ALPHA, g_conn, g_inp)
    ref = _run(leap_connect_reference, xs, v, xr, C, ALPHA, g_conn, g_inp)
    assert torch.equal(out[0], xr) and torch.equal(out[1], xr)
    assert out[0].untyped_storage().data_ptr() != out[1].untyped_storage().data_ptr()
    torch.testing.assert_close(out[2], ref[2], rtol=1e-6, atol=0)
    assert out[3].dtype == torch.float32 and out[4].dtype == torch.bfloat16
    assert_close(out[3], ref[3], torch.bfloat16, "grad_x_start")
    assert_close(out[4], ref[4], torch.bfloat16, "grad_v")


# --------------------------------------------------------------------------- fake tensors
def test_fake_tensors_run_the_triton_path(device, monkeypatch):
    """FakeTensorMode with triton forced: the custom ops' fake impls stand in for the kernels
    (outputs of the reference's shapes and dtypes; nothing saved, as with the kernels)."""
    from .test_mod_layernorm import fake_matches_real

    xs, v, xr, g_conn, g_inp = _inputs((2, 16, 64), DTYPES[3], device)

    def make(convert):
        a, b = convert(xs).requires_grad_(True), convert(v).requires_grad_(True)
        return [a, b, convert(xr), C, ALPHA], [a, b], [convert(g_conn), convert(g_inp), None]

    kernel_bytes, _ = fake_matches_real("leap_connect", leap_connect, leap_connect_reference, make,
                                        monkeypatch)
    assert kernel_bytes == 0


def test_opcheck_custom_ops(device):
    xs, v, xr, g_conn, g_inp = _inputs((2, 3, 40), DTYPES[3], device)
    ops = torch.ops.leapalign_triton
    torch.library.opcheck(ops.leap_connect_fwd.default, (xs, v, xr, C))
    for gc, gi, wx, wv in ((g_conn, g_inp, True, True), (None, g_inp, True, False),
                           (g_conn, None, False, True)):
        torch.library.opcheck(ops.leap_connect_bwd.default,
                              (gc, gi, C, ALPHA, torch.float32, torch.bfloat16, wx, wv))
