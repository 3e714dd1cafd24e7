"""The benches must keep running on a CPU (small sizes), so CI notices when one breaks."""
import os
import subprocess
import sys
from pathlib import Path

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
