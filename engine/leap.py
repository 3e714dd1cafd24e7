"""The LeapAlign estimator (method.md): one rollout, two graph-keeping passes, two leaps.

The estimator only needs a velocity callable ``v(x, sigma)`` and a reward callable
``r(x0) -> (B,)`` on final latents, so it runs on Flux through ``engine.flux`` and on tiny
analytic models in the tests alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from engine.params import DEFAULT_LAM
from engine.schedule import check_step_pair, euler_step
from kernels.leap_connect import leap_connect  # leap + connector + alpha discount + L1 distance, fused

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Reward = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EstimatorOutput:
    """What one estimator call returns: the loss to backpropagate and per-sample metrics."""

    loss: torch.Tensor            # scalar, carries the graph
    reward: torch.Tensor          # (B,) detached
    x0: torch.Tensor              # (B, ...) final rollout latents, detached
    metrics: dict                 # scalars / small tensors, all detached
    model_calls: int


def check_hparams(alpha: float, tau: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got alpha={alpha}")
    if not tau > 0.0:
        raise ValueError(f"tau must be > 0 (it bounds the consistency weight), got tau={tau}")


def check_sigmas(sigmas: torch.Tensor) -> int:
    """Validate a schedule (T+1 values from ~1 down to 0) and return T."""
    if sigmas.dim() != 1 or sigmas.numel() < 3:
        raise ValueError(f"sigmas must be 1-D with T+1 >= 3 values, got shape {tuple(sigmas.shape)}")
    if sigmas[-1].item() != 0.0:
        raise ValueError(f"sigmas must end in 0, got {sigmas[-1].item()}")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError("sigmas must be strictly decreasing")
    return sigmas.numel() - 1


def reward_loss(reward: torch.Tensor, lam: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """mean_b relu(lambda - r_b) * w_b, with w detached (method.md step 7)."""
    per = torch.relu(lam - reward)
    if weight is not None:
        per = per * weight.detach().to(per.dtype)
    return per.mean()


def leapalign(
    velocity: Velocity,
    reward: Reward,
    x1: torch.Tensor,
    sigmas: torch.Tensor,
    k: int,
    j: int,
    alpha: float = 0.3,
    lam: float = DEFAULT_LAM,
    tau: float = 0.1,
    weighting: bool = True,
) -> EstimatorOutput:
    """One LeapAlign loss on a batch of initial noises ``x1``.

    ``sigmas`` (T+1 values, last 0) live on the CPU; the scalars the leaps need are read from it
    up front, so the rollout loop never waits on the device. Exactly T model calls are made;
    only those at steps k and j keep their graphs.
    """
    T = check_sigmas(sigmas)
    check_step_pair(k, j, T)
    check_hparams(alpha, tau)
    s = sigmas.tolist()
    sig_dev = sigmas.to(x1.device)
    c_kj, c_j0 = s[k] - s[j], s[j]

    x = x1.detach()
    x_k = v_k = conn_j = v_j = d_j = None
    for i in range(T):
        if i == k:
            x_k = x
            v_k = velocity(x, sig_dev[i])
            v = v_k.detach()
        elif i == j:
            # x is the real x_j; leap 1 lands on xhat_j = x_k - (k - j) v_k. The model sees the
            # real value with an alpha-scaled gradient path back into leap 1 (the nested term).
            conn_j, inp_j, d_j = leap_connect(x_k, v_k, x, c_kj, alpha)
            v_j = velocity(inp_j, sig_dev[i])
            v = v_j.detach()
        else:
            with torch.no_grad():
                v = velocity(x, sig_dev[i])
        x = euler_step(x, v, sig_dev[i], sig_dev[i + 1])

    x0 = x
    # Leap 2 from the connected x_j' (full-weight identity path), landing on the real x_0.
    conn_0, _, d_0 = leap_connect(conn_j, v_j, x0, c_j0, 1.0)
    r = reward(conn_0)
    if r.shape != (x1.shape[0],):
        raise ValueError(f"reward must return one score per sample, shape ({x1.shape[0]},), got {tuple(r.shape)}")
    weight = 1.0 / (d_j.clamp_min(tau) + d_0.clamp_min(tau)) if weighting else torch.ones_like(d_j)
    loss = reward_loss(r, lam, weight)
    return EstimatorOutput(
        loss=loss,
        reward=r.detach(),
        x0=x0.detach(),
        metrics={"d_j": d_j, "d_0": d_0, "weight": weight.detach(), "k": k, "j": j,
                 "sigma_k": s[k], "sigma_j": s[j]},
        model_calls=T,
    )
