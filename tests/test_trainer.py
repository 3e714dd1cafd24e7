import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import LeapTrainer
from engine.config import load_config
from engine.rewards import ColourReward

ROOT = Path(__file__).resolve().parents[1]


def cfg(tmp_path, *extra):
    return load_config(None, ["model.height=32", "model.width=32", "num_steps=4", "steps=4", "batch_size=2",
                              "optim.lr=1e-3", "prompts=[a red square, a blue circle]", "samples=2",
                              f"output_dir={tmp_path}", *extra])


def weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.params.items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


@pytest.mark.parametrize("extra", [[], ["lora.enabled=true", "lora.rank=4", "lora.alpha=4"],
                                   ["method.name=drtune"]])
def test_resume_is_exact(tmp_path, extra):
    straight = LeapTrainer(cfg(tmp_path / "a", *extra))
    for _ in range(4):
        straight.step()

    first = LeapTrainer(cfg(tmp_path / "b", *extra))
    for _ in range(2):
        first.step()
    first.save_checkpoint(tmp_path / "b" / "ck.safetensors")
    resumed = LeapTrainer(cfg(tmp_path / "b", *extra))
    resumed.load_checkpoint(tmp_path / "b" / "ck.safetensors")
    assert resumed.step_count == 2
    for _ in range(2):
        resumed.step()
    assert_same(weights(straight), weights(resumed))
    for n in straight.ema:
        assert torch.equal(straight.ema[n], resumed.ema[n])
    assert torch.equal(straight.generator.get_state(), resumed.generator.get_state())


@pytest.mark.parametrize("policy", ["full", "lean", "budget"])
def test_block_policies_train_identically(tmp_path, policy):
    """With the torch backend the lean blocks compute what diffusers' blocks compute, so two steps
    under any policy give the weights plain autograd gives."""
    extra = ["model.budget_gib=1e-4"] if policy == "budget" else []
    runs = {}
    for p in ("none", policy):
        t = LeapTrainer(cfg(tmp_path / p, f"model.policy={p}", *extra))
        assert set(t.policy["double"] + t.policy["single"]) <= {p, "lean", "full"}
        t.step()
        t.step()
        runs[p] = weights(t)
    for n in runs["none"]:
        torch.testing.assert_close(runs[policy][n], runs["none"][n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["none", "lean"])
def test_compiled_blocks_train_like_eager(tmp_path, policy):
    """model.compile traces every block (through the fused custom ops under lean); aot_eager
    runs the traced graphs without codegen, so the weights must match eager closely."""
    runs = {}
    for backend in ("", "aot_eager"):
        torch._dynamo.reset()
        extra = [f"model.compile={backend}"] if backend else []
        t = LeapTrainer(cfg(tmp_path / (backend or "eager"), f"model.policy={policy}", *extra))
        t.step()
        t.step()
        runs[backend] = weights(t)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0   # the blocks did compile
    for n in runs[""]:
        torch.testing.assert_close(runs["aot_eager"][n], runs[""][n], rtol=1e-5, atol=1e-6)


def test_reward_checkpointing_changes_nothing_but_memory(tmp_path):
    runs = {}
    for ck in ("true", "false"):
        t = LeapTrainer(cfg(tmp_path / ck, f"model.checkpoint_reward={ck}"))
        t.step()
        runs[ck] = weights(t)
    for n in runs["true"]:
        torch.testing.assert_close(runs["true"][n], runs["false"][n], rtol=1e-6, atol=1e-7)


def test_training_moves_weights_and_logs(tmp_path):
    t = LeapTrainer(cfg(tmp_path))
    before = weights(t)
    summary = t.train()
    assert summary["steps"] == 4 and summary["skipped"] == 0
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert len(rows) == 4
    for key in ("loss", "reward", "d_j", "d_0", "weight", "k", "j", "grad_norm", "step_time_s", "peak_mem_bytes",
                "past_lam"):
        assert all(key in r for r in rows), key
    assert all(0 <= r["k"] < r["j"] < 4 for r in rows)
    assert all(r["past_lam"] in (0, 0.5, 1) for r in rows)   # batch 2
    for name in ("samples_before.png", "samples_after.png", "reward_curve.png", "checkpoint.safetensors"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert any(not torch.equal(before[n], p) for n, p in t.params.items())


@pytest.mark.parametrize("lam, past", [(-1e6, 1.0), (1e6, 0.0)])
def test_past_lam_is_the_share_the_guard_stopped(tmp_path, lam, past):
    m = LeapTrainer(cfg(tmp_path, "steps=1", f"method.lam={lam}")).step()
    assert m["past_lam"] == past and (m["loss"] == 0) == (past == 1.0)


def test_lora_trains_only_adapters(tmp_path):
    t = LeapTrainer(cfg(tmp_path, "lora.enabled=true", "lora.rank=4"))
    assert t.params and all("lora_" in n for n in t.params)
    frozen = {n: p.detach().clone() for n, p in t.transformer.named_parameters() if not p.requires_grad}
    t.step()
    for n, p in t.transformer.named_parameters():
        if n in frozen:
            assert torch.equal(frozen[n], p), n


class NaNReward(ColourReward):
    def score(self, images, prompts):
        return super().score(images, prompts) * float("nan")


def test_nan_reward_skips_the_step(tmp_path):
    t = LeapTrainer(cfg(tmp_path), reward=NaNReward())
    t.step()   # no update ever happens, so the optimizer has no state
    before = weights(t)
    with pytest.warns(UserWarning, match="non-finite"):
        m = t.step()
    assert m["skipped_step"] and t.skipped == 2
    assert_same(before, weights(t))
    assert not t.optimizer.state


def test_checkpoint_from_another_model_is_refused(tmp_path):
    a = LeapTrainer(cfg(tmp_path))
    a.save_checkpoint(tmp_path / "a.safetensors")
    lora = LeapTrainer(cfg(tmp_path, "lora.enabled=true", "lora.rank=4"))
    lora.save_checkpoint(tmp_path / "lora4.safetensors")

    b = LeapTrainer(cfg(tmp_path, "model.seed=1"))   # same architecture, other weights: allowed
    b.load_checkpoint(tmp_path / "a.safetensors")
    assert_same(weights(a), weights(b))

    other_rank = LeapTrainer(cfg(tmp_path, "lora.enabled=true", "lora.rank=8"))
    before = weights(other_rank)
    with pytest.raises(ValueError, match="another model.*shape"):
        other_rank.load_checkpoint(tmp_path / "lora4.safetensors")
    assert_same(before, weights(other_rank))
    with pytest.raises(ValueError, match="another model"):
        other_rank.load_checkpoint(tmp_path / "a.safetensors")

    from engine.flux.tiny import build_tiny_flux, tiny_transformer_config
    from diffusers import FluxTransformer2DModel

    wider = build_tiny_flux()
    conf = tiny_transformer_config() | {"num_single_layers": 3}
    wider.transformer = FluxTransformer2DModel(**conf)
    c = LeapTrainer(cfg(tmp_path), adapter=wider)
    with pytest.raises(ValueError, match="another model"):
        c.load_checkpoint(tmp_path / "a.safetensors")


def test_corrupt_or_missing_checkpoint(tmp_path):
    t = LeapTrainer(cfg(tmp_path))
    path = tmp_path / "ck.safetensors"
    t.save_checkpoint(path)
    data = path.read_bytes()
    before = weights(t)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="bad.safetensors"):
        t.load_checkpoint(bad)
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="bad.safetensors"):
        t.load_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        t.load_checkpoint(tmp_path / "nope.safetensors")
    assert_same(before, weights(t))


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import engine.checkpoint as ck

    t = LeapTrainer(cfg(tmp_path))
    path = tmp_path / "ck.safetensors"
    t.save_checkpoint(path)
    good = path.read_bytes()

    def boom(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    t.step()
    with pytest.raises(OSError, match="disk full"):
        t.save_checkpoint(path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir() if "ck.safetensors" in p.name) == ["ck.safetensors"]


def test_tensorboard_logs_scalars_and_grids(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    LeapTrainer(cfg(tmp_path, "tensorboard=true", "steps=2")).train()
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/reward", "train/grad_norm", "train/d_j", "train/weight", "train/step_time_s",
                "eval/reward", "eval_ema/reward"):
        assert tag in scalars, tag
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [e.value for e in acc.Scalars("train/reward")] == pytest.approx([r["reward"] for r in rows])
    assert [e.step for e in acc.Scalars("eval/reward")] == [0, 2]   # before and after training
    assert {"samples/before", "samples/after"} <= set(acc.Tags()["images"])


def test_tensorboard_missing_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)   # makes `import tensorboard` fail
    with pytest.raises(ImportError, match="'tensorboard' package.*pip install tensorboard"):
        LeapTrainer(cfg(tmp_path, "tensorboard=true")).train()
    assert not (tmp_path / "samples_before.png").exists()   # refused before any work


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="optim.lrr"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(ValueError, match="num_steps"):
        load_config(None, ["num_steps=1"])
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="alpha must lie in"):
        load_config(None, ["method.leapalign.alpha=1.5"])
    with pytest.raises(ValueError, match="tau must be"):
        load_config(None, ["method.leapalign.tau=0"])


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    c = load_config(ROOT / "configs" / name)
    assert c.method.name in ("leapalign", "refl", "draft-lv", "drtune", "full")


def test_cli_train_then_sample(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-m", "engine", "train", "--config", str(ROOT / "configs/tiny.yaml"),
                          "steps=2", "num_steps=3", "model.height=32", "model.width=32", "samples=2",
                          f"output_dir={tmp_path}"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2
    out = tmp_path / "s"
    run = subprocess.run([sys.executable, "-m", "engine", "sample", "--checkpoint", str(tmp_path / "checkpoint.safetensors"),
                          "--prompt", "a red square", "--prompt", "a blue circle", "--out", str(out)],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "samples.png").stat().st_size > 0 and "reward (colour)" in run.stdout and "a blue circle" in run.stdout
    scores = json.loads((out / "samples.json").read_text())["samples"]
    assert [s["prompt"] for s in scores] == ["a red square", "a blue circle"] and "reward_colour" in scores[0]
