"""gated_residual (plain and fused with mod_layernorm): Triton against the torch reference."""
import pytest
import torch

from kernels import backend
from kernels.gated_residual import gated_residual, gated_residual_reference

from .conftest import assert_close, ran

SHAPES = [
    (2, 5, 33),       # width not a power of two
    (1, 1, 3072),     # a single row at Flux's width
    (2, 3, 3072),     # Flux width, several rows per sample
    (2, 3, 4, 128),   # 128-wide heads, two middle dims
    (3, 64),          # (B, D)
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAMES = ("x", "gate", "y", "scale", "shift")


def _inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, D = shape[0], shape[-1]
    x = (torch.randn(shape, generator=g) * 2 + 0.3).to(dtype)
    gate = torch.randn(B, D, generator=g).to(dtype)
    y = torch.randn(shape, generator=g).to(dtype)
    scale = (torch.randn(B, D, generator=g) * 0.5).to(dtype)
    shift = torch.randn(B, D, generator=g).to(dtype)
    g_r = torch.randn(shape, generator=g).to(dtype)
    g_n = torch.randn(shape, generator=g).to(dtype)
    return [t.to(device) for t in (x, gate, y, scale, shift, g_r, g_n)]


def _run(fn, ins, fused, g_r, g_n):
    """Outputs and input grads; g_r or g_n None means that output is not used by the loss."""
    ins = [t.detach().requires_grad_(True) for t in ins]
    if fused:
        r, n = fn(*ins)
        outs, grads = [r, n], [g_r, g_n]
    else:
        outs, grads = [fn(*ins[:3])], [g_r]
    used = [(o, g) for o, g in zip(outs, grads) if g is not None]
    torch.autograd.backward([o for o, _ in used], [g for _, g in used])
    return [o.detach() for o in outs], [t.grad for t in ins]


def _compare(ins, fused, g_r, g_n, dtype):
    outs, grads = _run(gated_residual, ins, fused, g_r, g_n)
    assert ran("gated_residual") == "triton"
    ref_outs, ref_grads = _run(gated_residual_reference, ins, fused, g_r, g_n)
    for name, a, e in zip(("r", "n"), outs, ref_outs):
        assert_close(a, e, dtype, name)
    for name, a, e in zip(NAMES, grads, ref_grads):
        if e is None:  # scale/shift unused in the plain variant, or n not in the loss
            assert a is None or not a.any(), f"grad_{name} should be absent"
        else:
            assert a is not None, f"grad_{name} missing"
            assert_close(a, e, dtype, f"grad_{name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_triton_matches_reference(fused, shape, dtype, device, monkeypatch):
    monkeypatch.setenv("LEAPALIGN_BACKEND", "triton")
    x, gate, y, scale, shift, g_r, g_n = _inputs(shape, dtype, device)
    _compare([x, gate, y, scale, shift], fused, g_r, g_n if fused else None, dtype)


@pytest.mark.parametrize("which", ["only_r", "only_n"])
def test_fused_with_one_output_unused(which, device, monkeypatch):
    monkeypatch.setenv("LEAPALIGN_BACKEND", "triton")
    x, gate, y, scale, shift, g_r, g_n = _inputs((2, 4, 72), torch.float32, device)
    if which == "only_r":
        g_n = None
    else:
        g_r = None
    _compare([x, gate, y, scale, shift], True, g_r, g_n, torch.float32)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_non_contiguous_inputs(fused, device, monkeypatch):
    monkeypatch.setenv("LEAPALIGN_BACKEND", "triton")
    dtype, B, S, D = torch.bfloat16, 2, 5, 96
    g = torch.Generator().manual_seed(3)
    x = torch.randn(S, B, D, generator=g).to(dtype).to(device).transpose(0, 1)      # batch-minor
    y = torch.randn(B, S, 2 * D, generator=g).to(dtype).to(device)[..., D:]         # column slice
    emb = torch.randn(B, 6 * D, generator=g).to(dtype).to(device)
    shift, scale, gate = emb.chunk(6, dim=1)[3:]                                     # strided rows
    g_r = torch.randn(B, S, D, generator=g).to(dtype).to(device)
    g_n = torch.randn(S, B, D, generator=g).to(dtype).to(device).transpose(0, 1)
    assert not (x.is_contiguous() or y.is_contiguous() or gate.is_contiguous())
    _compare([x, gate, y, scale, shift], fused, g_r, g_n if fused else None, dtype)


def test_mixed_dtypes(device, monkeypatch):
    """fp32 residual stream, bf16 branch output and modulation."""
    monkeypatch.setenv("LEAPALIGN_BACKEND", "triton")
    x, gate, y, scale, shift, g_r, g_n = _inputs((2, 3, 40), torch.float32, device)
    gate, y, scale, shift = gate.bfloat16(), y.bfloat16(), scale.bfloat16(), shift.bfloat16()
    ins = [x, gate, y, scale, shift]
    outs, grads = _run(gated_residual, ins, True, g_r, g_n)
    ref_outs, ref_grads = _run(gated_residual_reference, ins, True, g_r, g_n)
    for name, a, e in zip(("r", "n") + NAMES, outs + grads, ref_outs + ref_grads):
        assert_close(a, e, e.dtype, name)
    assert [t.dtype for t in grads] == [t.dtype for t in ins]


def _saved_storages(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    return saved


def test_saved_tensors(device, monkeypatch):
    monkeypatch.setenv("LEAPALIGN_BACKEND", "triton")
    x, gate, y, scale, shift, _, _ = _inputs((2, 8, 64), torch.bfloat16, device)
    for t in (x, gate, y, scale, shift):
        t.requires_grad_(True)
    ptr = lambda t: t.untyped_storage().data_ptr()  # noqa: E731

    plain = _saved_storages(lambda: gated_residual(x, gate, y))
    assert {ptr(t) for t in plain} == {ptr(y), ptr(gate)}, "plain variant keeps only y and gate"

    fused = _saved_storages(lambda: gated_residual(x, gate, y, scale, shift))
    inputs = {ptr(t) for t in (x, gate, y, scale)}
    new = [t for t in fused if ptr(t) not in inputs]
    assert inputs <= {ptr(t) for t in fused}
    # Besides the inputs themselves, only the fp32 mean and rstd per row (r is recomputed).
    assert len(new) == 2 and all(t.dtype == torch.float32 and t.numel() == 16 for t in new)


def test_torch_backend_is_the_reference(monkeypatch):
    monkeypatch.setenv("LEAPALIGN_BACKEND", "torch")
    x, gate, y, scale, shift, _, _ = _inputs((2, 3, 16), torch.float32, "cpu")
    r, n = gated_residual(x, gate, y, scale, shift)
    assert ran("gated_residual") == "torch"
    r_ref, n_ref = gated_residual_reference(x, gate, y, scale, shift)
    assert torch.equal(r, r_ref) and torch.equal(n, n_ref)


def test_reference_matches_flux_expression():
    x, gate, y, scale, shift, _, _ = _inputs((2, 7, 48), torch.float32, "cpu")
    r = x + gate[:, None] * y
    norm = torch.nn.LayerNorm(48, elementwise_affine=False, eps=1e-6)
    n = norm(r) * (1 + scale[:, None]) + shift[:, None]
    r_ref, n_ref = gated_residual_reference(x, gate, y, scale, shift)
    assert_close(r_ref, r, torch.float32, "r")
    assert_close(n_ref, n, torch.float32, "n")


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_reference_gradcheck(fused):
    ins = _inputs((2, 3, 5), torch.float64, "cpu")[:5 if fused else 3]
    args = tuple(t.requires_grad_(True) for t in ins)
    assert torch.autograd.gradcheck(gated_residual_reference, args)


def test_argument_errors():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"gate.*\(2, 8\).*\(2, 3, 8\).*\(3, 8\)"):
        gated_residual(x, torch.randn(3, 8), x)
    with pytest.raises(ValueError, match=r"y must have x's shape"):
        gated_residual(x, torch.randn(2, 8), torch.randn(2, 3, 9))
    with pytest.raises(ValueError, match="both scale and shift"):
        gated_residual(x, torch.randn(2, 8), x, scale=torch.randn(2, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("impl", ["cuda", "triton", "torch"])
def test_gpu_backends_bf16(impl, fused, monkeypatch):
    if impl == "cuda" and not backend.csrc_has("gated_residual"):
        pytest.skip("no csrc gated_residual: " + backend.csrc_status())
    if impl == "triton" and not backend.triton_importable():
        pytest.skip("triton not installed")
    monkeypatch.setenv("LEAPALIGN_BACKEND", impl)
    x, gate, y, scale, shift, g_r, g_n = _inputs((2, 333, 3072), torch.bfloat16, "cuda")
    ins = [x, gate, y, scale, shift]
    outs, grads = _run(gated_residual, ins, fused, g_r, g_n if fused else None)
    assert ran("gated_residual") == impl
    ref_outs, ref_grads = _run(gated_residual_reference, ins, fused, g_r, g_n if fused else None)
    for name, a, e in zip(("r", "n"), outs, ref_outs):
        assert_close(a, e, torch.bfloat16, name)
    for name, a, e in zip(NAMES, grads, ref_grads):
        if e is not None:
            assert_close(a, e, torch.bfloat16, f"grad_{name}")


def test_no_cuda_backend(monkeypatch):
    """There is no csrc op for the gated residual: forcing cuda is refused, never faked."""
    monkeypatch.setenv("LEAPALIGN_BACKEND", "cuda")
    x, gate, y, *_ = _inputs((2, 5, 40), torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="cannot run"):
        gated_residual(x, gate, y)
    monkeypatch.setattr(backend, "pick", lambda op, *ts: "cuda")
    with pytest.raises(RuntimeError, match="has no 'cuda' implementation"):
        gated_residual(x, gate, y)


# --------------------------------------------------------------------------- fake tensors
@pytest.mark.parametrize("used", ["both", "only_r", "only_n", "plain"])
def test_fake_tensors_save_what_the_kernels_save(used, device, monkeypatch):
    """FakeTensorMode with triton forced: the custom ops' fake impls stand in for the kernels, so
    the saved bytes are the kernels' (see test_mod_layernorm.fake_matches_real)."""
    from .test_mod_layernorm import fake_matches_real

    fused = used != "plain"
    x, gate, y, scale, shift, g_r, g_n = _inputs((2, 3, 4, 40), torch.bfloat16, device)

    def make(convert):
        args = [convert(t).requires_grad_(True) for t in (x, gate, y, scale, shift)[:5 if fused else 3]]
        grads = [convert(g_r) if used != "only_n" else None, convert(g_n) if used != "only_r" else None]
        return args, args, grads

    kernel_bytes, _ = fake_matches_real("gated_residual", gated_residual, gated_residual_reference,
                                        make, monkeypatch)
    el = x.element_size()
    if fused:  # x, y, gate, scale and fp32 mean/rstd per row (r is recomputed)
        assert kernel_bytes == (2 * x.numel() + 2 * gate.numel()) * el + 2 * 24 * 4
    else:  # y and gate
        assert kernel_bytes == (x.numel() + gate.numel()) * el


def test_opcheck_custom_ops(device):
    x, gate, y, scale, shift, g_r, g_n = _inputs((2, 3, 40), torch.float32, device)
    y = y.transpose(0, 1).contiguous().transpose(0, 1)  # strided rows
    ops = torch.ops.leapalign_triton
    torch.library.opcheck(ops.gated_residual_fwd.default, (x, gate, y))
    torch.library.opcheck(ops.gated_residual_ln_fwd.default, (x, gate, y, scale, shift, 1e-6))
    _, _, mean, rstd = ops.gated_residual_ln_fwd(x, gate, y, scale, shift, 1e-6)
    torch.library.opcheck(ops.gated_residual_bwd.default, (g_r, y, gate))
    for gr, write_gx in ((g_r, True), (None, True), (g_r, False)):
        torch.library.opcheck(ops.gated_residual_ln_bwd.default,
                              (gr, g_n, x, y, gate, scale, mean, rstd, write_gx))
