"""PipelineTextEncoder on a tiny but complete Flux folder (CLIP + T5 with their tokenizers, the tiny
transformer and VAE, the scheduler), written by FluxPipeline.save_pretrained. Built offline: the
tokenizers' vocabularies are made up here, the encoders are random."""
import json
import os
import string

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from engine.flux.adapter import FluxAdapter
from engine.flux.text import PipelineTextEncoder
from engine.flux.tiny import build_tiny_flux, tiny_transformer_config

PROMPTS = ["a photo of a cat", "A red DOG on the street at night", ""]
SUBFOLDERS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
WORDS = ["a", "photo", "of", "cat", "dog", "red", "car", "on", "the", "street", "at", "night"]


def clip_tokenizer(d):
    """Byte-level BPE over lowercase letters and digits (ASCII maps to itself at byte level)."""
    chars = string.ascii_lowercase + string.digits
    merges = ["c a", "ca t</w>", "d o", "do g</w>", "r e", "re d</w>", "o f</w>"]
    vocab = [*chars, *(c + "</w>" for c in chars), *(m.replace(" ", "") for m in merges),
             "<|startoftext|>", "<|endoftext|>"]
    os.makedirs(d)
    with open(os.path.join(d, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(d, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    # FluxPipeline pads CLIP to tokenizer.model_max_length, so it has to be CLIP's 77
    return CLIPTokenizer.from_pretrained(d, local_files_only=True, model_max_length=77)


def t5_tokenizer(d):
    """A Unigram model with T5's special ids (<pad> 0, </s> 1, <unk> 2) and whole-word pieces."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in WORDS] + [(c, -8.0) for c in string.ascii_lowercase]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    os.makedirs(d)
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(dict(tokenizer_class="T5Tokenizer", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                       extra_ids=0, model_max_length=512), f)
    return T5TokenizerFast.from_pretrained(d, local_files_only=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flux_pipe")
    tiny = build_tiny_flux(seed=0)
    cfg = tiny_transformer_config()
    tok, tok2 = clip_tokenizer(str(tmp / "src_tok")), t5_tokenizer(str(tmp / "src_tok2"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # widths the transformer reads: CLIP's pooled vector and T5's sequence features
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=cfg["pooled_projection_dim"], intermediate_size=37,
            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(tok2), d_model=cfg["joint_attention_dim"], d_kv=8, d_ff=37, num_layers=1,
            num_heads=2, relative_attention_num_buckets=8, decoder_start_token_id=0))
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    root = tmp / "flux"
    FluxPipeline(scheduler=scheduler, vae=tiny.vae, text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
                 tokenizer_2=tok2, transformer=tiny.transformer).save_pretrained(root)
    return root


def test_folder_is_tiny(folder):
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 1_000_000, size


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_matches_flux_pipeline(folder, dtype):
    enc = PipelineTextEncoder(folder, dtype=dtype)
    pe, pooled = enc.encode(PROMPTS)
    pipe = FluxPipeline.from_pretrained(folder, transformer=None, vae=None, torch_dtype=dtype,
                                        local_files_only=True)
    # FluxPipeline.__call__ encodes under no_grad; with autograd on, CPU T5 differs in the last bits
    with torch.no_grad():
        ref_pe, ref_pooled, _ = pipe.encode_prompt(prompt=PROMPTS, prompt_2=None, device="cpu",
                                                   max_sequence_length=512)
    cfg = tiny_transformer_config()
    assert pe.shape == (3, 512, cfg["joint_attention_dim"]) and pooled.shape == (3, cfg["pooled_projection_dim"])
    assert pe.dtype == pooled.dtype == dtype
    assert torch.equal(pe, ref_pe) and torch.equal(pooled, ref_pooled)
    assert not torch.equal(pe[0], pe[1]) and not torch.equal(pooled[0], pooled[1])
    assert torch.isfinite(pe).all() and torch.isfinite(pooled).all()
    # prompts are encoded independently of their batch; a bare string is one prompt
    pe1, pooled1 = enc.encode(PROMPTS[1])
    assert pe1.shape[0] == pooled1.shape[0] == 1
    assert torch.allclose(pe1[0].float(), pe[1].float(), atol=1e-5)
    assert torch.allclose(pooled1[0].float(), pooled[1].float(), atol=1e-5)


def test_max_sequence_length(folder):
    pe, _ = PipelineTextEncoder(folder, dtype=torch.float32, max_sequence_length=16).encode(PROMPTS)
    full, _ = PipelineTextEncoder(folder, dtype=torch.float32).encode(PROMPTS)
    assert pe.shape[1] == 16
    # T5 is bidirectional, so the padding tail changes the features; only the shapes agree
    assert pe.shape[2] == full.shape[2]


@pytest.mark.parametrize("missing", SUBFOLDERS + ("model_index.json",))
def test_missing_parts_are_named(folder, tmp_path, missing):
    for name in os.listdir(folder):
        if name != missing:
            (tmp_path / name).symlink_to(folder / name)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / missing)):
        PipelineTextEncoder(tmp_path, dtype=torch.float32)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        PipelineTextEncoder(tmp_path / "nope")


def test_end_to_end_matches_flux_pipeline(folder):
    """from_pretrained + PipelineTextEncoder + rollout + decode == FluxPipeline(prompt=...) on the folder."""
    h = w = 64
    adapter = FluxAdapter.from_pretrained(folder, torch_dtype=torch.float32)
    pe, pooled = PipelineTextEncoder(folder, dtype=torch.float32).encode(PROMPTS[:2])
    cond = adapter.condition(pe, pooled, h, w)
    x1 = adapter.noise(2, h, w, torch.Generator().manual_seed(0))
    steps = 2
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    c = sched.config
    mu = calculate_shift(adapter.image_seq_len(h, w), c.base_image_seq_len, c.max_image_seq_len,
                         c.base_shift, c.max_shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    x0 = adapter.rollout(x1, sched.sigmas, cond)
    assert x0.shape == x1.shape and torch.isfinite(x0).all()
    with torch.no_grad():
        img = adapter.decode(x0, h, w)
    assert img.shape == (2, 3, h, w) and 0 <= img.min() and img.max() <= 1

    pipe = FluxPipeline.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt=PROMPTS[:2], latents=x1.clone(), height=h, width=w, num_inference_steps=steps,
               guidance_scale=adapter.guidance_scale, output_type="latent", return_dict=False)[0]
    assert (x0 - ref).abs().max().item() < 1e-5
