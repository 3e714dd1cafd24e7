"""HPSv3 reward on a tiny random Qwen2-VL, written to tmp_path and loaded through the same code
path as the real weights (a base-model folder with config + tokenizer + chat template, and an
HPSv3-format checkpoint). No hub access: the tokenizer is built offline with ``tokenizers``.

What is checked: the tensor preprocessing equals transformers' Qwen2-VL image processor (exactly
where no resize is needed, within PIL's 8-bit rounding where it is); the score equals an
independent forward of transformers' ``Qwen2VLModel`` on the official processor's pixels and the
literal Qwen2-VL chat text, with HPSv3's 1-D positions and its head at ``<|Reward|>``; the
gradient reaches the image; batched scores equal per-image ones; both checkpoint layouts and
formats load; missing files raise FileNotFoundError naming the path.
"""
import hashlib
import json

import pytest
import torch

from engine.rewards import REWARDS, build_reward
from engine.rewards.hpsv3 import (HPSV3_INSTRUCTION, HPSV3_PIXELS, HPSV3_REWARD_PROMPT, QwenVLImagePreprocess,
                                  hpsv3_text, smart_resize)
from tests.images import smooth_image, to_tensor

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

PROMPTS = ["a photo of the cat", "an oil painting of a lighthouse on the rocks at night"]
TINY_PIXELS = 56 * 56   # 4x4 patches, 4 image tokens: keeps the tiny model's sequences short

QWEN2_VL_CHAT_TEMPLATE = (  # Qwen2-VL-7B-Instruct's template (chat_template.json)
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


# --------------------------------------------------------------------------------------------
# helpers

def write_qwen2_tokenizer(folder):
    """A small byte-level BPE with Qwen2's special tokens, as a Qwen2 tokenizer folder. Its merges
    are learnt (offline) from HPSv3's instruction so that the tiny model's sequences stay short."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([hpsv3_text(p) for p in PROMPTS] + ["You are a helpful assistant."], trainer)
    n_vocab = tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in QWEN2_SPECIALS])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "unk_token": None, "model_max_length": 32768, "padding_side": "left",
        "clean_up_tokenization_spaces": False, "additional_special_tokens": QWEN2_SPECIALS[1:]}))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_VL_CHAT_TEMPLATE}))
    return {s: n_vocab + i for i, s in enumerate(QWEN2_SPECIALS)}


def official_pixels(arr, min_pixels, max_pixels):
    """transformers' Qwen2-VL image processor (the PIL backend: no torchvision needed)."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    proc = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    out = proc(images=[Image.fromarray(arr)], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def ranknet_head(hidden, seed):
    torch.manual_seed(seed)
    head = torch.nn.Sequential(torch.nn.Linear(hidden, 1024), torch.nn.ReLU(), torch.nn.Dropout(0.05),
                               torch.nn.Linear(1024, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    with torch.no_grad():
        head[5].weight.mul_(10.0)  # scores of a few units, as HPSv3's
    return head.eval()


# --------------------------------------------------------------------------------------------
# preprocessing

def test_smart_resize():
    assert smart_resize(512, 512) == (448, 448) and smart_resize(1024, 1024) == (448, 448)
    assert smart_resize(448, 448) == (448, 448) and smart_resize(256, 256) == (448, 448)
    assert smart_resize(1024, 768) == (504, 364) and smart_resize(720, 1280) == (336, 588)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
    for h in range(256, 2049, 8):  # qwen-vl-utils' variant (HPSv3's fetch_image) agrees with transformers'
        for w in (256, 512, 768, 1024, 1360, 2048):
            assert smart_resize(h, w) == hf_smart_resize(h, w, 28, HPSV3_PIXELS, HPSV3_PIXELS), (h, w)


@pytest.mark.parametrize("hw,pixels", [((448, 448), (HPSV3_PIXELS, HPSV3_PIXELS)),
                                       ((336, 588), (56 * 56, 28 * 28 * 1280)),
                                       ((56, 84), (56 * 56, 28 * 28 * 1280))])
def test_preprocess_equals_processor_without_resize(hw, pixels):
    """At a size the processor keeps, the tensor path is the processor's output (patch order included)."""
    arr = smooth_image(*hw)
    ref, ref_grid = official_pixels(arr, *pixels)
    pix, grid = QwenVLImagePreprocess(min_pixels=pixels[0], max_pixels=pixels[1])(to_tensor(arr))
    assert torch.equal(grid, ref_grid) and pix.shape == ref.shape
    assert (pix - ref).abs().max() < 1e-5


@pytest.mark.parametrize("hw", [(512, 512), (1024, 768), (300, 200)])
def test_preprocess_resized_vs_processor(hw):
    """With a resize: the same grid, and PIL's bicubic on 8-bit images up to its rounding."""
    arr = smooth_image(*hw, seed=1)
    ref, ref_grid = official_pixels(arr, HPSV3_PIXELS, HPSV3_PIXELS)
    pre = QwenVLImagePreprocess()
    pix, grid = pre(to_tensor(arr).repeat(2, 1, 1, 1))
    assert torch.equal(grid, ref_grid.repeat(2, 1)) and pix.shape[0] == 2 * ref.shape[0]
    std = torch.tensor(pre.std).repeat_interleave(2 * 14 * 14)          # row layout: (channel, temporal, py, px)
    diff = (pix[:ref.shape[0]] - ref).abs() * std                        # in [0, 1] pixel units
    assert diff.mean() < 0.5 / 255 and diff.max() < 2.0 / 255, (diff.mean() * 255, diff.max() * 255)
    assert torch.equal(pix[:ref.shape[0]], pix[ref.shape[0]:])


def test_preprocess_is_differentiable():
    x = torch.rand(2, 3, 300, 400, requires_grad=True)
    pix, grid = QwenVLImagePreprocess()(x)
    assert grid.tolist() == [[1, *(s // 14 for s in smart_resize(300, 400))]] * 2
    pix.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# the reward on a tiny Qwen2-VL

def _flat_layout(sd):
    """transformers < 4.52 (HPSv3's 4.45.2) key names."""
    out = {}
    for k, v in sd.items():
        if k.startswith("model.visual."):
            out[k[len("model."):]] = v
        elif k.startswith("model.language_model."):
            out["model." + k[len("model.language_model."):]] = v
        else:
            out[k] = v
    return out


@pytest.fixture(scope="module")
def tiny_hpsv3(tmp_path_factory):
    from safetensors.torch import save_file
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    root = tmp_path_factory.mktemp("hpsv3")
    base = root / "Qwen2-VL-7B-Instruct"
    ids = write_qwen2_tokenizer(base)
    n_tokens = ids["<|video_pad|>"] + 1
    # the base folder as Qwen2-VL-7B-Instruct ships it (a flat, transformers-4.41 config.json), tiny sizes;
    # config + tokenizer + chat template only: no weights
    (base / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2", "attention_dropout": 0.0, "hidden_act": "silu", "hidden_size": 64,
        "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
        "max_position_embeddings": 32768, "max_window_layers": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "sliding_window": 32768, "use_sliding_window": False, "tie_word_embeddings": False, "use_cache": True,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, "vocab_size": n_tokens + 40,
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"], "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_config": {"depth": 2, "embed_dim": 32, "mlp_ratio": 2, "num_heads": 2, "in_chans": 3, "hidden_size": 64,
                          "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                          "temporal_patch_size": 2}}))
    config = Qwen2VLConfig.from_pretrained(str(base))
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).float().eval()   # config.json says bfloat16
    sd = model.state_dict()
    with torch.no_grad():
        for k, v in sd.items():   # non-trivial norms and biases
            if v.dim() == 1:
                v.add_(0.1 * torch.randn_like(v))
    # HPSv3: <|Reward|> added to the tokenizer, embeddings resized to len(tokenizer) = n_tokens + 1
    sd = {k: (v[:n_tokens + 1] if k in ("model.language_model.embed_tokens.weight", "lm_head.weight") else v)
          .contiguous() for k, v in sd.items()}
    head = ranknet_head(64, seed=1)
    full = {**sd, **{f"rm_head.{k}": v for k, v in head.state_dict().items()}}
    save_file(_flat_layout(full), str(root / "HPSv3.safetensors"))             # transformers < 4.52 names
    torch.save({"model": full}, root / "HPSv3_new_layout.pth")                 # transformers >= 4.52 names
    return root, base, ids, sd, head


def official_score(tiny, arr, prompts, min_pixels):
    """HPSv3's forward, written independently: transformers' Qwen2VLModel on the processor's pixels
    and the literal Qwen2-VL chat text, positions arange(L) (HPSv3 passes position_ids=None to the
    text decoder), its reward head at the <|Reward|> token."""
    from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLModel

    _, base, _, sd, head = tiny
    config = Qwen2VLConfig.from_pretrained(str(base))
    config.text_config.vocab_size = sd["model.language_model.embed_tokens.weight"].shape[0]
    model = Qwen2VLModel(config).float().eval()
    model.load_state_dict({k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}, strict=True)
    tok = AutoTokenizer.from_pretrained(str(base), local_files_only=True, padding_side="right")
    tok.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    pix, grid = official_pixels(arr, min_pixels, min_pixels)
    n_img = int(grid[0].prod()) // 4
    texts = ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
             + "<|image_pad|>" * n_img + "<|vision_end|>" + hpsv3_text(p) + "<|im_end|>\n<|im_start|>assistant\n"
             for p in prompts]
    enc = tok(texts, padding=True, return_tensors="pt")
    B, L = enc["input_ids"].shape
    pos = torch.arange(L).view(1, 1, L).expand(3, B, L)
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pix.repeat(B, 1),
                    image_grid_thw=grid.repeat(B, 1), position_ids=pos).last_hidden_state
    reward_pos = (enc["input_ids"] == tok.convert_tokens_to_ids("<|Reward|>")).int().argmax(1)
    return head(out[torch.arange(B), reward_pos].float())


def check_grad(reward, h, w):
    x = torch.rand(len(PROMPTS), 3, h, w, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    s = reward(x, PROMPTS)
    assert s.shape == (len(PROMPTS),) and torch.isfinite(s).all()
    s.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.parameters())
    assert all(p.grad is None for p in reward.parameters())
    return s, x.grad


@pytest.fixture(scope="module")
def reward(tiny_hpsv3):
    root, base, *_ = tiny_hpsv3
    return build_reward("hpsv3", path=str(root / "HPSv3.safetensors"), base=str(base), dtype="float32",
                        min_pixels=TINY_PIXELS, max_pixels=TINY_PIXELS)


def test_hpsv3_equals_official_forward(tiny_hpsv3, reward):
    arr = smooth_image(56, 56)
    x = to_tensor(arr).repeat(2, 1, 1, 1)
    with torch.no_grad():
        out = reward.mu_sigma(x, PROMPTS)
        s = reward(x, PROMPTS)
    ref = official_score(tiny_hpsv3, arr, PROMPTS, TINY_PIXELS)
    assert out.shape == (2, 2) and torch.equal(s, out[:, 0])                   # the score is mu
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4), (out, ref)
    assert (s[0] - s[1]).abs() > 1e-4                                           # the prompt reaches the score
    assert not reward.training and not reward.rm_head.training


def test_hpsv3_official_image_size(tiny_hpsv3):
    """HPSv3's own budget (256 * 28 * 28): a 512x512 image becomes 448x448, 256 image tokens."""
    root, base, *_ = tiny_hpsv3
    r = build_reward("hpsv3", path=str(root), base=str(base), dtype="float32")   # folder: finds HPSv3.safetensors
    assert r.preprocess.tokens_per_image(512, 512) == 256
    ids, _, pos = r.tokenize(PROMPTS[:1], 256, "cpu")
    assert (ids == r.image_token_id).sum() == 256
    tail = r.tokenizer.decode(ids[0, pos[0]:])   # the reward token, then the rest of the message
    assert tail == "<|Reward|>" + HPSV3_REWARD_PROMPT.split("<|Reward|>")[1] + "<|im_end|>\n<|im_start|>assistant\n"
    check_grad(r, 512, 512)


def test_hpsv3_batch_equals_single_and_grad(reward):
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))   # resized to the pixel budget
    with torch.no_grad():
        both = reward(x, PROMPTS)                                 # prompts of different lengths: right padding
        single = torch.cat([reward(x[i:i + 1], PROMPTS[i:i + 1]) for i in range(2)])
    assert torch.allclose(both, single, atol=1e-5), (both, single)
    check_grad(reward, 64, 96)


def test_hpsv3_checkpoint_formats_and_grad_checkpointing(tiny_hpsv3, reward):
    root, base, *_ = tiny_hpsv3
    x = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    ref = reward(x, PROMPTS)
    pth = build_reward("hpsv3", path=str(root / "HPSv3_new_layout.pth"), base=str(base), dtype="float32",
                       min_pixels=TINY_PIXELS, max_pixels=TINY_PIXELS, grad_checkpointing=True)
    assert torch.allclose(pth(x, PROMPTS), ref, atol=1e-6)
    _, g_ckpt = check_grad(pth, 56, 56)
    _, g_plain = check_grad(reward, 56, 56)
    assert torch.allclose(g_ckpt, g_plain, atol=1e-6, rtol=1e-4)
    bf16 = build_reward("hpsv3", path=str(root / "HPSv3.safetensors"), base=str(base),
                        min_pixels=TINY_PIXELS, max_pixels=TINY_PIXELS)   # the default dtype: bfloat16, head fp32
    assert bf16.model.language_model.embed_tokens.weight.dtype == torch.bfloat16
    assert bf16.rm_head[0].weight.dtype == torch.float32
    assert torch.allclose(bf16(x, PROMPTS), ref, atol=0.1 * ref.abs().max().item() + 0.05)


def test_hpsv3_missing_files(tiny_hpsv3, tmp_path):
    root, base, *_ = tiny_hpsv3
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_reward("hpsv3", path=str(tmp_path / "nowhere" / "HPSv3.safetensors"), base=str(base))
    with pytest.raises(FileNotFoundError, match="no_base"):
        build_reward("hpsv3", path=str(root / "HPSv3.safetensors"), base=str(tmp_path / "no_base"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):       # a folder without a checkpoint
        build_reward("hpsv3", path=str(tmp_path), base=str(base))
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "HPSv3.safetensors").write_bytes((root / "HPSv3.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match="config.json"):      # no base folder next to it
        build_reward("hpsv3", path=str(lone))
    (lone / "config.json").write_text((base / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):   # a base folder without its tokenizer
        build_reward("hpsv3", path=str(lone))


def test_hpsv3_refuses_mismatched_base(tiny_hpsv3, tmp_path):
    root, base, ids, sd, head = tiny_hpsv3
    from safetensors.torch import save_file

    extra = dict(sd)   # an embedding one row longer than len(tokenizer) + <|Reward|>
    for k in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        extra[k] = torch.cat([sd[k], sd[k][:1]])
    save_file({**extra, **{f"rm_head.{k}": v for k, v in head.state_dict().items()}}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="rows"):
        build_reward("hpsv3", path=str(tmp_path / "x.safetensors"), base=str(base), dtype="float32")
    bad = {k: v for k, v in sd.items() if "blocks.1." not in k}
    save_file({**bad, **{f"rm_head.{k}": v for k, v in head.state_dict().items()}}, str(tmp_path / "y.safetensors"))
    with pytest.raises(RuntimeError, match="missing"):
        build_reward("hpsv3", path=str(tmp_path / "y.safetensors"), base=str(base), dtype="float32")


def test_registry_and_prompt_text():
    assert "hpsv3" in REWARDS
    # sha256 of HPSv3's INSTRUCTION + prompt_with_special_token (hpsv3/dataset/data_collator_qwen.py)
    digest = hashlib.sha256((HPSV3_INSTRUCTION + HPSV3_REWARD_PROMPT).encode()).hexdigest()
    assert digest == "f6ee57479d4e9eee76b49c00dc962e1e696a5a2b3cc32cebd9b1fa76fe27502c"
    assert hpsv3_text("a {cat}").count("Textual prompt - a {cat}\n") == 1
