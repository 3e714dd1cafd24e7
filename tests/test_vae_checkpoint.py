"""engine.flux.vae: exact fine-grained recomputation of the frozen VAE decoder.

Decode output and the gradient into the latent are bit-identical to the plain decoder's (odd latent
sizes, batch 2, fp32 CPU; also bf16 and CPU autocast); the bytes kept for the backward and the
forward+backward peak are below diffusers' per-block checkpointing; undo restores the module.
"""
from __future__ import annotations

import gc

import pytest
import torch

from diffusers import AutoencoderKL

from engine.flux.tiny import tiny_vae_config
from engine.flux.vae import (GRANULARITIES, checkpoint_decoder, decoder_checkpointing, frozen_conv2d,
                             frozen_group_norm_silu, uncheckpoint_decoder)
from engine.memory import PeakLiveBytes, held_bytes


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convs: intra-op threads only spin (100x slower on a shared 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def three_block_config() -> dict:
    c = tiny_vae_config()
    c.update(down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
             block_out_channels=[8, 16, 16], layers_per_block=2)
    return c


def flux_like_config() -> dict:
    """Flux's VAE layout (4 up blocks, 3 resnets each, widest at low resolution), narrow."""
    c = tiny_vae_config()
    c.update(block_out_channels=[8, 16, 32, 32], layers_per_block=2)
    return c


CONFIGS = {"tiny": (tiny_vae_config, (2, 4, 5, 7)), "three_block": (three_block_config, (2, 4, 7, 5))}


def make_vae(config_fn, seed=0) -> AutoencoderKL:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**config_fn())
    return vae.requires_grad_(False).eval()


def decode_and_grad(vae, z0, cot=None, autocast=False):
    z = z0.clone().requires_grad_(True)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        y = vae.decode(z).sample
    if cot is None:
        cot = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    (y * cot).sum().backward()
    return y.detach(), z.grad, cot


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request):
    config_fn, shape = CONFIGS[request.param]
    vae = make_vae(config_fn)
    z0 = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    y0, g0, cot = decode_and_grad(vae, z0)
    return vae, z0, cot, y0, g0


@pytest.mark.parametrize("frozen_ops", [True, False])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_exact_decode_and_latent_gradient(case, granularity, frozen_ops):
    vae, z0, cot, y0, g0 = case
    checkpoint_decoder(vae, granularity, frozen_ops=frozen_ops)
    try:
        y, g, _ = decode_and_grad(vae, z0, cot)
    finally:
        uncheckpoint_decoder(vae)
    assert torch.equal(y, y0)
    assert torch.equal(g, g0), (g - g0).abs().max()


def test_exact_with_diffusers_checkpointing_on_and_flag_kept():
    vae = make_vae(tiny_vae_config)
    z0 = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(3))
    y0, g0, cot = decode_and_grad(vae, z0)
    vae.enable_gradient_checkpointing()
    checkpoint_decoder(vae)
    y, g, _ = decode_and_grad(vae, z0, cot)
    assert torch.equal(y, y0) and torch.equal(g, g0)
    uncheckpoint_decoder(vae)
    assert vae.decoder.gradient_checkpointing and vae.decoder.mid_block.gradient_checkpointing
    y, g, _ = decode_and_grad(vae, z0, cot)       # diffusers' own path again
    assert torch.equal(y, y0) and torch.equal(g, g0)


@pytest.mark.parametrize("mode", ["bf16", "autocast"])
def test_exact_bf16_and_autocast(mode):
    vae = make_vae(tiny_vae_config)
    z0 = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(4))
    if mode == "bf16":
        vae, z0 = vae.to(torch.bfloat16), z0.to(torch.bfloat16)
    y0, g0, cot = decode_and_grad(vae, z0, autocast=mode == "autocast")
    checkpoint_decoder(vae)
    y, g, _ = decode_and_grad(vae, z0, cot, autocast=mode == "autocast")
    assert y.dtype == y0.dtype == torch.bfloat16
    assert torch.equal(y, y0) and torch.equal(g, g0)


def test_trainable_vae_keeps_weight_gradients():
    """A VAE whose weights require grad gets plain ops (frozen ops would drop weight grads)."""
    vae = make_vae(tiny_vae_config).requires_grad_(True)
    z0 = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(5))
    y0, g0, cot = decode_and_grad(vae, z0)
    w0 = {n: p.grad.clone() for n, p in vae.decoder.named_parameters()}
    vae.zero_grad(set_to_none=True)
    checkpoint_decoder(vae, "auto")
    y, g, _ = decode_and_grad(vae, z0, cot)
    assert torch.equal(y, y0) and torch.equal(g, g0)
    for n, p in vae.decoder.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, w0[n]), n


def test_frozen_ops_exact_channels_last():
    """The decoder runs channels-last after the mid-block attention: the frozen conv's shape-only
    backward must pick the same layout (and so the same kernel) as autograd's."""
    g = torch.Generator().manual_seed(6)
    conv = torch.nn.Conv2d(8, 16, 3, padding=1).requires_grad_(False)
    norm = torch.nn.GroupNorm(4, 8, eps=1e-6).requires_grad_(False)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x0 = torch.randn(2, 8, 9, 11, generator=g).contiguous(memory_format=fmt)
        for f_plain, f_frozen in ((conv, lambda t: frozen_conv2d(conv, t)),
                                  (lambda t: torch.nn.functional.silu(norm(t)),
                                   lambda t: frozen_group_norm_silu(norm, torch.nn.SiLU(), t))):
            outs = []
            for f in (f_plain, f_frozen):
                x = x0.clone(memory_format=torch.preserve_format).requires_grad_(True)
                y = f(x)
                (gx,) = torch.autograd.grad(y, x, torch.ones_like(y) * 0.37 + y.detach())
                outs.append((y, gx))
            (y0, gx0), (y1, gx1) = outs
            assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
            assert gx0.stride() == gx1.stride()


def _measure(vae, z0, setup):
    uncheckpoint_decoder(vae)
    vae.disable_gradient_checkpointing()
    setup(vae)
    params = list(vae.parameters())
    z = z0.clone().requires_grad_(True)
    y, held = held_bytes(lambda: vae.decode(z).sample, exclude=params)
    del y
    gc.collect()
    z = z0.clone().requires_grad_(True)
    with PeakLiveBytes() as m:
        for p in params:
            m._track(p, new=False)
        vae.decode(z).sample.square().sum().backward()
    return held, m.peak


def test_memory_below_diffusers_per_block():
    """On FakeTensors (bytes without compute, as bench/bench_step.py measures Flux's VAE)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        vae = AutoencoderKL(**flux_like_config()).requires_grad_(False).eval()
        z0 = torch.randn(1, 4, 32, 32)
        _memory_below_diffusers_per_block(vae, z0)


def _memory_below_diffusers_per_block(vae, z0):
    plain = _measure(vae, z0, lambda v: None)
    diff = _measure(vae, z0, lambda v: v.enable_gradient_checkpointing())
    ours = {gr: _measure(vae, z0, lambda v, gr=gr: checkpoint_decoder(v, gr)) for gr in GRANULARITIES}
    assert diff[1] < plain[1]
    for gr in ("auto", "block"):
        assert ours[gr][0] < diff[0], (gr, ours[gr], diff)        # held for the backward
    for gr in GRANULARITIES:
        assert ours[gr][1] < diff[1], (gr, ours[gr], diff)        # forward+backward peak
    assert ours["auto"][1] <= min(ours["block"][1], ours["resnet"][1])
    assert ours["auto"][1] < 0.7 * diff[1]


def test_install_is_idempotent_reversible_and_leaves_the_module_alone():
    vae = make_vae(three_block_config)
    dec = vae.decoder
    sd0 = {k: (v.data_ptr(), v.clone()) for k, v in vae.state_dict().items()}
    params0 = [(n, id(p), p.requires_grad) for n, p in vae.named_parameters()]
    assert decoder_checkpointing(vae) is None
    checkpoint_decoder(vae)
    checkpoint_decoder(vae)   # idempotent
    assert decoder_checkpointing(vae) == {"granularity": "auto", "frozen_ops": True}
    checkpoint_decoder(dec, "resnet", frozen_ops=False)   # the Decoder itself also works; re-sets
    assert decoder_checkpointing(vae) == {"granularity": "resnet", "frozen_ops": False}
    sd1 = vae.state_dict()
    assert sd1.keys() == sd0.keys()
    assert all(sd1[k].data_ptr() == sd0[k][0] and torch.equal(sd1[k], sd0[k][1]) for k in sd0)
    assert [(n, id(p), p.requires_grad) for n, p in vae.named_parameters()] == params0
    z = torch.randn(2, 4, 7, 5, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():                      # no-grad decodes take diffusers' own forward
        a = vae.decode(z).sample
    assert uncheckpoint_decoder(vae) is True
    assert uncheckpoint_decoder(vae) is False
    assert "forward" not in dec.__dict__ and decoder_checkpointing(vae) is None
    assert dec.forward.__func__ is type(dec).forward
    with torch.no_grad():
        assert torch.equal(vae.decode(z).sample, a)
    assert vae.state_dict().keys() == sd0.keys()
    with pytest.raises(ValueError):
        checkpoint_decoder(vae, "layer")
    with pytest.raises(TypeError):
        checkpoint_decoder(torch.nn.Linear(2, 2))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_plain_decoder(dtype):
    """On CUDA the frozen conv's backward hands cuDNN a shape-only stand-in for the input; the
    gradient must still be the plain decoder's (to the run-to-run spread of cuDNN's algorithms)."""
    vae = make_vae(flux_like_config).to("cuda", dtype)
    z0 = torch.randn(2, 4, 12, 10, generator=torch.Generator().manual_seed(0)).to("cuda", dtype)
    cot = torch.randn(2, 3, 96, 80, generator=torch.Generator().manual_seed(1)).to("cuda", dtype)

    def run():
        z = z0.clone().requires_grad_(True)
        y = vae.decode(z).sample
        (y * cot).sum().backward()
        return y.detach().float(), z.grad.float()

    y_ref, g_ref = run()
    checkpoint_decoder(vae, "auto")
    y, g = run()
    uncheckpoint_decoder(vae)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(g, g_ref, **tol)
