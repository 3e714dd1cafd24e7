import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from engine import LeapTrainer
from engine.config import load_config
from engine.export import export_checkpoint, export_lora, export_transformer
from engine.flux.adapter import FluxAdapter
from engine.flux.tiny import build_tiny_flux

ROOT = Path(__file__).resolve().parents[1]


def train_one_step(tmp_path, *extra):
    cfg = load_config(None, ["model.height=32", "model.width=32", "num_steps=3", "batch_size=1", "samples=1",
                             "optim.lr=1e-2", "optim.ema_decay=0.5", f"output_dir={tmp_path}", *extra])
    t = LeapTrainer(cfg)
    t.step()
    t.save_checkpoint(tmp_path / "ck.safetensors")
    return t


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):   # alpha != rank: the exported scale must survive the round trip
    return train_one_step(tmp_path_factory.mktemp("lora"), "lora.enabled=true", "lora.rank=4", "lora.alpha=8")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    return train_one_step(tmp_path_factory.mktemp("full"))


def velocity(transformer, trainer):
    """The transformer's output on fixed inputs (eval mode, fp32)."""
    adapter = FluxAdapter(transformer, None, trainer.cfg.model.guidance_scale)
    pe, pooled = trainer.text_encoder.encode(["a red square", "a blue circle"])
    x = adapter.noise(2, 32, 32, generator=torch.Generator().manual_seed(3))
    was = transformer.training
    transformer.eval()
    with torch.no_grad():
        out = adapter.velocity(x, 0.6, adapter.condition(pe, pooled, 32, 32))
    transformer.train(was)
    return out


def fresh_pipeline():
    tiny = build_tiny_flux(seed=0)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny.vae, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=tiny.transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ema", [False, True])
def test_lora_round_trips_through_diffusers(lora_run, tmp_path, ema):
    out = export_checkpoint(lora_run.cfg.output_dir + "/ck.safetensors", tmp_path / "lora", lora=True, ema=ema)
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    pipe = fresh_pipeline()
    base = velocity(pipe.transformer, lora_run)
    pipe.load_lora_weights(out)
    if ema:
        with lora_run.ema_weights():
            want = velocity(lora_run.transformer, lora_run)
    else:
        want = velocity(lora_run.transformer, lora_run)
    got = velocity(pipe.transformer, lora_run)
    close(got, want)
    assert (got - base).abs().max() > 1e-4      # the adapter does something


def test_lora_export_from_a_live_transformer(lora_run, tmp_path):
    export_lora(lora_run.transformer, tmp_path)
    pipe = fresh_pipeline()
    pipe.load_lora_weights(tmp_path)
    close(velocity(pipe.transformer, lora_run), velocity(lora_run.transformer, lora_run))


def test_fused_lora_folder_is_plain_diffusers(lora_run, tmp_path):
    before = {n: p.detach().clone() for n, p in lora_run.transformer.named_parameters()}
    export_transformer(lora_run.transformer, tmp_path)
    model = FluxTransformer2DModel.from_pretrained(tmp_path)
    assert not [n for n, _ in model.named_parameters() if "lora" in n or "base_layer" in n]
    close(velocity(model, lora_run), velocity(lora_run.transformer, lora_run))
    for n, p in lora_run.transformer.named_parameters():   # the training model is untouched
        assert torch.equal(before[n], p), n


@pytest.mark.parametrize("ema", [False, True])
def test_full_fine_tune_folder(full_run, tmp_path, ema):
    out = export_checkpoint(full_run.cfg.output_dir + "/ck.safetensors", tmp_path, ema=ema)
    assert (out / "diffusion_pytorch_model.safetensors").is_file()
    model = FluxTransformer2DModel.from_pretrained(out)
    if ema:
        with full_run.ema_weights():
            want = velocity(full_run.transformer, full_run)
    else:
        want = velocity(full_run.transformer, full_run)
    close(velocity(model, full_run), want)


def test_lora_export_needs_a_lora_checkpoint(full_run, tmp_path):
    with pytest.raises(ValueError, match="without LoRA"):
        export_checkpoint(full_run.cfg.output_dir + "/ck.safetensors", tmp_path, lora=True)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        export_lora(full_run.transformer, tmp_path)


def test_cli_export(lora_run, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-m", "engine", "export", "--checkpoint",
                          lora_run.cfg.output_dir + "/ck.safetensors", "--out", str(tmp_path / "x"), "--lora"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "x" / "pytorch_lora_weights.safetensors").is_file() and "wrote" in run.stdout
