"""Flux's shifted sigma schedule, the Euler step, and the random step pair (k before j)."""
from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift


def flux_sigmas(
    num_steps: int,
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> torch.Tensor:
    """The ``num_steps + 1`` sigmas (float32, ending in 0) that FluxPipeline samples with.

    Driven through diffusers' own scheduler, the way FluxPipeline drives it (linspace(1, 1/T, T)
    and the resolution-dependent mu), so a rollout here reproduces the pipeline bit for bit.
    Always a real CPU tensor, also when called under FakeTensorMode (a model sized on fake
    tensors still steps with real sigmas, read as Python floats).
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        return _flux_sigmas(num_steps, image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)


def _flux_sigmas(num_steps, image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift) -> torch.Tensor:
    if num_steps < 2:
        raise ValueError(f"need at least 2 sampling steps (k and j must differ), got T={num_steps}")
    if image_seq_len < 1:
        raise ValueError(f"image_seq_len must be positive, got {image_seq_len}")
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=base_seq_len, max_image_seq_len=max_seq_len,
        base_shift=base_shift, max_shift=max_shift, use_dynamic_shifting=True,
    )
    mu = calculate_shift(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps), mu=mu)
    return scheduler.sigmas.to(torch.float32).clone()


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """x_next = x + (s_next - s) * v, in x's dtype with v cast to it (latents are kept in fp32)."""
    return x + (sigma_next - sigma).to(x.dtype) * v.to(x.dtype)


def sample_step_pair(num_steps: int, generator: torch.Generator) -> tuple[int, int]:
    """Two distinct step indices (k, j), k < j (k noisier), uniform over all pairs of the T steps."""
    if num_steps < 2:
        raise ValueError(f"need at least 2 sampling steps to draw k != j, got T={num_steps}")
    a, b = torch.randperm(num_steps, generator=generator)[:2].tolist()
    return min(a, b), max(a, b)


def check_step_pair(k: int, j: int, num_steps: int) -> None:
    if not (0 <= k < num_steps and 0 <= j < num_steps):
        raise ValueError(f"step indices must lie in [0, {num_steps}), got k={k}, j={j}")
    if k >= j:
        raise ValueError(f"k must be an earlier (noisier) step than j: need k < j, got k={k}, j={j}")
