"""mod_layernorm: Triton (interpreter on CPU, compiled on GPU) against the torch reference."""
import pytest
import torch

from kernels import backend
from kernels.mod_layernorm import mod_layernorm, mod_layernorm_reference

from .conftest import assert_close, ran

SHAPES = [
    (2, 5, 33),       # width not a power of two, not a multiple of any block
    (1, 1, 3072),     # a single row at Flux's width
    (2, 3, 3072),     # Flux width, several rows per sample
    (2, 3, 4, 128),   # 128-wide heads, two middle dims
    (3, 64),          # no middle dims: (B, D)
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, D = shape[0], shape[-1]
    # Non-zero mean and a spread of scales, so that normalisation matters.
    x = (torch.randn(shape, generator=g) * 3 + 0.5).to(dtype)
    scale = (torch.randn(B, D, generator=g) * 0.5).to(dtype)
    shift = torch.randn(B, D, generator=g).to(dtype)
    gy = torch.randn(shape, generator=g).to(dtype)
    return [t.to(device) for t in (x, scale, shift, gy)]


def _run(fn, x, scale, shift, gy):
    x, scale, shift = (t.detach().requires_grad_(True) for t in (x, scale, shift))
    y = fn(x, scale, shift)
    y.backward(gy)
    return y.detach(), x.grad, scale.grad, shift.grad


def _compare(x, scale, shift, gy, dtype):
    out = _run(mod_layernorm, x, scale, shift, gy)
    assert ran("mod_layernorm") == "triton"
    ref = _run(mod_layernorm_reference, x, scale, shift, gy)
    for name, a, e in zip(("y", "grad_x", "grad_scale", "grad_shift"), out, ref):
        assert_close(a, e, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference(shape, dtype, device, monkeypatch):
    monkeypatch.setenv("LEAPALIGN_BACKEND", "triton")
    _compare(*_inputs(shape, dtype, device), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_inputs(dtype, device, monkeypatch):
    monkeypatch.setenv("LEAPALIGN_BACKEND", "triton")
    B, S, D = 2, 6, 96
    g = torch.Generator().manual_seed(1)
    # x: a column slice of a wider activation with batch and tokens transposed (strides on
    # every dim); scale/shift: chunks of one (B, 6D) modulation vector, as AdaLayerNormZero does.
    wide = (torch.randn(S, B, D + 32, generator=g) * 2).to(dtype).to(device)
    x = wide.transpose(0, 1)[..., :D]
    emb = torch.randn(B, 6 * D, generator=g).to(dtype).to(device)
    shift, scale = emb.chunk(6, dim=1)[:2]
    gy = torch.randn(B, S, D, generator=g).to(dtype).to(device).transpose(0, 1).contiguous().transpose(0, 1)
    assert not x.is_contiguous() and not scale.is_contiguous() and not gy.is_contiguous()
    _compare(x, scale, shift, gy, dtype)


def test_mixed_dtypes_fp32_x_bf16_modulation(device, monkeypatch):
    monkeypatch.setenv("LEAPALIGN_BACKEND", "triton")
    x, scale, shift, gy = _inputs((2, 4, 80), torch.float32, device)
    scale, shift = scale.bfloat16(), shift.bfloat16()
    out = _run(mod_layernorm, x, scale, shift, gy)
    ref = _run(mod_layernorm_reference, x, scale, shift, gy)
    assert out[0].dtype == torch.float32 and out[2].dtype == torch.bfloat16
    for name, a, e in zip(("y", "grad_x", "grad_scale", "grad_shift"), out, ref):
        assert_close(a, e, a.dtype, name)


def test_saves_only_x_stats_and_scale(device, monkeypatch):
    monkeypatch.setenv("LEAPALIGN_BACKEND", "triton")
    x, scale, shift, _ = _inputs((2, 8, 64), torch.bfloat16, device)
    x.requires_grad_(True)
    scale.requires_grad_(True)
    shift.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        mod_layernorm(x, scale, shift)
    ptrs = {t.untyped_storage().data_ptr() for t in saved}
    stats = [t for t in saved if t.untyped_storage().data_ptr() not in
             (x.untyped_storage().data_ptr(), scale.untyped_storage().data_ptr())]
    assert x.untyped_storage().data_ptr() in ptrs, "x itself (not a copy) is saved"
    assert scale.untyped_storage().data_ptr() in ptrs
    assert len(stats) == 2 and all(t.dtype == torch.float32 and t.numel() == 16 for t in stats)


def test_torch_backend_is_the_reference(monkeypatch):
    monkeypatch.setenv("LEAPALIGN_BACKEND", "torch")
    x, scale, shift, _ = _inputs((2, 3, 16), torch.float32, "cpu")
    y = mod_layernorm(x, scale, shift)
    assert ran("mod_layernorm") == "torch"
    assert torch.equal(y, mod_layernorm_reference(x, scale, shift))


def test_reference_matches_flux_expression():
    """The reference is Flux's AdaLayerNormZero modulation (no affine LayerNorm, eps 1e-6)."""
    x, scale, shift, _ = _inputs((2, 7, 48), torch.float32, "cpu")
    norm = torch.nn.LayerNorm(48, elementwise_affine=False, eps=1e-6)
    want = norm(x) * (1 + scale[:, None]) + shift[:, None]
    assert_close(mod_layernorm_reference(x, scale, shift), want, torch.float32)


def test_reference_gradcheck():
    x, scale, shift, _ = _inputs((2, 3, 5), torch.float64, "cpu")
    args = tuple(t.requires_grad_(True) for t in (x, scale, shift))
    assert torch.autograd.gradcheck(mod_layernorm_reference, args)


def test_shape_errors():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"\(2, 8\).*\(2, 3, 8\).*\(2, 3\)"):
        mod_layernorm(x, torch.randn(2, 3), torch.randn(2, 8))
    with pytest.raises(ValueError, match="shift"):
        mod_layernorm(x, torch.randn(2, 8), torch.randn(1, 8))
    with pytest.raises(ValueError, match=r"\(B, \.\.\., D\)"):
        mod_layernorm(torch.randn(8), torch.randn(1, 8), torch.randn(1, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["cuda", "triton", "torch"])
def test_gpu_backends_bf16(impl, monkeypatch):
    if impl == "cuda" and not backend.csrc_has("mod_layernorm"):
        pytest.skip(backend.csrc_status())
    if impl == "triton" and not backend.triton_importable():
        pytest.skip("triton not installed")
    monkeypatch.setenv("LEAPALIGN_BACKEND", impl)
    x, scale, shift, gy = _inputs((2, 333, 3072), torch.bfloat16, "cuda")
    out = _run(mod_layernorm, x, scale, shift, gy)
    assert ran("mod_layernorm") == impl
    monkeypatch.setenv("LEAPALIGN_BACKEND", "torch")
    ref = _run(mod_layernorm_reference, x, scale, shift, gy)
    for name, a, e in zip(("y", "grad_x", "grad_scale", "grad_shift"), out, ref):
        assert_close(a, e, torch.bfloat16, name)


def fake_csrc_mod_layernorm():
    """torch stand-ins for leapalign::mod_layernorm_fwd/bwd with the csrc dtype/layout checks."""
    import types

    def fwd(x, scale, shift, eps):
        assert x.dim() == 3 and x.is_contiguous(), "csrc wants dense (B, M, D)"
        assert scale.dtype == shift.dtype == x.dtype, "csrc wants one dtype"
        xf = x.float()
        mean = xf.mean(-1)
        rstd = (xf.var(-1, unbiased=False) + eps).rsqrt()
        y = mod_layernorm_reference(x, scale, shift, eps)
        return y, mean.flatten(), rstd.flatten()

    def bwd(gy, x, scale, mean, rstd):
        assert gy.dtype == x.dtype == scale.dtype and mean.dtype == rstd.dtype == torch.float32
        B, M, D = x.shape
        xhat = (x.float() - mean.view(B, M, 1)) * rstd.view(B, M, 1)
        ghat = gy.float() * (1 + scale.float()[:, None])
        gx = rstd.view(B, M, 1) * (ghat - ghat.mean(-1, keepdim=True)
                                   - xhat * (ghat * xhat).mean(-1, keepdim=True))
        return gx.to(x.dtype), (gy.float() * xhat).sum(1).to(x.dtype), gy.float().sum(1).to(x.dtype)

    return types.SimpleNamespace(mod_layernorm_fwd=fwd, mod_layernorm_bwd=bwd)


def test_cuda_branch_glue_against_fake_csrc(monkeypatch):
    """The csrc dispatch (dense (B, M, D) view, one dtype, grads cast back) on CPU."""
    import kernels.mod_layernorm as ml

    monkeypatch.setattr(ml, "_cuda_ops", fake_csrc_mod_layernorm)
    monkeypatch.setattr(backend, "pick", lambda op, *ts: "cuda")
    x, scale, shift, gy = _inputs((2, 3, 4, 24), torch.float32, "cpu")
    x, gy = x.transpose(1, 2), gy.transpose(1, 2)  # strided: the glue must hand csrc dense copies
    scale = scale.bfloat16()  # mixed: the glue must hand csrc one dtype
    out = _run(mod_layernorm, x, scale, shift, gy)
    ref = _run(mod_layernorm_reference, x, scale, shift, gy)
    assert out[2].dtype == torch.bfloat16
    for name, a, e in zip(("y", "grad_x", "grad_scale", "grad_shift"), out, ref):
        assert_close(a, e, torch.bfloat16 if name == "grad_scale" else torch.float32, name)


# --------------------------------------------------------------------------- fake tensors
# The triton path goes through torch.library custom ops (leapalign_triton::*) whose fake impls
# allocate the kernels' outputs, so on FakeTensors (how bench/measure.py sizes the full FLUX.1-dev
# on a CPU) the autograd wrapper saves what it saves around the real kernels. The helpers below
# are shared by the other ops' tests.
def saved_bytes(fn):
    """``fn()`` and the bytes autograd saved for its backward, each storage once (by identity:
    fake tensors have no data pointers)."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages.setdefault(id(s), s)  # holding s keeps the ids unique
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(s.nbytes() for s in storages.values())


def grad_run(fn, args, wrt, grad_outs):
    """Outputs of ``fn(*args)``, grads of ``wrt`` (None where unused) and the saved bytes."""
    outs, nbytes = saved_bytes(lambda: fn(*args))
    outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
    used = [(o, g) for o, g in zip(outs, grad_outs) if g is not None]
    grads = torch.autograd.grad([o for o, _ in used], wrt, [g for _, g in used], allow_unused=True)
    return outs, grads, nbytes


def fake_matches_real(op, fn, ref, make, monkeypatch):
    """``make(convert)`` -> (args, wrt, grad_outs) built from base tensors passed through
    ``convert`` (a fresh real copy, or its FakeTensor). Runs ``fn`` forward + backward with
    triton forced on real tensors (the interpreter on CPU) and on fake ones (no interpreter:
    nothing is launched), and ``ref`` on fake ones. The fake run must use triton, give outputs
    and grads of the reference's shapes and dtypes, and save exactly the real run's bytes.
    Returns (real bytes, reference bytes)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def meta(ts):
        return [None if t is None else (tuple(t.shape), t.dtype) for t in ts]

    monkeypatch.setenv("LEAPALIGN_BACKEND", "triton")
    r_outs, r_grads, r_bytes = grad_run(fn, *make(lambda t: t.detach().clone()))
    assert ran(op) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with FakeTensorMode() as mode:
        f_outs, f_grads, f_bytes = grad_run(fn, *make(mode.from_tensor))
        assert ran(op) == "triton"
        e_outs, e_grads, e_bytes = grad_run(ref, *make(mode.from_tensor))
    assert meta(f_outs) == meta(e_outs) == meta(r_outs)
    assert meta(f_grads) == meta(e_grads) == meta(r_grads)
    assert f_bytes == r_bytes, f"fake run saved {f_bytes} B, the kernels {r_bytes} B"
    return r_bytes, e_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fake_tensors_save_what_the_kernels_save(dtype, device, monkeypatch):
    x, scale, shift, gy = _inputs((2, 3, 4, 40), dtype, device)

    def make(convert):
        args = [convert(t).requires_grad_(True) for t in (x, scale, shift)]
        return args, args, [convert(gy)]

    kernel_bytes, ref_bytes = fake_matches_real("mod_layernorm", mod_layernorm, mod_layernorm_reference,
                                                make, monkeypatch)
    # x, scale and fp32 mean/rstd per row; the reference keeps fp32 activations instead, which is
    # what a fake-tensor measurement would wrongly count if it fell back to the reference.
    assert kernel_bytes == (x.numel() + scale.numel()) * x.element_size() + 2 * 24 * 4
    assert ref_bytes > kernel_bytes


def test_fake_cuda_tensors_pick_triton(monkeypatch):
    """Fake CUDA tensors (a GPU-sized measurement on a CPU) take the triton path too. Forward
    only: autograd on fake CUDA tensors aborts a CPU-only torch build."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setenv("LEAPALIGN_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with FakeTensorMode():
        x = torch.empty(2, 5, 64, dtype=torch.bfloat16, device="cuda")
        scale = torch.empty(2, 64, dtype=torch.bfloat16, device="cuda")
        y = mod_layernorm(x, scale, scale)
    assert ran("mod_layernorm") == "triton"
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_cuda


def test_opcheck_custom_ops(device):
    """torch.library.opcheck (schema, fake impl vs real outputs, aot dispatch) on the triton ops."""
    x, scale, shift, gy = _inputs((2, 3, 40), torch.float32, device)
    x = x.transpose(0, 1).contiguous().transpose(0, 1)  # strided rows, as as_rows passes them
    ops = torch.ops.leapalign_triton
    torch.library.opcheck(ops.mod_layernorm_fwd.default, (x, scale, shift, 1e-6))
    _, mean, rstd = ops.mod_layernorm_fwd(x, scale, shift, 1e-6)
    torch.library.opcheck(ops.mod_layernorm_bwd.default, (gy, x, scale.bfloat16(), mean, rstd))
