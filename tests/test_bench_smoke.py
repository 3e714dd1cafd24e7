"""The benches must keep running on a CPU (small sizes), so CI notices when one breaks."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_kernels_runs_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LEAPALIGN_BACKEND")}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench/bench_kernels.py",
                          "--benchmark-enable", f"--benchmark-json={out}", "-k", "leap_connect or mod_layernorm"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = subprocess.run([sys.executable, "bench/summarize_kernels.py", str(out)], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert summary.returncode == 0, summary.stderr[-2000:]
    assert "| leap_connect | fwd+bwd |" in summary.stdout and "| mod_layernorm | fwd |" in summary.stdout


@pytest.fixture
def restore_torch_settings():
    """run_one sets the thread count and denormal flushing for its (normally its own) process."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)


def test_study_runs_and_summarizes(tmp_path, monkeypatch, restore_torch_settings):
    """bench/study.py end to end at a toy size: one trained run, the base model, the table."""
    sys.path.insert(0, str(ROOT / "bench"))
    import study

    monkeypatch.setattr(study, "N_TEST", 6)
    monkeypatch.setattr(study, "N_TRAIN", 4)
    monkeypatch.setattr(study, "N_GRID", 2)
    for name in ("base", "leapalign"):
        res = study.run_one({"name": name, "seed": 0, "budget": 30, "out": str(tmp_path), "threads": 1,
                             "time_budget": 1e-3})
        assert res["test"]["n"] == 6 and 0 <= res["test"]["judge"] <= 1
    assert res["steps"] == 2 and res["model_calls"] >= 30   # two LeapAlign steps of T=25 calls
    # the CPU-time budget ran out after the first step: scored there, on the test prompts
    assert res["at_time"]["steps"] == 1 and res["at_time"]["test"]["n"] == 6
    assert [p["calls"] for p in res["judge_curve"]] == [25, 50] and res["train_cpu_seconds"] > 0
    assert res["batch_size"] == 8   # configs/world.yaml's
    # a record is reused only by a job from the same start model / reward / config and budgets
    job = {"start": study.start_fingerprint(), "budget": 30, "time_budget": 1e-3}
    assert res["start"] == job["start"] and study._current(res, job)
    assert not study._current(res, {**job, "start": "0" * 16}) and not study._current(res, {**job, "budget": 31})
    with pytest.raises(ValueError, match="no runs to summarize .* made from start 0000000000000000"):
        study.summarize(tmp_path, ["base", "leapalign"], edit_pairs=4, start="0" * 16)
    # a longer run goes on past the budget (2x), its judge curve on every test prompt, every budget / 5 calls
    long = study.run_one({"name": "leapalign 2x calls", "seed": 0, "budget": 50, "out": str(tmp_path), "threads": 1,
                          "time_budget": 1e-3, "start": job["start"]})
    assert long["steps"] == 4 and long["model_calls"] == 100
    assert [p["calls"] for p in long["judge_curve"]] == [25, 50, 75, 100]
    assert all(p["n"] == 6 and set(p["by_kind"]) >= {"overall"} for p in long["judge_curve"])
    noise = study.eval_noise(tmp_path, 2)
    assert noise["seeds"] == [study.EVAL_SEED, study.EVAL_SEED + 1] and len(noise["judge"]) == 2
    # the first noise seed is the one every run is scored with
    base = json.loads((tmp_path / "runs" / "base__s0.json").read_text())
    assert noise["judge"][0] == pytest.approx(base["test"]["judge"])
    # the batch-32 pair: its own config override, the same call budget, and its own line in the spread test
    monkeypatch.setitem(study.RUNS, "leapalign batch 32", ("leapalign", {"alpha": 0.3}, 1, ("batch_size=3",)))
    monkeypatch.setitem(study.RUNS, "drtune batch 32", ("drtune", {}, 1, ("batch_size=3",)))
    for name in ("leapalign batch 32", "drtune batch 32"):
        b = study.run_one({"name": name, "seed": 0, "budget": 25, "out": str(tmp_path), "threads": 1,
                           "time_budget": 1e-3, "start": job["start"]})
        assert b["batch_size"] == 3 and b["model_calls"] >= 25
    rows = study.summarize(tmp_path, ["base", "leapalign", "leapalign 2x calls", "leapalign batch 32", "drtune batch 32"],
                           edit_pairs=4, start=job["start"])
    assert "| drtune batch 32 (against leapalign batch 32) | " in (tmp_path / "table.md").read_text()
    assert {"base", "leapalign", "_reward_by_edit", "_longer", "_eval_noise"} <= set(rows)
    assert rows["_longer"]["leapalign 2x calls"]["calls"] == [25, 50, 75, 100]
    table = (tmp_path / "table.md").read_text()
    assert "| leapalign | 1 | 2 |" in table and "At equal compute" in table and "| leapalign | 1 | 1 | 25 |" in table
    assert "| leapalign 2x calls (1 seeds) | 25 calls, 1 steps |" in table and "Evaluation noise alone" in table
    for png in ("curves.png", "judge_curves.png", "grids.png", "longer_judge_curves.png"):
        assert (tmp_path / png).is_file()


def test_bench_step_modes_smoke(tmp_path):
    """bench_step --modes on the real-tensor path (tiny model, CPU): every mode runs after the
    baseline, in one process, and the report compares them with it."""
    run = subprocess.run([sys.executable, "bench/bench_step.py", "--device", "cpu", "--real", "--tiny", "--res", "64",
                          "--steps", "2", "--iters", "1", "--out", str(tmp_path), "--modes", "full", "fp8", "fp8+swap"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads((tmp_path / "modes_cpu_tiny.json").read_text())
    modes = data["results"][0]["modes"]
    assert list(modes) == ["baseline", "full", "fp8", "fp8+swap"]
    assert all("error" not in m and m["peak_bytes"] > 0 and m["time_vs_baseline"] > 0 for m in modes.values())
    assert modes["fp8+swap"]["swap_bytes_per_iteration"] > 0 and "swap_bytes_per_iteration" not in modes["fp8"]
    assert "| fp8+swap |" in (tmp_path / "modes_cpu_tiny.md").read_text()


# --------------------------------------------------------------------------- the GPU suite, dry run
def _finite(x, what):
    assert isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x), f"{what}: {x!r}"
    return x


@pytest.fixture(scope="module")
def gpu_suite_dry_run(tmp_path_factory):
    """bench/gpu_suite.sh --dry-run: every step of the GPU suite at toy size on this CPU, into one
    folder (run once for the checks below)."""
    out = tmp_path_factory.mktemp("gpu_suite_dry")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LEAPALIGN_BACKEND")}
    env.update(OUT=str(out), OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    run = subprocess.run(["bash", "bench/gpu_suite.sh", "--dry-run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=540)
    return out, run


STEPS = ("csrc_build", "kernel_tests", "engine_gpu_tests", "aot_kernels", "bench_kernels", "bench_block",
         "bench_step", "profile_step")


def test_gpu_suite_dry_run_runs_every_step(gpu_suite_dry_run):
    out, run = gpu_suite_dry_run
    logs = {p.stem: p.read_text() for p in out.glob("*.log")}
    failed = {n: log[-2500:] for n, log in logs.items() if not log.rstrip().endswith("exit 0")}
    assert run.returncode == 0 and not failed, run.stdout[-3000:] + run.stderr[-2000:] + str(failed)
    assert set(logs) == set(STEPS), sorted(logs)
    summary = (out / "summary.md").read_text()
    assert "(dry run: CPU, toy sizes)" in summary and "## Steps" in summary
    for name in STEPS:
        assert f"- {name}: exit 0" in summary, summary[-2000:]
    assert "| leap_connect |" in summary  # the kernel bench's table made it into the summary


def test_bench_block_smoke(gpu_suite_dry_run):
    """bench_block.py at toy size (2 heads of 32, 16 + 8 tokens): every policy's figures."""
    out, _ = gpu_suite_dry_run
    data = json.loads((out / "block_cpu.json").read_text())
    assert data["meta"]["width"] == 64 and data["meta"]["tokens_img"] == 16
    for kind in ("double", "single"):
        for policy in ("none", "full", "lean", "ckpt"):
            r = data["results"][kind][policy]
            for key in ("saved_bytes", "peak_bytes", "hook_saved_bytes"):
                assert _finite(r[key], f"{kind}/{policy}/{key}") >= 0
            assert _finite(r["time_s"], f"{kind}/{policy}/time_s") > 0
            assert _finite(r["flops"]["total"], f"{kind}/{policy}/flops") > 0
        assert data["results"][kind]["lean"]["kernels"] == {op: "torch" for op in
                                                            data["results"][kind]["lean"]["kernels"]}
        assert data["results"][kind]["lean"]["attention"].startswith("sdpa")
        assert 0 < data["results"][kind]["lean"]["saved_bytes"] < data["results"][kind]["none"]["saved_bytes"]
    assert data["analysis"]["targets"]
    assert "| lean |" in (out / "block_cpu.md").read_text()


def test_bench_step_smoke(gpu_suite_dry_run):
    """bench_step.py on the tiny model (real tensors, CPU): both configs' time, peak and loss."""
    out, _ = gpu_suite_dry_run
    data = json.loads((out / "step_cpu_tiny.json").read_text())
    (res,) = data["results"]
    assert res["res"] == 64 and set(res["configs"]) == {"leapalign/lean", "leapalign/baseline"}
    for name, c in res["configs"].items():
        for key in ("rollout_s", "step_s", "loss", "mem_vs_baseline", "time_vs_baseline"):
            _finite(c[key], f"{name}/{key}")
        assert c["step_s"] > 0 and c["peak_bytes"] > 0 and c["model_calls"] == c["T"] == 2
    _finite(res["flops_forward"], "flops_forward")
    assert "leapalign" in (out / "step_cpu_tiny.md").read_text()


def test_profile_step_smoke(gpu_suite_dry_run):
    """profile_step.py on the tiny model: a trace, the top ops, the step's metrics."""
    out, _ = gpu_suite_dry_run
    top = json.loads((out / "profile_cpu_top.json").read_text())
    assert len(top["top"]) >= 5 and all(_finite(t["self_us"], t["name"]) >= 0 for t in top["top"])
    for key in ("loss", "reward", "grad_norm", "step_time_s"):
        _finite(top["metrics"][key], key)
    assert (out / "profile_cpu.json.gz").stat().st_size > 1000
    assert (out / "profile_cpu.md").read_text().strip()


def test_aot_report_smoke(gpu_suite_dry_run):
    """bench/aot_kernels.py (toy sizes, one op, sm_90): registers, spills and ideal times per row."""
    out, _ = gpu_suite_dry_run
    rep = json.loads((out / "triton_aot.json").read_text())
    rows = rep["triton"]["rows"]
    assert rows and all(r["ok"] and r["target"] == "sm_90" and r["op"] == "gelu_tanh" for r in rows)
    for r in rows:
        assert _finite(r["registers"], "registers") > 0 and r["spill_stores"] == r["spill_loads"] == 0
        assert _finite(r["ideal_us_H100"], "ideal") > _finite(r["ideal_us_H200"], "ideal") > 0
    assert "| gelu_tanh | fwd |" in (out / "triton_aot.md").read_text()


def test_gradient_fidelity_against_full_backprop(tmp_path, monkeypatch, restore_torch_settings):
    """bench/gradient_fidelity.py at a toy size: full backprop against itself is 1 on every draw;
    the estimators give a cosine in [-1, 1] per draw and of the mean."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gradient_fidelity as gf

    monkeypatch.setitem(gf.ESTIMATORS, "full", ("full", {}))
    res = gf.measure(batches=2, draws=2, names=["full", "leapalign", "drtune"],
                     overrides=["num_steps=4", "batch_size=2", "method.lam=100"], work=tmp_path)
    assert res["batches"] == 2 and len(res["per_draw"]["leapalign"]["values"]) == 4
    assert res["per_draw"]["full"]["values"] == pytest.approx([1.0] * 4, abs=1e-9)
    for n in ("leapalign", "drtune"):
        assert all(-1 <= c <= 1 for c in res["per_draw"][n]["values"] + res["of_mean"][n]["values"])
    table = gf.table(res)
    assert "the shipped world model" in table
    # the paired columns: LeapAlign's mean-of-draws cosine minus each other estimator's, batch by batch
    d = np.asarray(res["of_mean"]["leapalign"]["values"]) - np.asarray(res["of_mean"]["drtune"]["values"])
    assert re.search(rf"\| drtune \| .* \| {re.escape(f'{d.mean():+.3f}')} ± \d\.\d{{3}} \| {int((d > 0).sum())} of 2 \|", table)
    assert re.search(r"\| leapalign \| [^|]+ \| [^|]+ \|  \|  \|", table)
    # at a training checkpoint (the engine's own format, validated on load)
    from engine.config import load_config
    from engine.trainer import LeapTrainer

    small = ["num_steps=4", "batch_size=2", "method.lam=100", f"output_dir={tmp_path / 'train'}", "optim.lr=1e-2"]
    tr = LeapTrainer(load_config(ROOT / "configs" / "world.yaml", small))
    tr.step()
    tr.save_checkpoint(tmp_path / "ckpt.safetensors")
    res2 = gf.measure(batches=1, draws=1, names=["full"], overrides=small[:3], work=tmp_path,
                      checkpoint=str(tmp_path / "ckpt.safetensors"))
    assert res2["per_draw"]["full"]["values"] == pytest.approx([1.0], abs=1e-9)
    assert "ckpt.safetensors" in gf.table(res2)


def test_gradient_against_expected(tmp_path, monkeypatch, restore_torch_settings):
    """bench/gradient_fidelity.py --expected at a toy size: an estimator that is full backprop
    reproduces the full row exactly; with two groups of half the batches, full backprop's group
    cosine is the halves' cosine (each half's mean against the other's); too few batches for the
    largest group is refused."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gradient_fidelity as gf

    monkeypatch.setitem(gf.ESTIMATORS, "exact", ("full", {}))
    small = ["num_steps=4", "batch_size=2", "method.lam=100"]
    res = gf.measure_expected(batches=4, names=("exact", "leapalign"), groups=(1, 2), overrides=small, work=tmp_path)
    g1, g2 = res["groups"]["1"], res["groups"]["2"]
    assert len(g1["full"]["values"]) == 4 and len(g2["full"]["values"]) == 2
    for g in (g1, g2):
        assert g["exact"]["values"] == pytest.approx(g["full"]["values"], abs=1e-9)
        assert all(-1 <= c <= 1 for c in g["leapalign"]["values"])
    assert g2["full"]["values"] == pytest.approx([res["halves_cosine"]] * 2, abs=1e-9)
    assert res["zero_loss_batches"] == 0   # lam 100: every sample pushed
    table = gf.table_expected(res)
    assert re.search(r"\| leapalign \| -?\d\.\d{3} ± \d\.\d{3} \| -?\d\.\d{3} ± \d\.\d{3} \|", table)
    with pytest.raises(ValueError, match="--batches 3"):
        gf.measure_expected(batches=3, groups=(1, 2), overrides=small, work=tmp_path)
