"""The embedded default: LeapTrainer on the shipped world model with the learned reward and the judge."""
import json

import torch

from engine.__main__ import main as cli
from engine.config import load_config
from engine.trainer import LeapTrainer

FAST = ["steps=2", "batch_size=2", "num_steps=4", "eval_size=6", "samples=4"]


def test_world_config_trains_and_reports_reward_and_judge(tmp_path):
    cfg = load_config("configs/world.yaml", FAST + [f"output_dir={tmp_path}"])
    tr = LeapTrainer(cfg)
    assert tr.prompts and tr.test_prompts and not set(tr.prompts) & set(tr.test_prompts)
    assert all(p in tr.test_prompts for p in tr.eval_set)
    before = {n: p.detach().clone() for n, p in tr.params.items()}
    summary = tr.train()
    assert summary["steps"] == 2 and summary["skipped"] == 0
    for key in ("eval_before", "eval_after", "eval_after_ema"):
        ev = summary[key]
        assert ev["n"] == 6 and 0.0 <= ev["judge"] <= 1.0 and 0.0 <= ev["judge_accuracy"] <= 1.0
        assert "overall" in ev["judge_by_kind"]
    assert any(not torch.equal(before[n], p) for n, p in tr.params.items())
    for name in ("samples_before.png", "samples_after.png", "reward_curve.png", "summary.json"):
        assert (tmp_path / name).is_file()
    # the grids' captions count the judge's satisfied clauses per tile: all of a true render's,
    # not all of a black image's
    from engine.generate import captions
    from engine.world import render_batch

    ps = tr.eval_set[:4]
    assert captions(torch.zeros(4, 3, 64, 64), ps) == ps

    def counts(caps):
        assert [c.rsplit(" [", 1)[0] for c in caps] == ps
        return [tuple(int(x) for x in c.rsplit("[", 1)[1].rstrip("]").split("/")) for c in caps]

    assert all(k == n > 0 for k, n in counts(captions(render_batch(ps, range(4)), ps, judge=True)))
    assert all(k < n for k, n in counts(captions(torch.zeros(4, 3, 64, 64), ps, judge=True)))


def test_evaluate_is_repeatable_and_eval_cli_writes_its_table(tmp_path):
    cfg = load_config("configs/world.yaml", FAST + [f"output_dir={tmp_path / 'run'}"])
    tr = LeapTrainer(cfg)
    a, img_a = tr.evaluate(["a red circle", "two blue squares"])
    b, img_b = tr.evaluate(["a red circle", "two blue squares"])
    assert a == b and torch.equal(img_a, img_b)
    tr.train()
    out = tmp_path / "eval"
    assert cli(["eval", "--checkpoint", str(tmp_path / "run" / "checkpoint.safetensors"), "--n", "4",
                "--out", str(out)]) == 0
    res = json.loads((out / "eval.json").read_text())
    assert res["n"] == 4 and "judge" in res and "EMA" in res["source"]
    assert (out / "eval.md").read_text().startswith("# Evaluation of")
    assert (out / "eval_grid.png").is_file()
