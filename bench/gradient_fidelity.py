"""How close each method's gradient is to the true one, apart from what the reward is worth.

On the shipped world model and configs/world.yaml (its reward, lam, T), for fixed batches of
training prompts and noise: the gradient of relu(lam - r(x_0)) through the whole trajectory
(full backprop: the gradient every estimator stands in for) against each method's estimate from
the same batch, as cosine similarity over all trainable parameters:
  - per draw: one estimate (one k, j pair / stop step / re-noising), bias and variance together,
    what one update sees;
  - of the mean of the draws: mostly what is left of the bias.
ReFL, DRTune and DRaFT-LV are biased by design (they score a one-step prediction, stop
gradients or re-noise); LeapAlign's consistency weighting reweights samples on purpose, so its
"no weighting" variant is listed too. The judge plays no part: this measures the estimators, the
study measures whether climbing the reward helps.

  python bench/gradient_fidelity.py --out bench/results/study            # 8 batches x 4 draws
  python bench/gradient_fidelity.py --out bench/results/study --checkpoint runs/world/checkpoint.safetensors \
      --name gradient_fidelity_trained                                     # after the default job

`--expected` asks the question training actually faces: an update follows one batch's estimate
(or, through Adam's momentum, a mean over a few batches), while climbing the reward needs the
*expected* gradient over prompts and noise. Each estimator's mean over m batches is compared with
the mean full-backprop gradient of the other batches (an independent estimate of the expected
gradient), m = 1, 2, 4, 8: where batch-to-batch noise swamps the estimators' bias, the better
estimate of one batch's gradient buys little.
  python bench/gradient_fidelity.py --expected --batches 48 --checkpoint runs/world_gf/checkpoint.safetensors \
      --name gradient_vs_expected_trained
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from study import RUNS  # noqa: E402  (bench/: the study's run names and their method parameters)

ESTIMATORS = {n: RUNS[n][:2] for n in ("refl", "draft-lv", "drtune", "leapalign", "leapalign alpha=0",
                                       "leapalign alpha=1", "leapalign no weighting")}


def _grad(tr, method, cond, prompts, x1, generator) -> tuple:
    import torch

    for p in tr.params.values():
        p.grad = None
    choices = method.draw(tr.cfg.num_steps, generator, x1)
    with tr.autocast():
        out = method.loss(tr._train_adapter.velocity_fn(cond), tr.reward_fn(prompts), x1, tr.sigmas, **choices)
    out.loss.backward()
    g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double()
                   for p in tr.params.values()])
    return g, float(out.loss.detach())


def _cos(a, b) -> float:
    import torch

    n = float(a.norm() * b.norm())
    return float(torch.dot(a, b)) / n if n > 0 else float("nan")


def _stat(v: list) -> dict:
    """Mean and standard deviation of cosines; NaN (a zero gradient) left out of both."""
    return {"mean": float(np.nanmean(v)), "std": float(np.nanstd(v, ddof=1)) if len(v) > 1 else 0.0, "values": v}


def _setup(names, overrides, work, checkpoint) -> tuple:
    """The trainer on configs/world.yaml (at ``checkpoint``'s raw weights, the ones training takes
    gradients of), the named estimators and full backprop, all with the config's lam."""
    from engine.config import load_config
    from engine.methods import make_method
    from engine.trainer import LeapTrainer

    work = work or ROOT / "runs" / "gradient_fidelity"
    cfg = load_config(ROOT / "configs" / "world.yaml", [f"output_dir={work}", *overrides])
    tr = LeapTrainer(cfg)
    if checkpoint:
        tr.load_checkpoint(checkpoint)
    methods = {n: make_method(ESTIMATORS[n][0], lam=cfg.method.lam, **ESTIMATORS[n][1]) for n in names}
    return tr, methods, make_method("full", lam=cfg.method.lam)


def _batch(tr, gen) -> tuple:
    """One training batch: prompts drawn with replacement, their initial noise and conditioning."""
    import torch

    cfg = tr.cfg
    idx = torch.randint(len(tr.prompts), (cfg.batch_size,), generator=gen).tolist()
    prompts = [tr.prompts[i] for i in idx]
    x1 = tr.adapter.noise(cfg.batch_size, cfg.model.height, cfg.model.width, generator=gen, device=tr.device)
    return prompts, x1, tr.condition(prompts)


def measure(batches: int = 8, draws: int = 4, seed: int = 0, names: list[str] | None = None,
            overrides: list[str] = (), work: Path | None = None, checkpoint: str | None = None) -> dict:
    import torch

    names = list(ESTIMATORS) if names is None else names
    tr, methods, full = _setup(names, overrides, work, checkpoint)
    cfg = tr.cfg
    per_draw = {n: [] for n in names}
    of_mean = {n: [] for n in names}
    skipped = 0
    gen = torch.Generator().manual_seed(seed)
    for b in range(batches):
        prompts, x1, cond = _batch(tr, gen)
        g_full, loss = _grad(tr, full, cond, prompts, x1, gen)
        if loss == 0:   # every sample past lam: no gradient to compare with
            skipped += 1
            continue
        for n, m in methods.items():
            mg = torch.Generator().manual_seed(seed * 1000 + b)
            gs = [_grad(tr, m, cond, prompts, x1, mg)[0] for _ in range(draws)]
            per_draw[n] += [_cos(g, g_full) for g in gs]
            of_mean[n].append(_cos(torch.stack(gs).mean(0), g_full))
    for p in tr.params.values():
        p.grad = None
    return {"batches": batches - skipped, "draws": draws, "seed": seed, "lam": cfg.method.lam, "checkpoint": checkpoint,
            "num_steps": cfg.num_steps, "batch_size": cfg.batch_size,
            "per_draw": {n: _stat(v) for n, v in per_draw.items()},
            "of_mean": {n: _stat(v) for n, v in of_mean.items()}}


EXPECTED = ("refl", "draft-lv", "drtune", "leapalign")


def measure_expected(batches: int = 48, seed: int = 0, names: tuple = EXPECTED, groups: tuple = (1, 2, 4, 8),
                     overrides: list[str] = (), work: Path | None = None, checkpoint: str | None = None) -> dict:
    import torch

    if batches < 2 * max(groups):
        raise ValueError(f"--batches {batches} must be at least twice the largest group ({max(groups)})")
    tr, methods, full = _setup(names, overrides, work, checkpoint)
    cfg = tr.cfg
    # float32 rows keep 48 batches x 5 gradients of ~1M parameters near 1 GB; dots are taken in float64
    grads = {n: [] for n in ("full", *names)}
    zero_loss = 0
    gen = torch.Generator().manual_seed(seed)
    for b in range(batches):
        prompts, x1, cond = _batch(tr, gen)
        g_full, loss = _grad(tr, full, cond, prompts, x1, gen)
        zero_loss += loss == 0   # every sample past lam: a zero gradient, still part of the expectation
        grads["full"].append(g_full.float())
        mg = torch.Generator().manual_seed(seed * 1000 + b)
        for n, m in methods.items():
            grads[n].append(_grad(tr, m, cond, prompts, x1, mg)[0].float())   # one draw: what one update sees
    for p in tr.params.values():
        p.grad = None
    stacked = {n: torch.stack(v) for n, v in grads.items()}
    total = stacked["full"].double().sum(0)
    res = {}
    for m in groups:
        row = {n: [] for n in stacked}
        for g0 in range(0, batches - m + 1, m):
            ref = (total - stacked["full"][g0:g0 + m].double().sum(0)) / (batches - m)
            for n, v in stacked.items():
                row[n].append(_cos(v[g0:g0 + m].double().mean(0), ref))
        res[m] = row
    half = batches // 2
    split = _cos(stacked["full"][:half].double().mean(0), stacked["full"][half:2 * half].double().mean(0))
    return {"batches": batches, "seed": seed, "lam": cfg.method.lam, "checkpoint": checkpoint,
            "num_steps": cfg.num_steps, "batch_size": cfg.batch_size, "zero_loss_batches": int(zero_loss),
            "halves_cosine": split,
            "groups": {str(m): {n: _stat(v) for n, v in row.items()} for m, row in res.items()}}


def table_expected(res: dict) -> str:
    at = f"the checkpoint {res['checkpoint']}" if res.get("checkpoint") else "the shipped world model"
    ms = list(res["groups"])
    names = list(res["groups"][ms[0]])
    lines = [f"At {at}: cosine similarity of each estimator's gradient of relu(lam - r(x_0)) (lam {res['lam']}), "
             f"one draw per batch and averaged over m batches of {res['batch_size']} training prompts (T = "
             f"{res['num_steps']}), with the mean full-backprop gradient of the other {res['batches']} - m batches "
             "(an independent estimate of the expected gradient); mean +- standard deviation over the disjoint groups. "
             f"\"full\" is one batch's exact gradient (an estimator with less batch-to-batch variance can come closer to the "
             f"expectation than it). The full-backprop means "
             f"of two disjoint halves ({res['batches'] // 2} batches each) agree to cosine {res['halves_cosine']:.3f}; "
             f"{res['zero_loss_batches']} batch(es) had every sample past lam.", "",
             "| estimator | " + " | ".join(f"m = {m}" for m in ms) + " |", "|---|" + "---|" * len(ms)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{res['groups'][m][n]['mean']:.3f} ± {res['groups'][m][n]['std']:.3f}"
                                              for m in ms) + " |")
    if "leapalign" in names:
        lines += ["", "LeapAlign's cosine minus each other estimator's, paired over the same groups (± standard error):", "",
                  "| against | " + " | ".join(f"m = {m}" for m in ms) + " |", "|---|" + "---|" * len(ms)]
        for n in names:
            if n == "leapalign":
                continue
            cells = []
            for m in ms:
                d = (np.asarray(res["groups"][m]["leapalign"]["values"], dtype=float)
                     - np.asarray(res["groups"][m][n]["values"], dtype=float))
                d = d[~np.isnan(d)]
                se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
                cells.append(f"{d.mean():+.3f} ± {se:.3f}")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table(res: dict) -> str:
    at = f"the checkpoint {res['checkpoint']}" if res.get("checkpoint") else "the shipped world model"
    lines = [f"At {at}: cosine similarity with the full-backprop gradient of relu(lam - r(x_0)) (lam {res['lam']}), "
             f"{res['batches']} batches of {res['batch_size']} training prompts, T = {res['num_steps']}, "
             f"{res['draws']} draws each; mean +- standard deviation over batches (per draw: over every draw):", "",
             "| estimator | per draw | mean of the draws | LeapAlign's mean of the draws minus this one, "
             "paired over batches (± standard error) | batches where LeapAlign's is closer |", "|---|---|---|---|---|"]
    la = np.asarray(res["of_mean"].get("leapalign", {}).get("values", []), dtype=float)
    for n in res["per_draw"]:
        a, b = res["per_draw"][n], res["of_mean"][n]
        paired = ["", ""]
        if len(la) > 1 and n != "leapalign":
            d = la - np.asarray(b["values"], dtype=float)
            paired = [f"{d.mean():+.3f} ± {d.std(ddof=1) / np.sqrt(len(d)):.3f}", f"{int((d > 0).sum())} of {len(d)}"]
        lines.append(f"| {n} | {a['mean']:.3f} ± {a['std']:.3f} | {b['mean']:.3f} ± {b['std']:.3f} | "
                     + " | ".join(paired) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "study"))
    ap.add_argument("--batches", type=int, default=None, help="default 8; 48 with --expected")
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--checkpoint", default=None, help="a training checkpoint to measure at (default: the start)")
    ap.add_argument("--name", default="gradient_fidelity", help="output file stem in --out")
    ap.add_argument("--expected", action="store_true",
                    help="compare with the expected gradient (other batches' mean) instead of the same batch's")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)   # black backgrounds: denormal activations are slow on CPU
    out = Path(args.out)
    t0 = time.time()
    if args.expected:
        res = measure_expected(args.batches or 48, args.seed, work=out / "work" / args.name, checkpoint=args.checkpoint)
        render = table_expected
    else:
        res = measure(args.batches or 8, args.draws, args.seed, work=out / "work" / args.name, checkpoint=args.checkpoint)
        render = table
    res["wall_s"] = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(res, indent=2))
    (out / f"{args.name}.md").write_text(render(res))
    print(render(res), flush=True)


if __name__ == "__main__":
    main()
