"""The learned rewards (HPS v2.1, PickScore, CLIP score, mix) on tiny random models of the same
architectures, written to tmp_path and loaded through the same code path as the real weights.

What is checked: the score is what the official scorer computes (for the HPS model, open_clip's
own CLIP when open_clip can be imported; for PickScore / CLIP, the transformers model run on the
official processor's output); the gradient reaches the image; the reward's parameters are frozen;
the tensor preprocessing agrees with the official PIL-based preprocessing; missing files raise
FileNotFoundError naming the path. No hub access: every model comes from tmp_path.

Preprocessing agreement (bicubic, antialias, measured on smooth 8-bit images): an image already at
the model's size is bit-identical; at any size the resampling kernel equals PIL's float32 resize
to ~1e-5; against the official uint8 pipeline the residual is PIL's 8-bit rounding of each of its
two resampling passes, ~0.25/255 mean and ~1/255 max in pixel units (the thresholds below).
"""
import gzip
import importlib.util
import json

import numpy as np
import pytest
import torch

from engine.rewards import REWARDS, build_reward
from engine.rewards.hps import CLIPBPETokenizer, OpenCLIPModel, _bytes_to_unicode, _open_clip_dir
from engine.rewards.preprocess import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocess, center_crop,
                                      shortest_edge_size)
from tests.images import smooth_image, to_tensor

PROMPTS = ["a photo of a cat", "a cat"]

# --------------------------------------------------------------------------------------------
# helpers: a minimal valid CLIP BPE vocabulary, images, and the official PIL pipelines

MERGES = [("c", "a"), ("ca", "t</w>"), ("o", "f</w>"), ("p", "h"), ("ph", "o"), ("pho", "t"), ("phot", "o</w>")]


def write_tiny_bpe(folder):
    """The same tiny BPE in open_clip's .txt.gz format and transformers' vocab.json + merges.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [" ".join(m) for m in MERGES]
    gz = folder / "bpe_tiny.txt.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("#version: tiny\n" + "\n".join(lines) + "\n")
    base = list(_bytes_to_unicode().values())
    vocab = base + [b + "</w>" for b in base] + ["".join(m) for m in MERGES] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return gz, len(vocab)


def openclip_preprocess_val(arr, size=224):
    """open_clip's ``preprocess_val`` (Resize(size, BICUBIC) -> CenterCrop -> ToTensor -> Normalize)
    on a PIL image: open_clip's own transform when open_clip imports, else the same steps on PIL
    (torchvision hands a PIL image to ``Image.resize(BICUBIC)``)."""
    from PIL import Image

    pil = Image.fromarray(arr)
    try:
        import open_clip

        return open_clip.image_transform(size, is_train=False)(pil)[None]
    except Exception:  # open_clip needs a torchvision that matches torch: not on a CPU-torch machine
        h, w = arr.shape[:2]
        nh, nw = shortest_edge_size(h, w, size)
        out = to_tensor(np.asarray(pil.resize((nw, nh), Image.BICUBIC)))
        out = center_crop(out, (size, size), "round")
        mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
        return (out - mean) / std


def pil_float_resize(arr, size_hw):
    """PIL's bicubic resize on float32 channels (mode "F"): PIL's kernel without 8-bit rounding."""
    from PIL import Image

    a = arr.astype(np.float32) / 255.0
    h, w = size_hw
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(a[..., c]), mode="F").resize((w, h), Image.BICUBIC))
             for c in range(3)]
    return torch.from_numpy(np.stack(chans))[None]


def check_grad(reward, h=64, w=64):
    x = torch.rand(len(PROMPTS), 3, h, w, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    s = reward(x, PROMPTS)
    assert s.shape == (len(PROMPTS),) and torch.isfinite(s).all()
    s.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.parameters())
    assert all(p.grad is None for p in reward.parameters())
    assert not reward.training
    return s


# --------------------------------------------------------------------------------------------
# preprocessing

@pytest.mark.parametrize("mode", ["shortest_crop", "longest_pad"])
def test_preprocess_exact_size_equals_openclip(mode):
    arr = smooth_image(224, 224)
    ours = ImagePreprocess(size=224, mode=mode)(to_tensor(arr))
    assert torch.allclose(ours, openclip_preprocess_val(arr), atol=1e-5)


@pytest.mark.parametrize("hw", [(448, 448), (512, 512), (1024, 1024), (512, 768), (225, 337)])
def test_preprocess_kernel_equals_pil_bicubic(hw):
    """The antialiased bicubic kernel is PIL's: against PIL's float resize, ~1e-6 at any size."""
    arr = smooth_image(*hw)
    pre = ImagePreprocess(size=224, mean=(0.0,) * 3, std=(1.0,) * 3)
    ref = center_crop(pil_float_resize(arr, shortest_edge_size(*hw, 224)), (224, 224), "round")
    assert (pre(to_tensor(arr)) - ref).abs().max() < 1e-4


@pytest.mark.parametrize("hw", [(448, 448), (1024, 1024), (512, 768)])
def test_preprocess_vs_openclip_val_uint8(hw):
    """Against the whole official (8-bit PIL) pipeline: the residual is its 8-bit rounding."""
    arr = smooth_image(*hw, seed=1)
    ours = ImagePreprocess(size=224, clamp=True)(to_tensor(arr))
    diff = (ours - openclip_preprocess_val(arr)).abs() * torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    assert diff.mean() < 0.5 / 255 and diff.max() < 2.0 / 255, (diff.mean() * 255, diff.max() * 255)


def test_preprocess_longest_pad_geometry():
    """HPSv2's ResizeMaxSize: longer side to 224, shorter padded with black, centred."""
    x = torch.rand(1, 3, 100, 200)
    out = ImagePreprocess(size=224, mode="longest_pad", mean=(0.0,) * 3, std=(1.0,) * 3)(x)
    assert out.shape == (1, 3, 224, 224)
    assert out[..., :56, :].abs().max() == 0 and out[..., 168:, :].abs().max() == 0
    assert out[..., 56:168, :].abs().sum() > 0
    sq = torch.rand(1, 3, 512, 512)
    a = ImagePreprocess(size=224, mode="longest_pad")(sq)
    b = ImagePreprocess(size=224, mode="shortest_crop")(sq)
    assert torch.equal(a, b)


def test_preprocess_is_differentiable():
    x = torch.rand(2, 3, 300, 400, requires_grad=True)
    ImagePreprocess(size=224, clamp=True)(x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# HPS v2.1 (OpenCLIP)

TINY_OPENCLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 8, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 521, "width": 32, "heads": 4, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_hps(tmp_path_factory):
    """A tiny OpenCLIP of ViT-H-14's family, saved in HPSv2's checkpoint format."""
    d = tmp_path_factory.mktemp("hps")
    bpe, n_vocab = write_tiny_bpe(d / "tok")
    cfg = json.loads(json.dumps(TINY_OPENCLIP))
    cfg["text_cfg"]["vocab_size"] = n_vocab
    (d / "TinyViT.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model = OpenCLIPModel(cfg)
    with torch.no_grad():  # make the layer norms non-trivial too
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    sd = model.state_dict()
    torch.save({"state_dict": {k: v.half() for k, v in sd.items()}, "epoch": 1}, d / "HPS_v2.1_compressed.pt")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "hps.safetensors"))
    return d, cfg, bpe, model


def test_hps_loads_and_scores_cosine(tiny_hps):
    d, cfg, bpe, model = tiny_hps
    reward = build_reward("hpsv21", path=str(d / "HPS_v2.1_compressed.pt"), arch=str(d / "TinyViT.json"),
                          tokenizer=str(bpe))
    x = to_tensor(smooth_image(224, 224)).repeat(2, 1, 1, 1)
    s = reward(x, PROMPTS)
    # HPSv2: diag(image_features @ text_features.T) of the normalised features
    ref_model = OpenCLIPModel(cfg)
    ref_model.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    ref_model.half().float()  # the checkpoint was stored in fp16
    tokens = CLIPBPETokenizer.load(str(bpe))(PROMPTS)
    with torch.no_grad():
        out = ref_model(ImagePreprocess(size=224)(x), tokens)
        ref = torch.diagonal(out["image_features"] @ out["text_features"].T)
    assert torch.allclose(s, ref, atol=1e-5)
    assert (s.abs() <= 1 + 1e-5).all() and (s[0] - s[1]).abs() > 1e-4
    check_grad(reward, 256, 256)
    check_grad(reward, 300, 200)  # non-square: resized and padded


def test_hps_safetensors_and_folder(tiny_hps):
    d, cfg, bpe, _ = tiny_hps
    x = torch.rand(2, 3, 64, 64)
    arch, tok = str(d / "TinyViT.json"), str(d / "tok")  # tokenizer from vocab.json + merges.txt
    a = build_reward("hpsv21", path=str(d / "hps.safetensors"), arch=arch, tokenizer=tok)(x, PROMPTS)
    b = build_reward("hpsv21", path=str(d), arch=arch, tokenizer=str(bpe))(x, PROMPTS)  # folder: finds the .pt
    c = build_reward("hpsv21", path=str(d / "hps.safetensors"), arch=cfg, tokenizer=str(bpe))(x, PROMPTS)
    assert torch.allclose(a, c) and torch.allclose(a, b, atol=2e-3)  # b: fp16 checkpoint
    # a reward folder that carries its tokenizer files: found without tokenizer=
    import shutil

    folder = d / "hps_folder"
    if not folder.exists():
        folder.mkdir()
        shutil.copy(d / "HPS_v2.1_compressed.pt", folder)
        for f in ("vocab.json", "merges.txt"):
            shutil.copy(d / "tok" / f, folder)
    e = build_reward("hpsv21", path=str(folder), arch=arch)(x, PROMPTS)
    assert torch.allclose(b, e)


def test_hps_matches_open_clip_model(tiny_hps, tmp_path):
    """The plain-torch model computes what open_clip's CLIP computes, from the same state dict."""
    try:
        import open_clip
    except Exception as e:  # noqa: BLE001 - torchvision that does not match torch raises RuntimeError
        pytest.skip(f"open_clip cannot be imported here ({type(e).__name__}: {e}); it needs a torchvision "
                    "built for this torch")
    d, cfg, bpe, model = tiny_hps
    (tmp_path / "TinyViTOC.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(tmp_path / "TinyViTOC.json"))
    oc = open_clip.create_model("TinyViTOC", pretrained=None).eval()
    oc.load_state_dict(model.state_dict(), strict=False)
    x, tokens = torch.randn(2, 3, 224, 224), CLIPBPETokenizer.load(str(bpe))(PROMPTS)
    with torch.no_grad():
        assert torch.allclose(oc.encode_image(x, normalize=True), model.encode_image(x), atol=1e-5)
        assert torch.allclose(oc.encode_text(tokens, normalize=True), model.encode_text(tokens), atol=1e-5)


def test_tokenizer_tiny_bpe(tiny_hps):
    d, _, bpe, _ = tiny_hps
    tok = CLIPBPETokenizer.load(str(bpe))
    sot, eot = tok.sot_token_id, tok.eot_token_id
    ids = tok(["A  Photo of a CAT", "cat " * 200])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert ids[0, :7].tolist() == [sot, tok.encoder["a</w>"], tok.encoder["photo</w>"], tok.encoder["of</w>"],
                                   tok.encoder["a</w>"], tok.encoder["cat</w>"], eot]
    assert (ids[0, 7:] == 0).all() and ids[1, -1] == eot and (ids[1, 1:-1] == tok.encoder["cat</w>"]).all()
    hf = CLIPBPETokenizer.load(str(d / "tok"))  # the vocab.json + merges.txt form gives the same ids
    assert torch.equal(hf(["a photo of a cat", "Ünïcode & co"]), tok(["a photo of a cat", "Ünïcode & co"]))


def test_tokenizer_matches_open_clip_simple_tokenizer():
    """With open_clip's shipped BPE file, the ids are open_clip SimpleTokenizer's."""
    oc = _open_clip_dir()
    if oc is None or not (oc / "tokenizer.py").is_file():
        pytest.skip("open-clip-torch is not installed (its BPE file and tokenizer are the reference)")
    pytest.importorskip("ftfy")
    spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", oc / "tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # the tokenizer module alone: the package's __init__ needs torchvision
    texts = ["A photo of a cat", "  Héllo   WORLD!! it's 3.14 &amp; co ", "a " * 100, "東京タワー 🗼 café",
             "An astronaut riding a horse on Mars, 8k, trending on artstation"]
    assert torch.equal(mod.SimpleTokenizer()(texts), CLIPBPETokenizer.load()(texts))


def test_hps_missing_files(tiny_hps, tmp_path):
    d, _, bpe, _ = tiny_hps
    missing = tmp_path / "nowhere" / "HPS_v2.1_compressed.pt"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_reward("hpsv21", path=str(missing))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        build_reward("hpsv21", path=str(tmp_path), arch=str(d / "TinyViT.json"), tokenizer=str(bpe))
    with pytest.raises(FileNotFoundError, match="no_tok.gz"):
        build_reward("hpsv21", path=str(d / "hps.safetensors"), arch=str(d / "TinyViT.json"),
                     tokenizer=str(tmp_path / "no_tok.gz"))
    with pytest.raises(FileNotFoundError, match="no_cfg.json"):
        build_reward("hpsv21", path=str(d / "hps.safetensors"), arch=str(tmp_path / "no_cfg.json"))


def test_hps_refuses_other_architectures(tiny_hps):
    bad = json.loads(json.dumps(TINY_OPENCLIP))
    bad["vision_cfg"]["attentional_pool"] = True
    with pytest.raises(NotImplementedError, match="attentional_pool"):
        OpenCLIPModel(bad)
    d, cfg, bpe, _ = tiny_hps
    other = json.loads(json.dumps(cfg))
    other["vision_cfg"]["layers"] = 3
    with pytest.raises(RuntimeError, match="does not match"):  # a checkpoint of another size: refused
        build_reward("hpsv21", path=str(d / "hps.safetensors"), arch=other, tokenizer=str(bpe))


# --------------------------------------------------------------------------------------------
# PickScore and CLIP score (transformers CLIPModel)

def _tiny_clip_folders(root, n_vocab, seed):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    tok_dir = root / "tok"
    sot, eot = n_vocab - 2, n_vocab - 1
    cfg = CLIPConfig(
        text_config=dict(vocab_size=n_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=sot, eos_token_id=eot,
                         pad_token_id=eot),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=224, patch_size=32),
        projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    model_dir, proc_dir = root / "model", root / "processor"
    model.save_pretrained(str(model_dir))
    proc_dir.mkdir()
    for f in ("vocab.json", "merges.txt"):  # a tokenizer folder as the hub's CLIP folders hold it
        (proc_dir / f).write_text((tok_dir / f).read_text(encoding="utf-8"), encoding="utf-8")
    (proc_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer",
                                                                "model_max_length": 77}))
    CLIPImageProcessor().save_pretrained(str(proc_dir))
    # transformers' tokenizer on this folder gives the ids of the open_clip-style tokenizer
    ids = CLIPTokenizer.from_pretrained(str(proc_dir), local_files_only=True)(["a photo of a cat"])["input_ids"][0]
    assert ids == CLIPBPETokenizer.load(str(tok_dir))(["a photo of a cat"])[0, :7].tolist(), ids
    return model_dir, proc_dir


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny transformers CLIPModel folder, and a separate processor folder (PickScore's layout:
    the model from PickScore_v1, the processor from CLIP-ViT-H-14)."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("clip")
    _, n_vocab = write_tiny_bpe(root / "tok")
    return _tiny_clip_folders(root, n_vocab, seed=0)


def _official_clip(model_dir, proc_dir, arr, prompts):
    """logit_scale * cosine and cosine from transformers' own processor + model forward."""
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(str(model_dir), local_files_only=True).eval()
    pix = CLIPImageProcessor.from_pretrained(str(proc_dir), local_files_only=True)(
        images=[Image.fromarray(arr)] * len(prompts), return_tensors="pt")["pixel_values"]
    tok = CLIPTokenizer.from_pretrained(str(proc_dir), local_files_only=True)(
        prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pix)
    logits = out.logits_per_image.diagonal()
    return logits, logits / model.logit_scale.exp()


def test_pickscore_equals_official(tiny_clip):
    model_dir, proc_dir = tiny_clip
    reward = build_reward("pickscore", path=str(model_dir), processor_path=str(proc_dir))
    arr = smooth_image(224, 224)
    s = reward(to_tensor(arr).repeat(2, 1, 1, 1), PROMPTS)
    ref, _ = _official_clip(model_dir, proc_dir, arr, PROMPTS)
    assert torch.allclose(s, ref, atol=1e-4), (s, ref)
    assert (s[0] - s[1]).abs() > 1e-4  # the prompts reach the score
    # a generic size: the official 8-bit pipeline differs by its rounding only
    arr = smooth_image(512, 768, seed=2)
    s = reward(to_tensor(arr).repeat(2, 1, 1, 1), PROMPTS)
    ref, _ = _official_clip(model_dir, proc_dir, arr, PROMPTS)
    assert torch.allclose(s, ref, atol=0.05 * ref.abs().max().item()), (s, ref)
    check_grad(reward, 96, 128)
    assert torch.allclose(build_reward("pickscore", path=str(model_dir), processor_path=str(proc_dir), scale=1 / 26)(
        to_tensor(arr).repeat(2, 1, 1, 1), PROMPTS), s / 26)


def test_clip_score_cosine_and_clipscore(tiny_clip):
    model_dir, proc_dir = tiny_clip
    import shutil

    both = model_dir.parent / "clip_with_processor"  # CLIP: processor files in the model folder
    if not both.exists():
        shutil.copytree(model_dir, both)
        for f in proc_dir.iterdir():
            shutil.copy(f, both / f.name)
    reward = build_reward("clip", path=str(both))
    arr = smooth_image(224, 224, seed=3)
    x = to_tensor(arr).repeat(2, 1, 1, 1)
    cos = reward(x, PROMPTS)
    _, ref = _official_clip(both, both, arr, PROMPTS)
    assert torch.allclose(cos, ref, atol=1e-5) and (cos.abs() <= 1 + 1e-5).all()
    clipscore = build_reward("clip", path=str(both), w=2.5, clamp=True)(x, PROMPTS)
    assert torch.allclose(clipscore, 2.5 * ref.clamp_min(0), atol=1e-5)
    check_grad(reward)


def test_hf_missing_files(tiny_clip, tmp_path):
    model_dir, proc_dir = tiny_clip
    with pytest.raises(FileNotFoundError, match="PickScore_v1"):
        build_reward("pickscore", path=str(tmp_path / "PickScore_v1"), processor_path=str(proc_dir))
    with pytest.raises(FileNotFoundError, match="CLIP-ViT-H-14"):
        build_reward("pickscore", path=str(model_dir), processor_path=str(tmp_path / "CLIP-ViT-H-14"))
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        build_reward("clip", path=str(model_dir))  # model folder without processor files
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        build_reward("clip", path=str(no_weights), processor_path=str(proc_dir))
    # a hub id is not a local folder: refused before any hub access
    with pytest.raises(FileNotFoundError, match="openai/clip-vit-large-patch14"):
        build_reward("clip", path="openai/clip-vit-large-patch14")


# --------------------------------------------------------------------------------------------
# mix

def test_mix_is_the_weighted_sum(tiny_hps, tiny_clip):
    d, _, bpe, _ = tiny_hps
    model_dir, proc_dir = tiny_clip
    hps = {"path": str(d / "hps.safetensors"), "arch": str(d / "TinyViT.json"), "tokenizer": str(bpe)}
    pick = {"path": str(model_dir), "processor_path": str(proc_dir)}
    mix = build_reward("mix", rewards={"hpsv21": {**hps, "weight": 2.0},
                                       "pick": {"name": "pickscore", **pick, "weight": -0.5},
                                       "colour": {}})
    prompts = ["a red cat", "a blue cat"]
    x = torch.rand(2, 3, 64, 64)
    parts = mix.components(x, prompts)
    assert set(parts) == {"hpsv21", "pick", "colour"}
    ref = 2.0 * build_reward("hpsv21", **hps)(x, prompts) - 0.5 * build_reward("pickscore", **pick)(x, prompts) \
        + build_reward("colour")(x, prompts)
    assert torch.allclose(mix(x, prompts), ref, atol=1e-5)
    x.requires_grad_(True)
    mix(x, prompts).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in mix.parameters())
    with pytest.raises(ValueError):
        build_reward("mix", rewards={})


def test_registry():
    assert {"colour", "hpsv21", "pickscore", "clip", "mix"} <= set(REWARDS)
    with pytest.raises(ValueError, match="unknown reward"):
        build_reward("nope")


def test_hps_bfloat16_weights(tiny_hps):
    """reward.params.dtype=bfloat16 stores the tower in bf16 (half the bytes) and scores close to fp32."""
    d, cfg, bpe, _ = tiny_hps
    x = torch.rand(2, 3, 64, 64)
    kw = dict(path=str(d / "hps.safetensors"), arch=cfg, tokenizer=str(bpe))
    full, half = build_reward("hpsv21", **kw), build_reward("hpsv21", **kw, dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    a, b = full(x, PROMPTS), half(x, PROMPTS)
    assert b.dtype == torch.float32 and torch.allclose(a, b, rtol=0.05, atol=0.02)
    with pytest.raises(ValueError, match="dtype must be one of"):
        build_reward("hpsv21", **kw, dtype="int8")


def test_reward_params_mirror_the_constructors():
    """engine/params.py types each reward's parameters for the config check; they must be the
    constructor's own names and defaults, so a config means what the reward does."""
    import dataclasses
    import inspect

    from engine.params import REWARD_PARAMS
    from engine.rewards import REWARDS

    injected = {"world": {"text_encoder"}}     # objects passed in code, not config values
    assert set(REWARD_PARAMS) == set(REWARDS)
    for name, cls in REWARDS.items():
        sig = {k: v for k, v in inspect.signature(cls.__init__).parameters.items()
               if k != "self" and k not in injected.get(name, ())}
        fields = {f.name: f for f in dataclasses.fields(REWARD_PARAMS[name])}
        assert set(sig) == set(fields), name
        for k, p in sig.items():
            if p.default is not inspect.Parameter.empty and fields[k].default is not dataclasses.MISSING:
                assert p.default == fields[k].default, (name, k)
