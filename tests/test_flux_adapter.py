"""FluxAdapter against diffusers' own FluxPipeline on the tiny model (CPU, fp32)."""
import os

import numpy as np
import pytest
import torch

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from engine.flux.adapter import FluxAdapter, FluxCond
from engine.flux.tiny import (HashTextEncoder, build_tiny_flux, tiny_transformer_config,
                              tiny_vae_config)

# FLUX.1-dev scheduler config
FLUX_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)
RESOLUTIONS = [(64, 64), (48, 80)]  # square and non-square (3x5 packed tokens)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_flux(seed=0)


@pytest.fixture(scope="module")
def text():
    cfg = tiny_transformer_config()
    enc = HashTextEncoder(cfg["joint_attention_dim"], cfg["pooled_projection_dim"], max_length=16, seed=0)
    return enc.encode(["a photo of a cat", "A red CAR on a street at night"])


def make_pipe(adapter):
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=adapter.vae,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        transformer=adapter.transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_sigmas(T, image_seq_len):
    """The pipeline's own schedule: linspace(1, 1/T, T), dynamic shift mu, scheduler.sigmas (T+1)."""
    sched = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    mu = calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / T, T), mu=mu)
    return sched.sigmas


@pytest.mark.parametrize("height,width", RESOLUTIONS)
@pytest.mark.parametrize("steps", [2, 5])
def test_rollout_matches_flux_pipeline(tiny, text, height, width, steps):
    pe, pooled = text
    pipe = make_pipe(tiny)
    x1 = tiny.noise(2, height, width, torch.Generator().manual_seed(1))
    ref = pipe(prompt_embeds=pe, pooled_prompt_embeds=pooled, latents=x1.clone(), height=height,
               width=width, num_inference_steps=steps, guidance_scale=3.5, output_type="latent",
               return_dict=False)[0]
    cond = tiny.condition(pe, pooled, height, width)
    sig = flux_sigmas(steps, tiny.image_seq_len(height, width))
    assert sig.shape == (steps + 1,) and sig[0] == 1 and sig[-1] == 0
    out = tiny.rollout(x1, sig, cond)
    assert out.shape == ref.shape == x1.shape
    assert (out - ref).abs().max().item() < 1e-5
    assert (out - x1).abs().max().item() > 1e-2  # it did move


def test_condition_conventions(tiny, text):
    pe, pooled = text
    cond = tiny.condition(pe, pooled, 48, 80)
    assert isinstance(cond, FluxCond)
    assert cond.txt_ids.shape == (pe.shape[1], 3) and not cond.txt_ids.any()
    n = tiny.image_seq_len(48, 80)
    assert n == 15 and cond.img_ids.shape == (n, 3)
    assert torch.equal(cond.img_ids, FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))
    assert cond.guidance.dtype == torch.float32 and cond.guidance.tolist() == [3.5, 3.5]
    assert (cond.height, cond.width) == (48, 80)
    assert tiny.vae_scale_factor == 8 and FluxAdapter(tiny.transformer).vae_scale_factor == 8


def test_decode_matches_pipeline_and_has_grad(tiny):
    h, w = 64, 48
    x = tiny.noise(2, h, w, torch.Generator().manual_seed(3)).requires_grad_(True)
    img = tiny.decode(x, h, w)
    assert img.shape == (2, 3, h, w)
    # the pipeline's decode path (pipeline_flux.py, output_type != "latent") + postprocess denormalize
    pipe = make_pipe(tiny)
    with torch.no_grad():
        lat = FluxPipeline._unpack_latents(x.detach(), h, w, pipe.vae_scale_factor)
        lat = lat / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        ref = pipe.vae.decode(lat, return_dict=False)[0]
        ref = pipe.image_processor.postprocess(ref, output_type="pt")
    assert (img.detach() - ref).abs().max().item() < 1e-6
    assert img.min() >= 0 and img.max() <= 1
    img.mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.vae.parameters())  # the decoder stays frozen


def test_velocity_differentiable_and_noise(tiny, text):
    pe, pooled = text
    h, w = 64, 64
    g = torch.Generator().manual_seed(7)
    x = tiny.noise(2, h, w, g)
    # noise == FluxPipeline.prepare_latents with the same generator
    pipe = make_pipe(tiny)
    ref, ids = pipe.prepare_latents(2, 4, h, w, torch.float32, torch.device("cpu"),
                                    torch.Generator().manual_seed(7))
    assert torch.equal(x, ref)
    cond = tiny.condition(pe, pooled, h, w)
    assert torch.equal(cond.img_ids, ids)

    tiny.transformer.zero_grad(set_to_none=True)
    x = x.requires_grad_(True)
    v_fn = tiny.velocity_fn(cond)
    v = v_fn(x, torch.tensor(0.7))
    assert v.shape == x.shape and v.dtype == x.dtype
    v.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    grads = [p.grad for p in tiny.transformer.parameters() if p.requires_grad]
    assert all(gr is not None for gr in grads) and sum(gr.abs().sum() for gr in grads) > 0
    tiny.transformer.zero_grad(set_to_none=True)
    # float sigma == tensor sigma; different sigma -> different velocity
    with torch.no_grad():
        assert torch.equal(tiny.velocity(x, 0.7, cond), v.detach())
        assert not torch.allclose(tiny.velocity(x, 0.2, cond), v.detach())
    # dtype handling: a float64 x comes back float64
    with torch.no_grad():
        v64 = tiny.velocity(x.detach().double(), torch.tensor(0.7), cond)
    assert v64.dtype == torch.float64 and torch.equal(v64.float(), v.detach())


def test_build_tiny_is_deterministic_and_rng_neutral():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a, b = build_tiny_flux(seed=0), build_tiny_flux(seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (ka, pa), (kb, pb) in zip(a.transformer.state_dict().items(), b.transformer.state_dict().items()):
        assert ka == kb and torch.equal(pa, pb)
    c = build_tiny_flux(seed=1)
    assert not torch.equal(next(iter(a.vae.parameters())), next(iter(c.vae.parameters())))


def test_from_pretrained_roundtrip_and_missing(tiny, text, tmp_path):
    tiny.transformer.save_pretrained(tmp_path / "transformer")
    tiny.vae.save_pretrained(tmp_path / "vae")
    loaded = FluxAdapter.from_pretrained(tmp_path, torch_dtype=torch.float32, device="cpu")
    assert isinstance(loaded.transformer, FluxTransformer2DModel) and isinstance(loaded.vae, AutoencoderKL)
    pe, pooled = text
    h, w = 64, 64
    x = tiny.noise(2, h, w, torch.Generator().manual_seed(0))
    sig = flux_sigmas(2, tiny.image_seq_len(h, w))
    c0, c1 = tiny.condition(pe, pooled, h, w), loaded.condition(pe, pooled, h, w)
    assert torch.equal(tiny.rollout(x, sig, c0), loaded.rollout(x, sig, c1))
    with torch.no_grad():
        assert torch.equal(tiny.decode(x, h, w), loaded.decode(x, h, w))
    assert FluxAdapter.from_pretrained(tmp_path, load_vae=False).vae is None

    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        FluxAdapter.from_pretrained(missing)
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    os.remove(weights)
    with pytest.raises(FileNotFoundError, match=str(weights)):
        FluxAdapter.from_pretrained(tmp_path)
    FluxAdapter.from_pretrained(tmp_path, load_vae=False)  # the VAE is not needed then
    os.remove(tmp_path / "transformer" / "config.json")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "transformer" / "config.json")):
        FluxAdapter.from_pretrained(tmp_path, load_vae=False)
    import shutil
    shutil.rmtree(tmp_path / "transformer")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "transformer")):
        FluxAdapter.from_pretrained(tmp_path, load_vae=False)


def test_hash_text_encoder():
    a = HashTextEncoder(32, 24, max_length=8, seed=0)
    b = HashTextEncoder(32, 24, max_length=8, seed=0)
    prompts = ["A cat", "a   CAT", "a dog", "", " ".join(["word"] * 20)]
    pa, qa = a.encode(prompts)
    pb, qb = b.encode(prompts)
    assert pa.shape == (5, 8, 32) and qa.shape == (5, 24)
    assert torch.equal(pa, pb) and torch.equal(qa, qb)
    assert torch.equal(pa[0], pa[1]) and torch.equal(qa[0], qa[1])  # lower-cased whitespace tokens
    assert not torch.equal(pa[0], pa[2]) and not torch.equal(qa[0], qa[2])
    assert torch.isfinite(qa).all()  # empty prompt: pad pooled vector
    c = HashTextEncoder(32, 24, max_length=8, seed=1)
    assert not torch.equal(c.encode(["a cat"])[0], pa[:1])
