"""LeapAlign and the baselines it is compared with, behind one interface.

Every method is a small dataclass holding its hyper-parameters, with
``draw(T, generator, x1)`` for its random choices (so they are reproducible and testable) and
``loss(velocity, reward, x1, sigmas, **choices)`` returning an ``EstimatorOutput``.
All share the rollout convention (fp32 latents, Euler over Flux sigmas) and the reward loss
relu(lambda - r).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch.utils.checkpoint import checkpoint

from engine.leap import EstimatorOutput, Reward, Velocity, check_sigmas, leapalign, reward_loss
from engine.params import (DEFAULT_LAM, METHOD_PARAMS, DRaFTLVParams, DRTuneParams, FullParams, LeapAlignParams,
                           ReFLParams, method_params, method_section)
from engine.schedule import euler_step, sample_step_pair


def _check_lam(lam: float) -> None:
    if not torch.isfinite(torch.tensor(lam)):
        raise ValueError(f"lambda must be finite, got {lam}")


def _last_steps(T: int, m: int, generator: torch.Generator) -> int:
    """A step index drawn uniformly from the last m of T steps."""
    if not 1 <= m <= T:
        raise ValueError(f"the stop window must satisfy 1 <= m <= T, got m={m}, T={T}")
    return T - 1 - int(torch.randint(m, (1,), generator=generator))


def _check_reward(r: torch.Tensor, batch: int) -> torch.Tensor:
    if r.shape != (batch,):
        raise ValueError(f"reward must return one score per sample, shape ({batch},), got {tuple(r.shape)}")
    return r


@dataclass
class LeapAlign(LeapAlignParams):
    lam: float = DEFAULT_LAM

    def draw(self, T: int, generator: torch.Generator, x1: torch.Tensor) -> dict:
        if self.pair_window:
            if not 2 <= self.pair_window <= T:
                raise ValueError(f"pair_window must be 0 or in [2, T={T}], got {self.pair_window}")
            k, j = sample_step_pair(self.pair_window, generator)
            off = T - self.pair_window
            return {"k": k + off, "j": j + off}
        k, j = sample_step_pair(T, generator)
        return {"k": k, "j": j}

    def loss(self, velocity: Velocity, reward: Reward, x1, sigmas, k: int, j: int) -> EstimatorOutput:
        return leapalign(velocity, reward, x1, sigmas, k, j, self.alpha, self.lam, self.tau, self.weighting)


@dataclass
class ReFL(ReFLParams):
    """Stop at a step t drawn from the last m, one step with gradient, reward on xhat_0."""

    lam: float = DEFAULT_LAM

    def draw(self, T, generator, x1) -> dict:
        return {"t": _last_steps(T, min(self.last_m, T), generator)}

    def loss(self, velocity, reward, x1, sigmas, t: int) -> EstimatorOutput:
        T = check_sigmas(sigmas)
        if not 0 <= t < T:
            raise ValueError(f"ReFL stop step must lie in [0, {T}), got t={t}")
        sig = sigmas.to(x1.device)
        x = x1.detach()
        with torch.no_grad():
            for i in range(t):
                x = euler_step(x, velocity(x, sig[i]), sig[i], sig[i + 1])
        xhat0 = x - sig[t].to(x.dtype) * velocity(x, sig[t]).to(x.dtype)
        r = _check_reward(reward(xhat0), x1.shape[0])
        return EstimatorOutput(reward_loss(r, self.lam), r.detach(), xhat0.detach(),
                               {"t": t, "sigma_t": sigmas.tolist()[t]}, t + 1)   # read on the host: also under a fake-tensor planner


@dataclass
class DRaFTLV(DRaFTLVParams):
    """DRaFT-LV (DRaFT-1 with a lower-variance estimate): no-grad rollout to the last step, the
    real last step with gradient (that is DRaFT-1), plus n copies of its x_0 re-noised to the last
    sigma and denoised again with gradient; the reward loss is averaged over the n + 1 last-step
    predictions, so the gradient keeps DRaFT-1's scale (n only lowers its variance)."""

    lam: float = DEFAULT_LAM

    def draw(self, T, generator, x1) -> dict:
        if self.n < 0:
            raise ValueError(f"DRaFT-LV needs n >= 0 re-noisings, got n={self.n}")
        eps = torch.randn((self.n, *x1.shape), generator=generator, dtype=torch.float32)
        return {"eps": eps}

    def loss(self, velocity, reward, x1, sigmas, eps: torch.Tensor) -> EstimatorOutput:
        T = check_sigmas(sigmas)
        sig = sigmas.to(x1.device)
        x = x1.detach()
        with torch.no_grad():
            for i in range(T - 1):
                x = euler_step(x, velocity(x, sig[i]), sig[i], sig[i + 1])
        s = sig[T - 1].to(x.dtype)
        # the real last step, with gradient through the model (its input is detached)
        x0 = euler_step(x, velocity(x, sig[T - 1]), sig[T - 1], sig[T])
        r0 = _check_reward(reward(x0), x1.shape[0])
        losses = [reward_loss(r0, self.lam)]
        for e in eps.to(device=x.device, dtype=x.dtype):
            xs = (1 - s) * x0.detach() + s * e
            xhat0 = euler_step(xs, velocity(xs, sig[T - 1]), sig[T - 1], sig[T])
            losses.append(reward_loss(_check_reward(reward(xhat0), x1.shape[0]), self.lam))
        loss = torch.stack(losses).mean()   # a mean over the n + 1 estimates, not a sum
        return EstimatorOutput(loss, r0.detach(), x0.detach(), {"n": len(losses) - 1}, T + len(losses) - 1)


@dataclass
class DRTune(DRTuneParams):
    """Model inputs detached at every step; K evenly spaced steps keep gradient; early stop."""

    lam: float = DEFAULT_LAM

    def draw(self, T, generator, x1) -> dict:
        if self.K < 1:
            raise ValueError(f"DRTune needs K >= 1 training steps, got K={self.K}")
        t = _last_steps(T, min(self.last_m, T), generator)
        n = t + 1
        K = min(self.K, n)
        stride = n // K
        start = int(torch.randint(n - (K - 1) * stride, (1,), generator=generator))
        return {"t": t, "train": [start + i * stride for i in range(K)]}

    def loss(self, velocity, reward, x1, sigmas, t: int, train: list[int]) -> EstimatorOutput:
        T = check_sigmas(sigmas)
        if not 0 <= t < T or any(not 0 <= i <= t for i in train):
            raise ValueError(f"DRTune needs 0 <= train steps <= t < T={T}, got t={t}, train={train}")
        sig = sigmas.to(x1.device)
        x = x1.detach()
        for i in range(t + 1):
            inp = x.detach()
            if i in train:
                v = velocity(inp, sig[i])
            else:
                with torch.no_grad():
                    v = velocity(inp, sig[i])
            if i == t:
                xhat0 = x - sig[t].to(x.dtype) * v.to(x.dtype)
            else:
                x = euler_step(x, v, sig[i], sig[i + 1])
        r = _check_reward(reward(xhat0), x1.shape[0])
        return EstimatorOutput(reward_loss(r, self.lam), r.detach(), xhat0.detach(),
                               {"t": t, "train": list(train)}, t + 1)


@dataclass
class FullBackprop(FullParams):
    """Backprop through the whole trajectory; each step checkpointed (keeps only step inputs)."""

    lam: float = DEFAULT_LAM

    def draw(self, T, generator, x1) -> dict:
        return {}

    def loss(self, velocity, reward, x1, sigmas) -> EstimatorOutput:
        T = check_sigmas(sigmas)
        sig = sigmas.to(x1.device)
        x = x1.detach()
        for i in range(T):
            if self.checkpointing:
                v = checkpoint(velocity, x, sig[i], use_reentrant=False)
            else:
                v = velocity(x, sig[i])
            x = euler_step(x, v, sig[i], sig[i + 1])
        r = _check_reward(reward(x), x1.shape[0])
        return EstimatorOutput(reward_loss(r, self.lam), r.detach(), x.detach(), {}, T)


METHODS = {"leapalign": LeapAlign, "refl": ReFL, "draft-lv": DRaFTLV, "drtune": DRTune, "full": FullBackprop}
assert set(METHODS) == set(METHOD_PARAMS)


def make_method(name: str, **params):
    """Build a method by name; unknown names or parameters, or values out of range, are errors
    naming them."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    cls = METHODS[name]
    allowed = {f.name for f in fields(cls)}
    bad = sorted(set(params) - allowed)
    if bad:
        raise ValueError(f"method {name!r} has no parameter(s) {bad}; it takes {sorted(allowed)}")
    m = cls(**params)
    m.check()
    _check_lam(m.lam)
    return m


def method_from_config(cfg) -> object:
    """The method a ``MethodConfig`` names, with its section's parameters and the shared lam."""
    p = method_params(cfg.name, getattr(cfg, method_section(cfg.name)))
    return make_method(cfg.name, lam=cfg.lam, **{f.name: getattr(p, f.name) for f in fields(p)})
