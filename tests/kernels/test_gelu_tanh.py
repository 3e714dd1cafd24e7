"""gelu_tanh: Triton vs torch's gelu(approximate="tanh"), forward and backward.

Without CUDA the kernels run under TRITON_INTERPRET=1 on CPU tensors; with CUDA the same tests run
the compiled kernels on the GPU.
"""
import pytest
import torch

from kernels import backend

from .conftest import ran
from kernels.gelu_tanh import gelu_tanh, gelu_tanh_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OP = "gelu_tanh"
# single element; one block minus/plus one (block = 1024); several blocks with a ragged tail;
# a 4-d activation; an empty tensor
SHAPES = [(1,), (1023,), (3, 5, 69), (2, 1025), (2, 3, 4, 97), (0, 8)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "triton")


def sample(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # wide range: tanh saturates in both directions, plus the region around zero
    return (torch.randn(shape, generator=g) * 4).to(DEVICE, dtype)


def check(x, tol_fwd, tol_bwd):
    xt = x.detach().clone().requires_grad_()
    y = gelu_tanh(xt)
    assert ran(OP) == "triton"
    assert y.dtype == x.dtype and y.shape == x.shape
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device, y.dtype)
    (dx,) = torch.autograd.grad(y, xt, dy)

    # reference in fp32 on the same (upcast) values: the kernel computes in fp32 and rounds once
    xr = x.detach().float().requires_grad_()
    yr = gelu_tanh_reference(xr)
    (dxr,) = torch.autograd.grad(yr, xr, dy.float())
    torch.testing.assert_close(y.float(), yr, rtol=tol_fwd, atol=tol_fwd)
    torch.testing.assert_close(dx.float(), dxr, rtol=tol_bwd, atol=tol_bwd)
    return y, dx


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference(shape, dtype, triton_backend):
    x = sample(shape, dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    y, dx = check(x, tol, tol)
    if dtype != torch.float32 and x.numel():
        # and against torch's own half-precision op (it too computes in fp32 internally)
        torch.testing.assert_close(y, gelu_tanh_reference(x), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_input(dtype, triton_backend):
    # a transposed and a strided view: copied once into a flat buffer by the wrapper
    base = sample((6, 40), dtype)
    for x in (base.t(), base[:, ::3]):
        assert not x.is_contiguous()
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        check(x, tol, tol)


def test_grad_flows_through_view(triton_backend):
    base = sample((8, 12), torch.float32).requires_grad_()
    y = gelu_tanh(base[:, 1::2])
    y.sum().backward()
    ref_base = base.detach().clone().requires_grad_()
    gelu_tanh_reference(ref_base[:, 1::2]).sum().backward()
    torch.testing.assert_close(base.grad, ref_base.grad, rtol=1e-5, atol=1e-6)
    assert base.grad[:, 0::2].abs().max() == 0


def test_extreme_values(triton_backend):
    # saturation must not produce inf/nan (tanh is built from exp(-2|u|))
    x = torch.tensor([-1e4, -30.0, -10.0, -1e-6, 0.0, 1e-6, 10.0, 30.0, 1e4], device=DEVICE)
    check(x, 1e-5, 1e-5)


def test_reference_gradcheck_float64():
    x = (torch.randn(7, 3, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(gelu_tanh_reference, (x,))


def test_backend_choice_is_recorded(monkeypatch):
    x = sample((5,), torch.float32)
    monkeypatch.setenv(backend.ENV_VAR, "torch")
    torch.testing.assert_close(gelu_tanh(x), gelu_tanh_reference(x))
    assert ran(OP) == "torch"
    monkeypatch.delenv(backend.ENV_VAR)
    gelu_tanh(x)
    assert ran(OP) == "triton"
    monkeypatch.setenv(backend.ENV_VAR, "cuda")
    with pytest.raises(RuntimeError):  # no csrc version of this op; forcing never falls back
        gelu_tanh(x)


@pytest.mark.gpu
def test_cuda_bf16_flux_mlp_size(triton_backend):
    # Flux's MLP hidden activation: 4608 tokens x 12288
    x = (torch.randn(1, 4608, 12288, device="cuda") * 3).to(torch.bfloat16)
    check(x, 1e-2, 1e-2)


# ----------------------------------------------------------------------------- fake tensors
@pytest.mark.parametrize("strided", [False, True], ids=["dense", "strided"])
def test_fake_tensors_save_what_the_kernels_save(strided, monkeypatch):
    """FakeTensorMode with triton forced: the custom ops' fake impls stand in for the kernels, so
    the saved bytes are the kernels' (the dense input; a copy of a strided one)."""
    from .test_mod_layernorm import fake_matches_real

    x = sample((3, 5, 69), torch.bfloat16)
    dy = sample((5, 3, 69) if strided else (3, 5, 69), torch.bfloat16, seed=1)

    def make(convert):
        leaf = convert(x).requires_grad_(True)
        arg = leaf.transpose(0, 1) if strided else leaf
        return [arg], [leaf], [convert(dy)]

    kernel_bytes, _ = fake_matches_real(OP, gelu_tanh, gelu_tanh_reference, make, monkeypatch)
    assert kernel_bytes == x.numel() * x.element_size()


def test_opcheck_custom_ops():
    x, dy = sample((3, 70), torch.float32), sample((3, 70), torch.float32, seed=1)
    ops = torch.ops.leapalign_triton
    torch.library.opcheck(ops.gelu_tanh_fwd.default, (x,))
    torch.library.opcheck(ops.gelu_tanh_fwd.default, (x.t(),))  # strided: copied to a dense buffer
    torch.library.opcheck(ops.gelu_tanh_bwd.default, (x, dy))
