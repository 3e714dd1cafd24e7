"""Resource report of every kernel, compiled for sm_90 and sm_80 on a machine without a GPU.

Triton: each op's launches at FLUX.1-dev sizes (``kernels.aot.cases``: the ops' own launch
descriptions on meta tensors) compiled with ``triton.compile`` for each target; ptxas -v gives
registers per thread, spill stores/loads and stack, triton's metadata the shared memory. Each
launch's bytes read + written (every streamed tensor once) give its ideal time at the copy
bandwidth of an H100 (3.0 TB/s) and an H200 (4.3 TB/s), so a GPU run can state achieved / ideal.
csrc: ``nvcc -Xptxas -v`` of every .cu file for sm_80 and sm_90 (skipped, and said so, without
nvcc).

    python bench/aot_kernels.py [--out bench/results] [--name triton_aot]

writes NAME.md and NAME.json; exits 1 if any kernel fails to compile (the report names it).
The committed reports: triton_aot (triton 3.9, the development version) and triton_aot_triton3.6
(the GPU machine's version), made in a side environment with
    python -m venv /tmp/t36 && /tmp/t36/bin/pip install torch==2.13.0 && /tmp/t36/bin/pip install --no-deps triton==3.6.0
    PYTHONPATH=$PWD /tmp/t36/bin/python bench/aot_kernels.py --no-csrc --name triton_aot_triton3.6
ptxas runs only on a compile that misses triton's cache, so the report compiles into a fresh
cache directory.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Measured device-to-device copy bandwidth (bytes/s): what a bandwidth-bound kernel can reach.
BANDWIDTH = {"H100": 3.0e12, "H200": 4.3e12}


def triton_report(targets, only=None, sizes=None, jobs=1) -> dict:
    import triton

    from kernels import aot

    rows, failures = [], []
    t0 = time.perf_counter()
    for r in aot.compile_all(targets, sizes=sizes, ptxas_log=True, only=only, jobs=jobs):
        rd, wr = r.case.launch.bytes_moved()
        row = {"op": r.case.op, "launch": r.case.what, "kernel": r.case.launch.name, "dtypes": r.case.dtypes,
               "shape": r.case.shape, "target": r.target, "ok": r.ok, "compile_s": round(r.seconds, 3),
               "grid": list(r.case.launch.grid), "num_warps": r.case.launch.num_warps,
               "constexprs": {k: (v if isinstance(v, (int, float, bool)) else str(v))
                              for k, v in r.case.launch.constexprs.items()},
               "bytes_read": rd, "bytes_written": wr}
        row.update({f"ideal_us_{gpu}": (rd + wr) / bw * 1e6 for gpu, bw in BANDWIDTH.items()})
        if r.ok:
            row.update(shared_bytes=r.shared, registers=r.ptxas.get("registers"),
                       spill_stores=r.ptxas.get("spill_stores"), spill_loads=r.ptxas.get("spill_loads"),
                       stack_bytes=r.ptxas.get("stack"), cubin=r.usage)
        else:
            row["error"] = r.error
            failures.append(r.error)
        rows.append(row)
    return {"triton": triton.__version__, "seconds": round(time.perf_counter() - t0, 1),
            "rows": rows, "failures": failures}


def csrc_report() -> dict:
    from kernels import _csrc
    from kernels.utils import parse_ptxas

    nvcc = _csrc.find_nvcc()
    if nvcc is None:
        return {"skipped": "nvcc not found (CUDA_HOME, CUDA_PATH or PATH)"}
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    rows, failures = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for src in sorted(_csrc.CSRC_DIR.glob("*.cu")):
            cmd = _csrc.nvcc_compile_command(src, Path(tmp) / f"{src.name}.o", nvcc, ptxas_verbose=True)
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                failures.append(f"{src.name}: nvcc rc={p.returncode}\n{(p.stdout + p.stderr)[-3000:]}")
                continue
            usage = parse_ptxas(p.stdout + p.stderr)
            names = _csrc.demangle(sorted({f for f, _ in usage}))
            for (fn, arch), u in sorted(usage.items(), key=lambda kv: (names[kv[0][0]], kv[0][1])):
                rows.append({"file": src.name, "kernel": names[fn], "target": arch,
                             "registers": u.get("registers"), "spill_stores": u.get("spill_stores"),
                             "spill_loads": u.get("spill_loads"), "stack_bytes": u.get("stack")})
    return {"nvcc": version, "archs": [f"sm_{a}" for a in _csrc.AOT_ARCHS], "rows": rows, "failures": failures}


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def summary_table(rows: list[dict]) -> list[str]:
    """Per op and launch: the most registers over dtypes per target, all spills, the most shared
    memory, and the bf16 launch's bytes and ideal times (what Flux runs)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["op"], r["launch"]), []).append(r)
    targets = sorted({r["target"] for r in rows}, reverse=True)
    out = ["", "## Summary (max over dtypes)", "",
           "| op | launch | " + " | ".join(f"regs {t}" for t in targets)
           + " | spills (B) | smem (B) | bf16: bytes | ideal H100 (us) | ideal H200 (us) |",
           "|---|---|" + "---:|" * len(targets) + "---:|---:|---:|---:|---:|"]
    for (op, launch), rs in groups.items():
        ok = [r for r in rs if r["ok"]]
        regs = [max((r["registers"] or 0 for r in ok if r["target"] == t), default=0) for t in targets]
        spills = sum((r.get("spill_stores") or 0) + (r.get("spill_loads") or 0) for r in ok)
        smem = max((r["shared_bytes"] or 0 for r in ok), default=0)
        bf = next((r for r in rs if r["dtypes"].count("bf16") == len(r["dtypes"].split())), rs[0])
        fails = "" if len(ok) == len(rs) else f" ({len(rs) - len(ok)} FAILED)"
        out.append(f"| {op} | {launch}{fails} | " + " | ".join(str(x) for x in regs)
                   + f" | {spills} | {smem} | {_fmt_bytes(bf['bytes_read'] + bf['bytes_written'])} | "
                   f"{bf['ideal_us_H100']:.1f} | {bf['ideal_us_H200']:.1f} |")
    return out


def markdown(rep: dict) -> str:
    t = rep["triton"]
    out = [f"# Kernels compiled ahead of time (no GPU): triton {t['triton']}", "",
           f"- date: {rep['date']}; host: {rep['host']}; torch {rep['torch']}",
           f"- sizes: {rep['sizes']}",
           "- registers / spills / stack: ptxas -v of triton's PTX; shared: triton's allocation (bytes)",
           "- bytes: every tensor the launch streams, read or written once; ideal = bytes / copy bandwidth "
           f"({', '.join(f'{g} {bw / 1e12:.1f} TB/s' for g, bw in BANDWIDTH.items())})",
           f"- {sum(r['ok'] for r in t['rows'])} of {len(t['rows'])} launches compiled in {t['seconds']} s"]
    spilled = [r for r in t["rows"] if r["ok"] and ((r.get("spill_stores") or 0) + (r.get("spill_loads") or 0)) > 0]
    out.append(f"- spills: {'none' if not spilled else ', '.join(sorted({r['kernel'] + ' ' + r['target'] for r in spilled}))}")
    if t["failures"]:
        out += ["", "## Compile failures", ""] + [f"- {e}" for e in t["failures"]]
    out += summary_table(t["rows"])
    out += ["", "## Triton, every launch", "",
            "| op | launch | dtypes | target | warps | constexprs | regs | spill st/ld (B) | stack (B) | smem (B) "
            "| read | written | ideal H100 (us) | ideal H200 (us) |",
            "|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in t["rows"]:
        cx = " ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        if r["ok"]:
            res = (f"{r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {r['stack_bytes']} | "
                   f"{r['shared_bytes']}")
        else:
            res = "FAIL | | |"
        out.append(f"| {r['op']} | {r['launch']} | {r['dtypes']} | {r['target']} | {r['num_warps']} | {cx} | {res} | "
                   f"{_fmt_bytes(r['bytes_read'])} | {_fmt_bytes(r['bytes_written'])} | "
                   f"{r['ideal_us_H100']:.1f} | {r['ideal_us_H200']:.1f} |")
    c = rep.get("csrc")
    if c is not None:
        out += ["", "## csrc (nvcc -Xptxas -v)", ""]
        if "skipped" in c:
            out.append(f"- skipped: {c['skipped']}")
        else:
            out += [f"- {c['nvcc']}; archs {', '.join(c['archs'])}", "",
                    "| file | kernel | target | regs | spill st/ld (B) | stack (B) |", "|---|---|---|---:|---:|---:|"]
            for r in c["rows"]:
                out.append(f"| {r['file']} | `{r['kernel']}` | {r['target']} | {r['registers']} | "
                           f"{r['spill_stores']}/{r['spill_loads']} | {r['stack_bytes']} |")
            out += [f"- FAILED: {e}" for e in c["failures"]]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--name", default="triton_aot", help="file stem of the .md and .json")
    ap.add_argument("--targets", nargs="+", default=["sm_90", "sm_80"])
    ap.add_argument("--only", default=None, help="only the ops whose name contains this")
    ap.add_argument("--no-csrc", action="store_true", help="leave out the csrc (nvcc) section")
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                    help="compile in this many processes (default: up to 8 CPUs)")
    ap.add_argument("--toy", action="store_true",
                    help="tiny sizes (batch 1, width 64, 2 heads of 32, 48 + 16 tokens): a quick plumbing check")
    ap.add_argument("--render", default=None, metavar="JSON",
                    help="only rewrite the markdown next to an existing report JSON (no compiling)")
    args = ap.parse_args(argv)
    if args.render:
        src = Path(args.render)
        src.with_suffix(".md").write_text(markdown(json.loads(src.read_text())))
        return 0

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("TRITON_INTERPRET=1 is set: the kernels would be interpreted, not compiled; unset it")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its default
    cache = tempfile.TemporaryDirectory(prefix="triton_aot_cache_")
    os.environ["TRITON_CACHE_DIR"] = cache.name  # a miss for every kernel: ptxas runs and reports
    import torch

    from kernels import aot

    sizes = dict(batch=1, width=64, heads=2, head_dim=32, mlp=256, img=48, txt=16, latent_c=16) if args.toy else None
    rep = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node() or "?",
           "torch": torch.__version__, "sizes": {**aot.FLUX, **(sizes or {})},
           "triton": triton_report(args.targets, args.only, sizes, args.jobs)}
    if not args.no_csrc:
        rep["csrc"] = csrc_report()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(rep, indent=1))
    (out / f"{args.name}.md").write_text(markdown(rep))
    t = rep["triton"]
    print(f"triton {t['triton']}: {sum(r['ok'] for r in t['rows'])} of {len(t['rows'])} launches compiled; "
          f"report in {out / (args.name + '.md')}")
    for e in t["failures"]:
        print(e)
    bad = bool(t["failures"]) or bool(rep.get("csrc", {}).get("failures"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
