"""Each failure found by probing the engine (issue: one composition root and a hardened trainer)
gets a test here: bad input is refused with one clear line, saved state is never corrupted, and
the README's commands work for every model source."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import LeapTrainer
from engine import checkpoint as ckpt
from engine.config import load_config
from engine.export import export_checkpoint
from engine.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.height=32", "model.width=32", "num_steps=3", "eval_num_steps=3", "batch_size=1", "samples=1",
        "optim.lr=1e-2", "optim.ema_decay=0.5"]
WORLD = ["steps=1", "num_steps=3", "eval_num_steps=2", "batch_size=1", "eval_size=1", "samples=1"]


def tiny(tmp_path, *extra):
    return LeapTrainer(load_config(None, [*TINY, f"output_dir={tmp_path}", *extra]))


def snapshot(t):
    return ({n: p.detach().clone() for n, p in t.params.items()},
            {k: v.clone() for st in t.optimizer.state.values() for k, v in st.items() if torch.is_tensor(v)})


def same(a, b):
    return all(torch.equal(a[0][n], b[0][n]) for n in a[0]) and a[1].keys() == b[1].keys() and \
        all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def rewrite(path, out, tensors=None, meta=None):
    """A copy of a checkpoint with some tensors / metadata replaced (as a faulty or crafted file)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        m = dict(f.metadata())
    t = load_file(str(path))
    t.update(tensors or {})
    m.update(meta or {})
    save_file({k: v for k, v in t.items() if v is not None}, str(out), metadata=m)
    return out


@pytest.fixture(scope="module")
def world_runs(tmp_path_factory):
    """One-step world runs, full fine-tuning and LoRA (the README's default source)."""
    runs = {}
    for name, extra in (("full", []), ("lora", ["lora.enabled=true", "lora.rank=4"])):
        d = tmp_path_factory.mktemp(f"world_{name}")
        cfg = load_config(ROOT / "configs/world.yaml", [*WORLD, f"output_dir={d}", *extra])
        LeapTrainer(cfg).train()
        runs[name] = d / "checkpoint.safetensors"
    return runs


# 1. export of the world model's checkpoint (the README's own command), EMA and LoRA
def test_export_world_checkpoint_ema_and_lora(world_runs, tmp_path):
    from diffusers import FluxTransformer2DModel

    out = export_checkpoint(world_runs["full"], tmp_path / "full", ema=True)
    model = FluxTransformer2DModel.from_pretrained(out)
    ema = load_file(str(world_runs["full"]))
    name = "transformer_blocks.0.attn.to_q.weight"
    assert torch.equal(model.state_dict()[name], ema[f"ema.{name}"])
    out = export_checkpoint(world_runs["lora"], tmp_path / "lora", lora=True)
    assert (out / "pytorch_lora_weights.safetensors").is_file()


# 2. export onto a file, over an earlier folder, through a link
def test_export_replaces_a_folder_whole_and_refuses_files_and_links(world_runs, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        export_checkpoint(world_runs["full"], target)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text("keep")
    old = tmp_path / "old"
    old.mkdir()
    (old / "diffusion_pytorch_model.safetensors.index.json").write_text("{}")   # a stale shard index
    (old / "config.json").symlink_to(outside / "config.json")
    export_checkpoint(world_runs["full"], old)
    assert not (old / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert not (old / "config.json").is_symlink() and (outside / "config.json").read_text() == "keep"
    link = tmp_path / "link"
    link.symlink_to(outside)
    with pytest.raises(ValueError, match="symbolic link"):
        export_checkpoint(world_runs["full"], link)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp folders left


# 3. switching the method does not carry the old method's parameters
def test_method_switch_takes_the_new_methods_parameters():
    from engine.methods import DRTune, method_from_config

    cfg = load_config(ROOT / "configs/world.yaml", ["method.name=drtune", "steps=50"])
    m = method_from_config(cfg.method)
    assert isinstance(m, DRTune) and m.lam == cfg.method.lam and m.K == 2
    with pytest.raises(ValueError, match=r"method.leapalign.alpah"):
        load_config(ROOT / "configs/world.yaml", ["method.leapalign.alpah=0.1"])


# 4. one run per output_dir; fresh metrics; resume without duplicate rows; no stale temp files
def test_output_dir_is_locked(tmp_path):
    with RunDir(tmp_path):
        with pytest.raises(RuntimeError, match="in use by another run"):
            RunDir(tmp_path).__enter__()
    with RunDir(tmp_path):   # free again once the first run is done
        pass


def test_second_process_into_the_same_output_dir_is_refused(tmp_path):
    code = f"from engine.rundir import RunDir; import time\nwith RunDir({str(tmp_path)!r}):\n print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=f"pid {holder.pid}"):
            RunDir(tmp_path).__enter__()
    finally:
        holder.kill()
        holder.wait()


def test_metrics_fresh_run_and_resume(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "reward": 9}\n' * 5)
    (tmp_path / "checkpoint.safetensors.abc.tmp").write_bytes(b"half a file")
    t = tiny(tmp_path, "steps=2", "checkpoint_every=1")
    t.train()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["reward"] != 9
    assert not list(tmp_path.glob("*.tmp"))
    # a crash after step 2's checkpoint, with step 3 already logged: the resume logs step 3 once
    ck = tmp_path / "ck2.safetensors"
    (tmp_path / "checkpoint.safetensors").rename(ck)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "reward": 9}\n{"step": 4, "rew')
    tiny(tmp_path, "steps=3").train(resume=ck)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["reward"] != 9


# 5. non-finite settings refused; a non-finite update undone and counted; checkpoints checked
@pytest.mark.parametrize("bad", ["optim.lr=.inf", "optim.lr=0", "optim.grad_clip=.nan", "optim.grad_clip=-1",
                                 "optim.grad_clip=0", "optim.eps=-1"])
def test_bad_optimizer_settings_are_refused(bad):
    key = bad.split("=")[0]
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(None, [bad])


def test_update_that_could_overflow_is_skipped(tmp_path, monkeypatch):
    t = tiny(tmp_path, "optim.grad_clip=null")
    t.step()
    before = snapshot(t)
    monkeypatch.setattr(t, "MAX_UPDATE_NORM", 0.0)   # every gradient now counts as too large
    with pytest.warns(UserWarning, match="overflow AdamW"):
        m = t.step()
    assert m["skipped_step"] and t.skipped == 1 and same(before, snapshot(t))


def test_nonfinite_update_stops_the_run_before_saving(tmp_path, monkeypatch):
    t = tiny(tmp_path, "steps=3", "checkpoint_every=1")
    step = t.optimizer.step

    def poisoned(*a, **k):
        step(*a, **k)
        if t.step_count == 1:
            next(iter(t.params.values())).data.fill_(float("inf"))

    monkeypatch.setattr(t.optimizer, "step", poisoned)
    with pytest.raises(RuntimeError, match="non-finite"):
        t.train()
    ck = tmp_path / "checkpoint.safetensors"
    assert ckpt.read_metadata(ck)["step"] == "1"       # the last good state, loadable
    tiny(tmp_path).load_checkpoint(ck)


@pytest.mark.parametrize("bad", ["optim.lr=2", "optim.weight_decay=2e5"])
def test_optimizer_settings_that_break_adamw(bad):
    with pytest.raises(ValueError, match="optim.lr"):
        load_config(None, [bad])


def test_checkpoint_with_bad_optimizer_state_is_refused(tmp_path):
    t = tiny(tmp_path)
    t.step()
    t.save_checkpoint(tmp_path / "ck.safetensors")
    key = next(k for k in load_file(str(tmp_path / "ck.safetensors")) if k.endswith(".exp_avg"))
    nan = rewrite(tmp_path / "ck.safetensors", tmp_path / "nan.safetensors", {key: torch.full_like(
        load_file(str(tmp_path / "ck.safetensors"))[key], float("nan"))})
    with pytest.raises(ValueError, match="non-finite"):
        tiny(tmp_path).load_checkpoint(nan)
    tensors = {k: v for k, v in load_file(str(tmp_path / "ck.safetensors")).items() if not k.startswith("optim.")}
    save_file(tensors, str(tmp_path / "noopt.safetensors"), metadata=dict(
        __import__("safetensors").safe_open(str(tmp_path / "ck.safetensors"), "pt").metadata()))
    with pytest.raises(ValueError, match="lacks the optimizer state"):
        tiny(tmp_path).load_checkpoint(tmp_path / "noopt.safetensors")


# 6. clipping off is explicit
def test_grad_clip_off_is_explicit(tmp_path):
    assert load_config(None, ["optim.grad_clip=off"]).optim.grad_clip is None
    t = tiny(tmp_path, "optim.grad_clip=null")
    before = snapshot(t)
    assert not t.step()["skipped_step"] and not same(before, snapshot(t))


# 7. image sizes the model cannot make
@pytest.mark.parametrize("size", ["model.height=24", "model.width=40"])
def test_size_not_a_multiple_of_the_models_factor(tmp_path, size):
    with pytest.raises(ValueError, match=r"multiple of 16.*got (24|40)"):
        tiny(tmp_path, size)


# 8. loading is all-or-nothing
@pytest.mark.parametrize("fault", ["rng", "step"])
def test_failed_load_changes_nothing(tmp_path, fault):
    t = tiny(tmp_path)
    t.step()
    t.save_checkpoint(tmp_path / "ck.safetensors")
    bad = rewrite(tmp_path / "ck.safetensors", tmp_path / "bad.safetensors",
                  {"rng.generator": torch.zeros(3, dtype=torch.uint8)} if fault == "rng" else None,
                  {"step": "1.5"} if fault == "step" else None)
    fresh = tiny(tmp_path)
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="rng.generator" if fault == "rng" else "'step'"):
        fresh.load_checkpoint(bad)
    assert same(before, snapshot(fresh)) and fresh.step_count == 0


# 9. paths in a checkpoint's config are never read or written by sample / eval / export
def test_crafted_checkpoint_paths_are_not_used(world_runs, tmp_path):
    from engine.__main__ import main

    cfg = ckpt.stored_config(world_runs["full"])
    evil = tmp_path / "evil"
    secret = tmp_path / "secret.txt"
    secret.write_text("a red circle\n")
    cfg.update(embed_cache_dir=str(evil / "cache"), prompt_file=str(secret), output_dir=str(evil / "out"))
    import yaml

    crafted = rewrite(world_runs["full"], tmp_path / "crafted.safetensors", meta={"config": yaml.safe_dump(cfg)})
    out = tmp_path / "samples"
    assert main(["sample", "--checkpoint", str(crafted), "--prompt", "a red circle", "--steps", "2",
                 "--out", str(out)]) == 0
    assert (out / "samples.png").is_file() and not evil.exists()
    assert main(["eval", "--checkpoint", str(crafted), "--n", "1", "--out", str(tmp_path / "ev")]) == 2
    assert not evil.exists() and not (tmp_path / "ev").exists()


# 10. bad values named up front
@pytest.mark.parametrize("bad,match", [
    ("prompts=[1, 2]", r"prompts\[0\] must be str"), ("method.leapalign.alpha='1e-1x'", "method.leapalign.alpha"),
    ("optim.betas=[0.9]", "must hold 2 values"), ("seed=1e23", "seed"), ("samples=0", "samples must be >= 1"),
    ("lora.alpha=0", "lora.alpha"), ("lora.alpha=-2", "lora.alpha"), ("method.params={alpha: 1}", "per-method"),
    ("reward.params={epsilon: 1}", r"reward.params.epsilon")])
def test_config_values_are_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [bad])


def test_yaml_numeric_strings_are_numbers():
    cfg = load_config(None, ["method.leapalign.alpha='1e-1'", "method.lam='2e-1'"])
    assert cfg.method.leapalign.alpha == 0.1 and cfg.method.lam == 0.2


def test_prompts_checked_before_training(tmp_path):
    with pytest.raises(ValueError, match="names no colour"):
        tiny(tmp_path, "prompts=['a square']")
    long = tmp_path / "p.txt"
    long.write_text("a red circle\n" + " ".join(["a red circle"] * 10) + "\n")
    with pytest.raises(ValueError, match="longer than max_length"):
        LeapTrainer(load_config(ROOT / "configs/world.yaml", [*WORLD, f"prompt_file={long}", "test_fraction=0"]))


# 11. the command line
def test_cli_user_error_is_one_line_and_exit_2(tmp_path):
    run = subprocess.run([sys.executable, "-m", "engine", "train", "optim.lr=-1"], capture_output=True, text=True,
                         cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and "optim.lr" in run.stderr
    run = subprocess.run([sys.executable, "-m", "engine", "train", "--help"], capture_output=True, text=True,
                         cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert run.returncode == 0 and "optim.{lr" in run.stdout and "engine/params.py" in run.stdout


def test_config_check_needs_no_torch():
    code = "import sys; from engine.config import load_config; load_config(None, ['steps=3']); print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert run.stdout.strip() == "False", run.stderr[-2000:]


def test_grids_carry_captions(tmp_path):
    from PIL import Image

    from engine.report import save_grid

    img = torch.rand(2, 3, 64, 64)
    save_grid(img, tmp_path / "a.png")
    save_grid(img, tmp_path / "b.png", captions=["a red circle", "two blue squares"])
    plain, captioned = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert captioned.size[1] > plain.size[1]


def test_eval_set_has_no_repeats(tmp_path):
    t = tiny(tmp_path, "samples=8", "prompts=['a red square', 'a blue circle']")
    assert t.eval_set == ["a red square", "a blue circle"]


def test_describe_names_policy_and_backends(tmp_path):
    text = tiny(tmp_path, "model.policy=lean").describe()
    assert "block policy: lean" in text and "fused kernels:" in text and "attention:" in text


# 12. a hung rank cannot hold the others for half an hour
def test_distributed_timeout_is_passed(monkeypatch):
    from engine import distributed

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, timeout: seen.update(t=timeout))
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 0)
    distributed.setup("ddp", torch.device("cpu"), timeout_s=42)
    assert seen["t"].total_seconds() == 42
    assert load_config(None, []).distributed_timeout_s <= 900


# 13. a checkpoint moves between machines (the model's folder path is not part of its identity)
def test_checkpoint_written_elsewhere_loads(world_runs, tmp_path):
    meta = ckpt.read_metadata(world_runs["full"])
    cfg = json.loads(meta["model_config"])
    cfg["_name_or_path"] = "/some/other/checkout/engine/world/weights/transformer"
    moved = rewrite(world_runs["full"], tmp_path / "moved.safetensors", meta={"model_config": json.dumps(cfg)})
    from engine import build

    c, _ = ckpt.read_config(moved)
    adapter = build.build_trainable(c, torch.device("cpu"), load_vae=False)
    ckpt.load_weights(moved, adapter.transformer)


def test_run_log_prints_and_appends_once_its_path_is_set(tmp_path, capsys):
    from engine.report import RunLog

    log = RunLog()
    log("before")                       # no file yet: printed only
    log.path = tmp_path / "log.txt"
    log("one")
    log("two")
    printed = capsys.readouterr().out.splitlines()
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert [p.split("] ", 1)[1] for p in printed] == ["before", "one", "two"]
    assert lines == printed[1:] and all(re.fullmatch(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] \w+", x) for x in lines)
