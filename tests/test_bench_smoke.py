"""The benches must keep running on a CPU (small sizes), so CI notices when one breaks."""
import os
import subprocess
import sys
from pathlib import Path

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
        res = study.run_one({"name": name, "seed": 0, "budget": 30, "out": str(tmp_path), "threads": 1})
        assert res["test"]["n"] == 6 and 0 <= res["test"]["judge"] <= 1
    assert res["steps"] == 2 and res["model_calls"] >= 30   # two LeapAlign steps of T=25 calls
    rows = study.summarize(tmp_path, ["base", "leapalign"], edit_pairs=4)
    assert {"base", "leapalign", "_reward_by_edit"} <= set(rows)
    assert "| leapalign | 1 | 2 |" in (tmp_path / "table.md").read_text()
    for png in ("curves.png", "grids.png"):
        assert (tmp_path / png).is_file()
