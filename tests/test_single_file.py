"""FluxAdapter.from_pretrained(transformer_file=...): one-file transformer checkpoints, in diffusers'
key layout and in BFL's original one (flux1-dev.safetensors), on the tiny model (CPU, fp32)."""

import pytest
import torch
from safetensors.torch import save_file

from diffusers import FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

from engine.flux.adapter import FluxAdapter, bfl_to_diffusers
from engine.flux.tiny import HashTextEncoder, build_tiny_flux, tiny_transformer_config


def diffusers_to_bfl(sd: dict, cfg: dict) -> dict:
    """The inverse of diffusers' convert_flux_transformer_checkpoint_to_diffusers, written out by
    hand (not from the adapter's tables) so the two directions check each other."""
    sd = dict(sd)
    out = {}

    def take(src, dst):
        out[dst] = sd.pop(src)

    def fuse(srcs, dst):
        out[dst] = torch.cat([sd.pop(s) for s in srcs], dim=0)

    for p in ("weight", "bias"):
        for bfl, dif in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                         ("guidance_in", "guidance_embedder")):
            if f"time_text_embed.{dif}.linear_1.{p}" in sd:
                take(f"time_text_embed.{dif}.linear_1.{p}", f"{bfl}.in_layer.{p}")
                take(f"time_text_embed.{dif}.linear_2.{p}", f"{bfl}.out_layer.{p}")
        take(f"context_embedder.{p}", f"txt_in.{p}")
        take(f"x_embedder.{p}", f"img_in.{p}")
        take(f"proj_out.{p}", f"final_layer.linear.{p}")
        scale, shift = sd.pop(f"norm_out.linear.{p}").chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale], dim=0)

        for i in range(cfg["num_layers"]):
            d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
            take(d + f"norm1.linear.{p}", b + f"img_mod.lin.{p}")
            take(d + f"norm1_context.linear.{p}", b + f"txt_mod.lin.{p}")
            fuse([d + f"attn.to_{c}.{p}" for c in "qkv"], b + f"img_attn.qkv.{p}")
            fuse([d + f"attn.add_{c}_proj.{p}" for c in "qkv"], b + f"txt_attn.qkv.{p}")
            take(d + f"attn.to_out.0.{p}", b + f"img_attn.proj.{p}")
            take(d + f"attn.to_add_out.{p}", b + f"txt_attn.proj.{p}")
            take(d + f"ff.net.0.proj.{p}", b + f"img_mlp.0.{p}")
            take(d + f"ff.net.2.{p}", b + f"img_mlp.2.{p}")
            take(d + f"ff_context.net.0.proj.{p}", b + f"txt_mlp.0.{p}")
            take(d + f"ff_context.net.2.{p}", b + f"txt_mlp.2.{p}")
        for i in range(cfg["num_single_layers"]):
            d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
            take(d + f"norm.linear.{p}", b + f"modulation.lin.{p}")
            fuse([d + f"attn.to_{c}.{p}" for c in "qkv"] + [d + f"proj_mlp.{p}"], b + f"linear1.{p}")
            take(d + f"proj_out.{p}", b + f"linear2.{p}")
    for i in range(cfg["num_layers"]):
        d, b = f"transformer_blocks.{i}.attn.", f"double_blocks.{i}."
        take(d + "norm_q.weight", b + "img_attn.norm.query_norm.scale")
        take(d + "norm_k.weight", b + "img_attn.norm.key_norm.scale")
        take(d + "norm_added_q.weight", b + "txt_attn.norm.query_norm.scale")
        take(d + "norm_added_k.weight", b + "txt_attn.norm.key_norm.scale")
    for i in range(cfg["num_single_layers"]):
        d, b = f"single_transformer_blocks.{i}.attn.", f"single_blocks.{i}."
        take(d + "norm_q.weight", b + "norm.query_norm.scale")
        take(d + "norm_k.weight", b + "norm.key_norm.scale")
    assert not sd, f"keys the inverse conversion does not know: {sorted(sd)}"
    return out


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_flux(seed=0)


@pytest.fixture(scope="module")
def folder(tiny, tmp_path_factory):
    """A model folder with transformer/config.json only (no transformer weights) and the VAE."""
    root = tmp_path_factory.mktemp("flux_single")
    tiny.transformer.save_config(root / "transformer")
    tiny.vae.save_pretrained(root / "vae")
    sd = {k: v.contiguous() for k, v in tiny.transformer.state_dict().items()}
    save_file(sd, root / "diffusers_format.safetensors")
    save_file(diffusers_to_bfl(sd, tiny_transformer_config()), root / "flux1-tiny.safetensors")
    return root


def velocity(adapter, x, sigma=0.6):
    cfg = tiny_transformer_config()
    enc = HashTextEncoder(cfg["joint_attention_dim"], cfg["pooled_projection_dim"], max_length=8, seed=0)
    pe, pooled = enc.encode(["a photo of a cat", "a red car"])
    with torch.no_grad():
        return adapter.velocity(x, sigma, adapter.condition(pe, pooled, 64, 48))


@pytest.mark.parametrize("name", ["diffusers_format.safetensors", "flux1-tiny.safetensors"])
def test_single_file_matches_original(tiny, folder, name):
    loaded = FluxAdapter.from_pretrained(folder, transformer_file=folder / name)
    assert isinstance(loaded.transformer, FluxTransformer2DModel) and loaded.vae is not None
    ref = tiny.transformer.state_dict()
    got = loaded.transformer.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    x = tiny.noise(2, 64, 48, torch.Generator().manual_seed(0))
    v0, v1 = velocity(tiny, x), velocity(loaded, x)
    assert (v0 - v1).abs().max().item() < 1e-6 and v0.abs().max() > 0
    with torch.no_grad():
        assert torch.equal(tiny.decode(x, 64, 48), loaded.decode(x, 64, 48))


def test_bfl_layout_is_what_diffusers_converts_at_flux1_width():
    """diffusers' converter only handles FLUX.1's width (3072); there, ours must give the same
    tensors. Thin (rows, 1) tensors keep the real row counts at no memory cost."""
    cfg = dict(num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
               joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
               in_channels=64, axes_dims_rope=[16, 56, 56])
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in FluxTransformer2DModel(**cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s[0], *([1] if len(s) > 1 else []), generator=g) for k, s in shapes.items()}
    bfl = diffusers_to_bfl(sd, cfg)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    ours = bfl_to_diffusers(dict(bfl), cfg)
    assert ours.keys() == theirs.keys() == sd.keys()
    assert all(torch.equal(ours[k], theirs[k]) and torch.equal(ours[k], sd[k]) for k in sd)


def test_all_in_one_prefix_and_dtype(tiny, folder, tmp_path):
    """ComfyUI-style files hold the transformer under model.diffusion_model. next to other parts."""
    bfl = diffusers_to_bfl(tiny.transformer.state_dict(), tiny_transformer_config())
    sd = {"model.diffusion_model." + k: v for k, v in bfl.items()}
    sd["first_stage_model.decoder.conv_in.weight"] = torch.zeros(2, 2)
    f = tmp_path / "all_in_one.safetensors"
    save_file(sd, f)
    loaded = FluxAdapter.from_pretrained(folder, torch_dtype=torch.bfloat16, load_vae=False,
                                         transformer_file=str(f))
    assert loaded.vae is None and loaded.dtype == torch.bfloat16
    ref = tiny.transformer.state_dict()
    assert all(torch.equal(v, ref[k].to(torch.bfloat16)) for k, v in loaded.transformer.state_dict().items())


def test_single_file_errors(tiny, folder, tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        FluxAdapter.from_pretrained(folder, transformer_file=missing)
    # the config still comes from the folder: without transformer/config.json there is no model
    (tmp_path / "vae").symlink_to(folder / "vae")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "transformer" / "config.json")):
        FluxAdapter.from_pretrained(tmp_path, transformer_file=folder / "flux1-tiny.safetensors")

    def bad(sd, what):
        f = tmp_path / "bad.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, f)
        with pytest.raises(ValueError, match=rf"{f}.*{what}"):
            FluxAdapter.from_pretrained(folder, load_vae=False, transformer_file=f)

    bad(tiny.vae.state_dict(), "missing keys")  # another model altogether
    sd = dict(tiny.transformer.state_dict())
    sd.pop("proj_out.bias")
    bad(sd, "missing keys .*proj_out.bias")
    # a wider BFL file than the config: the fused splits no longer fit
    wide = dict(tiny_transformer_config(), num_attention_heads=3, axes_dims_rope=[4, 6, 6])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        other = FluxTransformer2DModel(**wide).state_dict()
    bad(diffusers_to_bfl(other, wide), "shape mismatches")
    f = tmp_path / "garbage.safetensors"
    f.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=str(f)):
        FluxAdapter.from_pretrained(folder, load_vae=False, transformer_file=f)
