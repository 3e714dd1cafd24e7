"""Measure the world reward (engine/world/reward.py) on what it is for; the judge scores nothing
here unless --judge-report asks it to describe the hack check's samples (a report: it selects,
trains and tunes nothing).

On the TEST prompts (held-out colour-shape pairs included), with true renders from the renderer:
  pairs     a true render above a one-edit near miss of the same prompt (same seed), per edit kind
            (colour, shape, count, relation, drop, add): every applicable kind of every test
            prompt, crisp renders, and again after the world VAE's round trip;
  base      a true render above the pretrained world model's sample of the same prompt;
  hack      LeapAlign fine-tuning against this reward with configs/world.yaml (its default budget,
            and 3x its steps); then a true render above the fine-tuned model's sample, per prompt;
  shift     true renders of test prompts against those of training prompts: the difference of the
            means in standard deviations of the training prompts' scores;
and lam, the clip of relu(lam - r), calibrated on real good images as the paper's 0.55 for HPSv2.1:
the median reward of true renders of training prompts after the VAE round trip (what a perfect
generator can show through its decoder).
Writes metrics.json and metrics.md next to the reward's weights (or --out), and a log.

With --collect DIR it also writes the losers of the next reward round (all on TRAINING prompts):
the base model's samples and the samples of the fine-tuned models, as DIR/<name>.pt.

Usage (the shipped report):
  python scripts/measure_world_reward.py --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from engine.report import RunLog  # noqa: E402
from engine.rewards.world import WorldReward  # noqa: E402
from engine.world import caption, parse, render, test_prompts, train_prompts  # noqa: E402
from engine.world.pairs import EDITS, applicable, perturb  # noqa: E402
from engine.world.reward import REWARD_DIR  # noqa: E402

log = RunLog()
TARGETS = {"pair": 0.90, "base": 0.90, "hack": 0.80, "shift": 0.5}


def weights_sha256(reward_dir: str) -> str:
    """Ties a report to the weights it measured (a copied report of other weights fails the tests)."""
    import hashlib

    with open(os.path.join(reward_dir, "model.safetensors"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def subset(pool: list[str], n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [pool[i] for i in sorted(rng.choice(len(pool), min(n, len(pool)), replace=False))]


def renders(prompts: list[str], seeds) -> torch.Tensor:
    return torch.from_numpy(np.stack([render(p, int(s)) for p, s in zip(prompts, seeds)]))


@torch.no_grad()
def score(reward, images: torch.Tensor, prompts: list[str], batch: int = 128) -> torch.Tensor:
    return torch.cat([reward(images[i:i + batch], prompts[i:i + batch]) for i in range(0, len(prompts), batch)])


@torch.no_grad()
def vae_roundtrip(images: torch.Tensor, seed: int = 0, batch: int = 128) -> torch.Tensor:
    from diffusers import AutoencoderKL

    from engine.world.model import WEIGHTS_DIR

    vae = AutoencoderKL.from_pretrained(WEIGHTS_DIR, subfolder="vae", local_files_only=True).eval()
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, images.shape[0], batch):
        z = vae.encode(images[i:i + batch] * 2 - 1).latent_dist.sample(generator=g)
        out.append((vae.decode(z).sample * 0.5 + 0.5).clamp(0, 1))
    return torch.cat(out)


def pair_accuracy(reward, prompts: list[str], seed: int, min_pairs: int = 120) -> dict:
    """Every applicable edit kind of every prompt: true render vs near miss, same seed. Kinds that
    apply to few test prompts (count, add: only the single-group ones) are drawn again, with new
    misses and seeds, until they have ``min_pairs`` pairs."""
    rng = np.random.default_rng(seed)
    per_kind = {k: [p for p in prompts if k in applicable(parse(p))] for k in EDITS}
    rows = []   # (prompt, miss caption, kind, seed)
    for kind, ps in per_kind.items():
        reps = max(1, -(-min_pairs // max(len(ps), 1)))
        for _ in range(reps):
            for p in ps:
                try:
                    miss, _ = perturb(parse(p), rng, kinds=[kind])
                except RuntimeError:
                    continue
                rows.append((p, caption(miss), kind, int(rng.integers(2**31))))
    true_p = [r[0] for r in rows]
    seeds = [r[3] for r in rows]
    good = renders(true_p, seeds)
    bad = renders([r[1] for r in rows], seeds)
    out = {}
    for name, (g, b) in {"crisp": (good, bad), "vae": (vae_roundtrip(good, 1), vae_roundtrip(bad, 2))}.items():
        win = (score(reward, g, true_p) > score(reward, b, true_p)).numpy()
        kinds = np.array([r[2] for r in rows])
        out[name] = {k: {"acc": float(win[kinds == k].mean()), "n": int((kinds == k).sum()),
                         "prompts": len(per_kind[k])} for k in EDITS if (kinds == k).any()}
    return out


class Sampler:
    """The world model (pretrained, or a trainer's current weights) sampling prompts from fixed
    noise, 25 steps, as the trainer's evaluation does."""

    def __init__(self, trainer=None):
        if trainer is None:
            from engine.world.model import load_world_flux
            from engine.world.text import MiniLMTextEncoder

            self.flux, self.enc = load_world_flux(), MiniLMTextEncoder(max_length=16)
        self.trainer = trainer

    @torch.no_grad()
    def __call__(self, prompts: list[str], seed: int = 1234, batch: int = 64) -> torch.Tensor:
        out = []
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            if self.trainer is not None:
                img, _ = self.trainer.sample(chunk, seed=seed + i)
            else:
                from engine.schedule import flux_sigmas

                pe, pooled = self.enc.encode(chunk)
                cond = self.flux.condition(pe, pooled, 64, 64)
                x = self.flux.noise(len(chunk), 64, 64, generator=torch.Generator().manual_seed(seed + i))
                x0 = self.flux.rollout(x, flux_sigmas(25, self.flux.image_seq_len(64, 64)), cond)
                img = self.flux.decode(x0, 64, 64)
            out.append(img.float().cpu())
        return torch.cat(out)


def judge_report(sample_scores: torch.Tensor, samples: torch.Tensor, prompts: list[str],
                 true_scores: torch.Tensor) -> dict:
    """The world judge's verdicts on the fine-tuned samples, split by whether the reward put the
    sample at or above its prompt's true render: tells a reward fooled by wrong images from a
    model that draws the prompt right (a sample may then fairly match a true render)."""
    from engine.world.judge import judge

    won = (sample_scores >= true_scores).numpy()
    res = judge(samples, prompts)
    part = lambda sel: {"n": int(sel.sum()), "judge_correct": float(res.correct[sel].mean()) if sel.any() else None,  # noqa: E731
                        "judge_score": float(res.score[sel].mean()) if sel.any() else None}
    return {"at_or_above_true": part(won), "below_true": part(~won),
            "wrong_at_or_above_true": float((won & ~res.correct).mean())}


def versus(s: torch.Tensor, true_scores: torch.Tensor) -> dict:
    """Reward of samples ``s`` against the true renders' of the same prompts."""
    return {"true_above_sample": float((true_scores > s).float().mean()), "sample_mean": float(s.mean()),
            "true_mean": float(true_scores.mean())}


def finetune(reward_dir: str, steps_factor: int, out_dir: str, lam: float | None, reuse: str = "",
             overrides: tuple[str, ...] = ()):
    """LeapAlign on configs/world.yaml (plus ``overrides``) against this reward (judge off),
    steps_factor x its steps;
    with ``reuse``, the finished run of that checkpoint instead (e.g. the default job's, made with
    this reward: ``python -m engine train --config configs/world.yaml``)."""
    from engine.config import load_config
    from engine.trainer import LeapTrainer

    if reuse:
        cfg = LeapTrainer.config_from_checkpoint(reuse)
        trainer = LeapTrainer(cfg, reward=WorldReward(reward_dir))
        trainer.load_checkpoint(reuse)
        log(f"reused {reuse}: {trainer.step_count} steps (lam {cfg.method.lam}, "
            f"reward {cfg.reward.name})")
        return trainer, trainer.step_count

    cfg = load_config(os.path.join(ROOT, "configs", "world.yaml"), list(overrides))
    cfg.steps = cfg.steps * steps_factor
    cfg.judge = False
    cfg.output_dir = out_dir
    if lam is not None:
        cfg.method.lam = float(lam)
    trainer = LeapTrainer(cfg, reward=WorldReward(reward_dir))
    t0 = time.time()
    summary = trainer.train()
    log(f"fine-tuned {cfg.steps} steps (lam {cfg.method.lam}) in {time.time() - t0:.0f}s: "
        f"eval reward {summary['eval_reward_before']:.3f} -> {summary['eval_reward_after']:.3f}")
    return trainer, cfg.steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reward", default=REWARD_DIR)
    ap.add_argument("--out", default="", help="report folder (default: the reward's folder)")
    ap.add_argument("--n-test", type=int, default=192, help="test prompts for the sample-based checks")
    ap.add_argument("--n-train", type=int, default=256)
    ap.add_argument("--hack", default="1,3", help="fine-tuning budgets (x configs/world.yaml's steps); '' skips")
    ap.add_argument("--lam", type=float, default=None, help="lam for the fine-tuning runs (default: the calibrated one)")
    ap.add_argument("--reuse", default="", help="the 1x run: this checkpoint instead of a new run")
    ap.add_argument("--reuse-runs", action="store_true",
                    help="reuse the finished fine-tuning runs in runs/reward_hack_<f>x (from an earlier call)")
    ap.add_argument("--judge-report", action="store_true",
                    help="describe the hack check's samples with the world judge (reported, never used)")
    ap.add_argument("--collect", default="", help="write next-round losers (training prompts) here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    out = args.out or args.reward
    os.makedirs(out, exist_ok=True)
    log.path = os.path.join(out, "metrics_log.txt")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    log(f"=== measure_world_reward.py {' '.join(sys.argv[1:])}")
    reward = WorldReward(args.reward).eval()
    test, train = test_prompts(), train_prompts()
    m: dict = {"reward": os.path.relpath(args.reward, ROOT), "targets": TARGETS, "judge_report": args.judge_report,
               "command": " ".join(["python scripts/measure_world_reward.py", *sys.argv[1:]]),
               "weights_sha256": weights_sha256(args.reward)}

    t0 = time.time()
    m["pairs_test"] = pair_accuracy(reward, test, args.seed)
    log(f"pair accuracy on all {len(test)} test prompts ({time.time() - t0:.0f}s): {m['pairs_test']}")

    test_s, train_s = subset(test, args.n_test, args.seed), subset(train, args.n_train, args.seed + 1)
    seeds_te = list(range(10_000, 10_000 + len(test_s)))
    seeds_tr = list(range(20_000, 20_000 + len(train_s)))
    true_te, true_tr = renders(test_s, seeds_te), renders(train_s, seeds_tr)
    r_te, r_tr = score(reward, true_te, test_s), score(reward, true_tr, train_s)
    r_te_v, r_tr_v = score(reward, vae_roundtrip(true_te, 3), test_s), score(reward, vae_roundtrip(true_tr, 4), train_s)
    sd = float(r_tr.std())
    m["shift"] = {"train_mean": float(r_tr.mean()), "train_std": sd, "test_mean": float(r_te.mean()),
                  "test_std": float(r_te.std()), "diff_in_train_sd": float((r_te.mean() - r_tr.mean()) / max(sd, 1e-8)),
                  "vae_train_mean": float(r_tr_v.mean()), "vae_test_mean": float(r_te_v.mean()),
                  "vae_diff_in_train_sd": float((r_te_v.mean() - r_tr_v.mean()) / max(float(r_tr_v.std()), 1e-8))}
    m["lam"] = {"median_true_render_train_vae": float(r_tr_v.median()), "median_true_render_train_crisp": float(r_tr.median()),
                "q10_true_render_train_vae": float(r_tr_v.quantile(0.1))}
    lam = round(m["lam"]["median_true_render_train_vae"], 3)
    m["lam"]["chosen"] = lam
    log(f"shift {m['shift']}; lam {m['lam']}")

    t0 = time.time()
    base = Sampler()
    base_te = base(test_s)
    m["base"] = versus(score(reward, base_te, test_s), r_te)
    log(f"base samples of {len(test_s)} test prompts ({time.time() - t0:.0f}s): {m['base']}")
    if args.collect:
        os.makedirs(args.collect, exist_ok=True)
        neg_p = subset(train, 512, args.seed + 7)
        imgs = base(neg_p, seed=777)
        torch.save({"images": (imgs * 255).round().to(torch.uint8), "prompts": neg_p, "source": "base model"},
                   os.path.join(args.collect, "base.pt"))
    del base

    m["hack"] = {}
    for f in [int(x) for x in args.hack.split(",") if x.strip()]:
        run = os.path.join(ROOT, "runs", f"reward_hack_{f}x")
        done = os.path.join(run, "checkpoint.safetensors")
        reuse = args.reuse if f == 1 and args.reuse else done if args.reuse_runs and os.path.exists(done) else ""
        trainer, steps = finetune(args.reward, f, run, args.lam if args.lam is not None else lam, reuse)
        samp = Sampler(trainer)
        ft = samp(test_s)
        s_ft = score(reward, ft, test_s)
        m["hack"][f"{f}x"] = {"steps": steps, **versus(s_ft, r_te)}
        if args.judge_report:
            m["hack"][f"{f}x"]["judge"] = judge_report(s_ft, ft, test_s, r_te)
        log(f"hack check {f}x ({steps} steps): {m['hack'][f'{f}x']}")
        if args.collect:
            neg_p = subset(train, 512, args.seed + 10 + f)
            imgs = samp(neg_p, seed=888 + f)
            torch.save({"images": (imgs * 255).round().to(torch.uint8), "prompts": neg_p,
                        "source": f"LeapAlign {steps} steps against {m['reward']}"},
                       os.path.join(args.collect, f"finetune_{f}x.pt"))
        del trainer, samp

    with open(os.path.join(out, "metrics.json"), "w") as fh:
        json.dump(m, fh, indent=2)
    write_md(m, os.path.join(out, "metrics.md"))
    log(f"wrote {os.path.join(out, 'metrics.md')}")


def write_md(m: dict, path: str) -> None:
    ok = lambda good: "yes" if good else "**no**"   # noqa: E731
    L = ["# World reward: measured on the test prompts", "",
         f"Made by `{m['command']}` "
         f"for `{m['reward']}`; the judge selects, trains and tunes nothing"
         f"{' (it only describes the hack check samples, below)' if m.get('judge_report') else ''}. Targets in brackets.", "",
         "## True render above a one-edit near miss (same prompt, same seed) [>= 0.90 per kind]", "",
         "| edit | test prompts | pairs | crisp | after VAE round trip | target met (crisp) |",
         "|---|---|---|---|---|---|"]
    for k, v in m["pairs_test"]["crisp"].items():
        L.append(f"| {k} | {v['prompts']} | {v['n']} | {v['acc']:.3f} | {m['pairs_test']['vae'][k]['acc']:.3f} | {ok(v['acc'] >= 0.9)} |")
    b = m["base"]
    L += ["", "## True render above the base model's sample [>= 0.90]", "",
          f"{b['true_above_sample']:.3f} of the prompts ({ok(b['true_above_sample'] >= 0.9)}); mean reward "
          f"true {b['true_mean']:.3f}, base sample {b['sample_mean']:.3f}", "",
          "## Hack check: true render above the fine-tuned model's sample [>= 0.80]", "",
          "| LeapAlign run | steps | true above sample | sample mean reward | met |", "|---|---|---|---|---|"]
    for k, v in m["hack"].items():
        L.append(f"| {k} configs/world.yaml's budget | {v['steps']} | {v['true_above_sample']:.3f} | "
                 f"{v['sample_mean']:.3f} | {ok(v['true_above_sample'] >= 0.8)} |")
    judged = {k: v["judge"] for k, v in m["hack"].items() if "judge" in v}
    if judged:
        L += ["", "The judge's view of those samples (`--judge-report`: a description, it selects nothing): "
              "a sample the reward puts at or above its true render may be a right image, not an exploit.", "",
              "| run | samples at/above the true render | of them judged fully right | their judge score | "
              "samples below | judged fully right | wrong and at/above the true render |", "|---|---|---|---|---|---|---|"]
        f3 = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        for k, j in judged.items():
            a, b2 = j["at_or_above_true"], j["below_true"]
            L.append(f"| {k} | {a['n']} | {f3(a['judge_correct'])} | {f3(a['judge_score'])} | {b2['n']} | "
                     f"{f3(b2['judge_correct'])} | {j['wrong_at_or_above_true']:.3f} |")
    s = m["shift"]
    L += ["", "## Train / test shift of true renders [|diff| <= 0.5 sd]", "",
          f"train {s['train_mean']:.3f} ± {s['train_std']:.3f}, test {s['test_mean']:.3f} ± {s['test_std']:.3f}: "
          f"{s['diff_in_train_sd']:+.2f} sd ({ok(abs(s['diff_in_train_sd']) <= 0.5)}); after the VAE round trip "
          f"{s['vae_train_mean']:.3f} vs {s['vae_test_mean']:.3f} ({s['vae_diff_in_train_sd']:+.2f} sd)", "",
          "## lam (the clip of relu(lam - r))", "",
          f"median reward of true renders of training prompts after the VAE round trip: "
          f"**{m['lam']['chosen']}** (crisp: {m['lam']['median_true_render_train_crisp']:.3f}; 10th percentile "
          f"after the VAE: {m['lam']['q10_true_render_train_vae']:.3f})", ""]
    with open(path, "w") as fh:
        fh.write("\n".join(L))


if __name__ == "__main__":
    main()
