"""Markdown table from a ``bench/bench_kernels.py`` pytest-benchmark JSON.

    python bench/summarize_kernels.py bench/results/kernels_h100.json > bench/results/kernels_h100.md

One row per (op, mode, implementation): median time, achieved GB/s (bytes the op must move / median),
that as a fraction of a device-to-device copy of the same byte count timed in the same run, and
the speedup over torch eager. The device is the one the benchmark recorded, not this machine's.
"""
from __future__ import annotations

import argparse
import json
import sys

IMPL_ORDER = {"eager": 0, "compile": 1, "triton": 2, "cuda": 3}


def _fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def _fmt_num(x: float) -> str:
    # three significant digits, but no exponent for the usual range
    return f"{x:.1f}" if x >= 100 else f"{x:.3g}"


def _fmt_speedup(x: float) -> str:
    return f"{x:.2f}x" if x >= 0.01 else f"{x:.2g}x"


def summarize(data: dict) -> str:
    rows = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        if "op" not in info:
            continue
        rows.append((info, b["stats"]["median"]))
    if not rows:
        return "No bench_kernels results in this file (was it run with --benchmark-enable?).\n"

    devices = sorted({info.get("device", "?") for info, _ in rows})
    mi, ci = data.get("machine_info", {}), data.get("commit_info", {})
    out = [
        "# Fused kernel benchmarks",
        "",
        f"- device: {', '.join(devices)}",
        f"- host CPU: {mi.get('cpu', {}).get('brand_raw', '?')}; python {mi.get('python_version', '?')}",
        f"- run: {data.get('datetime', '?')}; commit {str(ci.get('id', '?'))[:12]}"
        + (" (dirty)" if ci.get("dirty") else ""),
    ]
    sizes = rows[0][0].get("sizes")
    if sizes:
        out.append("- sizes: " + ", ".join(f"{k}={v}" for k, v in sizes.items()))
    if any(info.get("triton_interpret") for info, _ in rows):
        out.append("- Triton ran under TRITON_INTERPRET=1 (CPU interpreter): its times are not kernel times")
    out += [
        "",
        "| op | mode | impl | backend | median | GB/s | of copy | vs eager |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    eager = {(i["op"], i["mode"]): t for i, t in rows if i["impl"] == "eager"}
    rows.sort(key=lambda r: (r[0]["op"], r[0]["mode"], IMPL_ORDER.get(r[0]["impl"], 9)))
    for info, t in rows:
        gbps = info["bytes"] / t / 1e9
        frac = info.get("frac_of_copy")
        base = eager.get((info["op"], info["mode"]))
        out.append(
            f"| {info['op']} | {info['mode']} | {info['impl']} | {info.get('backend', '?')} | "
            f"{_fmt_time(t)} | {_fmt_num(gbps)} | {'' if frac is None else f'{frac:.1%}'} | "
            f"{'' if base is None else _fmt_speedup(base / t)} |"
        )
    out += [
        "",
        "GB/s counts each input read once and each output written once (fwd+bwd: both passes), "
        "so it is a lower bound on traffic; 'of copy' divides by a device-to-device copy of the "
        "same byte count timed in the same run.",
    ]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", help="pytest-benchmark JSON written with --benchmark-json")
    p.add_argument("-o", "--output", help="markdown file to write (default: stdout)")
    args = p.parse_args(argv)
    with open(args.json) as f:
        text = summarize(json.load(f))
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
