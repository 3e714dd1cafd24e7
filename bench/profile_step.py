"""torch.profiler trace of one LeapAlign training iteration, and its top kernels.

    python bench/profile_step.py --out DIR [--device cpu|cuda] [--res N] [--steps T] [--policy lean]

GPU (--device cuda): the full-size setup of bench/bench_step.py (FLUX.1-dev with random bf16
weights, LoRA rank 64, Flux VAE config, ColourReward) at 512x512 by default. CPU: the tiny model
(engine.flux.tiny, same classes, fp32, real tensors; fused ops on the torch backend, as the Triton
kernels need a GPU or the slow interpreter) at 64x64, so it runs in seconds: the CPU trace shows
the structure of an iteration (rollout, graph-keeping passes, decode, reward, backward, AdamW, EMA),
not GPU kernel times. Both go through LeapTrainer.step() (one warm-up step first).

Writes into --out: profile_<device>.json.gz (chrome trace, open in chrome://tracing or Perfetto;
gzip keeps it under 16 MB), profile_<device>.md (top ops by self CUDA time on GPU, self CPU time on
CPU, plus the step's metrics) and profile_<device>_top.json.
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

MAX_TRACE = 16 * 2 ** 20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--res", type=int, default=None, help="default 512 on GPU, 64 (tiny) on CPU")
    ap.add_argument("--steps", type=int, default=25, help="T")
    ap.add_argument("--policy", default="lean", choices=("none", "full", "lean", "baseline"))
    ap.add_argument("--rows", type=int, default=30)
    a = ap.parse_args(argv)
    cuda = a.device == "cuda"
    os.environ.setdefault("LEAPALIGN_BACKEND", "triton" if cuda else "torch")
    from bench.bench_step import build_trainer, configure, device_name

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = a.res or (512 if cuda else 64)
    t0 = time.perf_counter()
    trainer = build_trainer(res, a.device, a.steps, tiny=not cuda)
    trainer = configure(trainer, "leapalign", a.policy)
    build_s = time.perf_counter() - t0
    trainer.step()  # warm-up (autotuning, allocator, lazy optimizer state)
    if cuda:
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts, record_shapes=False, profile_memory=False, with_stack=False) as prof:
        with record_function("leapalign_step"):
            metrics = trainer.step()
        if cuda:
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    avgs = prof.key_averages()
    table = avgs.table(sort_by=sort, row_limit=a.rows)
    key_attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = sorted(avgs, key=lambda e: getattr(e, key_attr, 0) or 0, reverse=True)[: a.rows]
    total = sum(getattr(e, key_attr, 0) or 0 for e in avgs)
    top = [{"name": e.key, "calls": e.count, "self_us": getattr(e, key_attr, 0),
            "share": (getattr(e, key_attr, 0) or 0) / total if total else None} for e in rows]

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))
        trace = out / f"profile_{a.device}.json.gz"
        with open(raw, "rb") as f, gzip.open(trace, "wb", compresslevel=6) as g:
            shutil.copyfileobj(f, g)
        raw_size = raw.stat().st_size
    size = trace.stat().st_size
    if size > MAX_TRACE:  # keep what comes back from a device run under its limit
        trace.unlink()
        note = f"trace {size / 2**20:.1f} MB gzipped > 16 MB: not kept (lower --steps)"
    else:
        note = f"{trace.name}: {size / 2**20:.2f} MB gzipped ({raw_size / 2**20:.1f} MB raw)"
    dev = device_name(a.device)
    model = "FLUX.1-dev size, random bf16 weights, LoRA 64" if cuda else "tiny Flux (engine.flux.tiny), fp32, LoRA 64"
    keep = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
    L = [f"# Profile of one LeapAlign iteration ({dev})", "",
         f"- device: {a.device} ({dev}); torch {torch.__version__}; {model}; {res}x{res}, T={a.steps}, "
         f"policy {a.policy}, backend {os.environ.get('LEAPALIGN_BACKEND')}",
         f"- date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; build {build_s:.1f} s; "
         f"step {metrics['step_time_s']:.3f} s (wall, under the profiler)",
         f"- {note}", f"- step metrics: {json.dumps(keep)}", "",
         f"## Top {a.rows} by {'self CUDA' if cuda else 'self CPU'} time", "",
         "| op / kernel | calls | self time (ms) | share |", "|---|---:|---:|---:|"]
    for t in top:
        name = t["name"].replace("|", "\\|")
        name = name if len(name) <= 90 else name[:87] + "..."
        L.append(f"| `{name}` | {t['calls']} | {t['self_us'] / 1e3:.2f} | {t['share']:.1%} |")
    L += ["", "## torch.profiler table", "", "```", table, "```", ""]
    (out / f"profile_{a.device}.md").write_text("\n".join(L))
    (out / f"profile_{a.device}_top.json").write_text(json.dumps({"device": dev, "sort": key_attr, "top": top,
                                                                  "metrics": keep, "trace": note}, indent=1))
    print(f"{note}; wrote {out}/profile_{a.device}.md ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
