"""Sampling and scoring a model, shared by the trainer's evaluations and ``python -m engine``
``sample`` / ``eval`` (which load weights into a plain model, no trainer)."""
from __future__ import annotations

import contextlib

import torch

from engine.schedule import flux_sigmas


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


@torch.no_grad()
def generate(adapter, condition, prompts: list[str], height: int, width: int, num_steps: int,
             seed: int = 1234) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] from fixed noise (``seed``), ``num_steps`` Euler steps;
    ``condition(prompts)`` gives the model's conditioning."""
    device = adapter.device
    x = adapter.noise(len(prompts), height, width, generator=torch.Generator().manual_seed(seed), device=device)
    t = adapter.transformer
    was_training = t.training
    t.eval()
    try:
        with autocast(device):
            x0 = adapter.rollout(x, flux_sigmas(num_steps, adapter.image_seq_len(height, width)), condition(prompts))
            return adapter.decode(x0.float(), height, width).float()
    finally:
        t.train(was_training)


@torch.no_grad()
def evaluate(adapter, condition, scorers: dict, prompts: list[str], height: int, width: int, num_steps: int,
             seed: int = 1234, judge: bool = False, batch: int = 64) -> tuple[dict, torch.Tensor]:
    """Sample ``prompts`` (chunk i from noise seed + i) and score them with every scorer
    (name -> reward) and, with ``judge``, the world's judge -> (metrics, images on the CPU)."""
    scores = {k: [] for k in scorers}
    images = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        img = generate(adapter, condition, chunk, height, width, num_steps, seed + i)
        with autocast(img.device):
            for k, fn in scorers.items():
                scores[k].append(fn(img, chunk).float().cpu())
        images.append(img.cpu())
    images = torch.cat(images)
    metrics = {k: float(torch.cat(v).mean()) for k, v in scores.items()}
    if judge:
        from engine.world.judge import by_kind, judge as run_judge

        res = run_judge(images, prompts)
        metrics.update(judge=res.mean(), judge_accuracy=res.accuracy(), judge_by_kind=by_kind(res, prompts))
    metrics.update(n=len(prompts), num_steps=num_steps)
    return metrics, images


def captions(images: torch.Tensor, prompts: list[str], judge: bool = False) -> list[str]:
    """Sample-grid captions: each prompt and, with ``judge``, how many of its clauses the image
    satisfies, so that grids (before / after a run) can be compared tile by tile."""
    if not judge:
        return list(prompts)
    from engine.world.judge import judge as run_judge

    res = run_judge(images[: len(prompts)], list(prompts))
    return [f"{p} [{sum(c.values())}/{len(c)}]" for p, c in zip(prompts, res.clauses)]


def text_condition(adapter, text_encoder, height: int, width: int):
    """``condition(prompts)`` for a plain text encoder (no caching)."""
    def condition(prompts):
        pe, pooled = text_encoder.encode(list(prompts))
        return adapter.condition(pe, pooled, height, width)

    return condition
