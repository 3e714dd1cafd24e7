"""What a run leaves for a person to look at: sample grids, the reward curve, the JSONL log."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch


class RunLog:
    """A script's log: each line printed with a UTC time stamp and, once ``path`` is set, appended
    there too (the world scripts keep theirs beside the weights they made)."""

    def __init__(self, path: str | Path | None = None):
        self.path = path

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())}] {msg}"
        print(line, flush=True)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(line + "\n")


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None,
              captions: list[str] | None = None) -> None:
    """(B, 3, H, W) images in [0, 1] -> one PNG, nrow images per row; with ``captions`` each tile
    has its prompt written under it (small images are enlarged so the text fits)."""
    import math
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    imgs = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    b, _, h, w = imgs.shape
    if captions is not None and len(captions) != b:
        raise ValueError(f"{len(captions)} captions for {b} images")
    scale = max(1, math.ceil(128 / w)) if captions else 1
    h, w = h * scale, w * scale
    font = ImageFont.load_default() if captions else None
    chars = max(8, w // 6)
    lines = [textwrap.wrap(c, chars)[:4] or [""] for c in captions] if captions else [[] for _ in range(b)]
    cap_h = (11 * max(len(x) for x in lines) + 4) if captions else 0
    nrow = nrow or min(b, 8)
    rows = (b + nrow - 1) // nrow
    grid = Image.new("RGB", (nrow * (w + 2) + 2, rows * (h + cap_h + 2) + 2), (0, 0, 0))
    draw = ImageDraw.Draw(grid)
    for i in range(b):
        r, c = divmod(i, nrow)
        x0, y0 = 2 + c * (w + 2), 2 + r * (h + cap_h + 2)
        tile = Image.fromarray(imgs[i].permute(1, 2, 0).numpy())
        grid.paste(tile.resize((w, h), Image.NEAREST) if scale > 1 else tile, (x0, y0))
        for k, line in enumerate(lines[i]):
            draw.text((x0 + 2, y0 + h + 2 + 11 * k), line, fill=(230, 230, 230), font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_reward_curve(log_path: str | Path, png_path: str | Path, window: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_jsonl(log_path) if "reward" in r and not r.get("skipped_step")]
    if not rows:
        return
    steps = np.array([r["step"] for r in rows])
    reward = np.array([r["reward"] for r in rows])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, reward, alpha=0.35, label="reward (per step)")
    if len(reward) >= window:
        smooth = np.convolve(reward, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, label=f"moving mean ({window})")
    ax.set_xlabel("training step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


def write_eval_table(metrics: dict, path: str | Path, what: str) -> None:
    """LeapTrainer.evaluate's metrics as a markdown table (scores, then the judge per kind)."""
    lines = [f"# Evaluation of {what}", "", f"{metrics['n']} prompts, fixed noise.", "",
             "| score | mean |", "|---|---|"]
    for k, v in metrics.items():
        if isinstance(v, float):
            lines.append(f"| {k} | {v:.4f} |")
    if "judge_by_kind" in metrics:
        lines += ["", "| prompt kind | n | judge score | judge accuracy |", "|---|---|---|---|"]
        for kind, row in metrics["judge_by_kind"].items():
            lines.append(f"| {kind} | {row['n']} | {row['score']:.4f} | {row['accuracy']:.4f} |")
    Path(path).write_text("\n".join(lines) + "\n")


def format_summary(summary: dict) -> str:
    """LeapTrainer.train's summary as a few lines: each eval score before -> after (EMA)."""
    after, ema, before = summary.get("eval_after", {}), summary.get("eval_after_ema", {}), summary.get("eval_before")
    lines = [f"{summary['steps']} steps ({summary['skipped']} skipped); eval on {after.get('n', '?')} prompts, "
             f"fixed noise: " + ("before -> after (EMA weights)" if before else "after (EMA weights)")]
    for k, v in after.items():
        if isinstance(v, float):
            was = f"{before[k]:9.4f} -> " if before else ""
            lines.append(f"  {k:<16}{was}{v:9.4f} ({ema.get(k, float('nan')):.4f})")
    lines.append(f"details: {summary['output_dir']}/summary.json")
    return "\n".join(lines)
