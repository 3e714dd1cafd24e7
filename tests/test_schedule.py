import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

from engine.schedule import check_step_pair, euler_step, flux_sigmas, sample_step_pair

FLUX_SCHEDULER = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15,
                      use_dynamic_shifting=True, shift=3.0)


@pytest.mark.parametrize("T", [25, 50])
@pytest.mark.parametrize("hw", [(256, 256), (512, 512), (1024, 1024)])
def test_sigmas_equal_flux_pipeline(T, hw):
    seq_len = (hw[0] // 16) * (hw[1] // 16)  # FluxPipeline: vae factor 8, then 2x2 packing
    sched = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    retrieve_timesteps(sched, T, "cpu", sigmas=np.linspace(1.0, 1 / T, T), mu=mu)
    ours = flux_sigmas(T, seq_len)
    assert ours.dtype == torch.float32 and ours.shape == (T + 1,)
    assert torch.equal(ours, sched.sigmas)


@pytest.mark.parametrize("seq_len", [256, 1024, 4096])
def test_sigmas_match_method_formula(seq_len):
    T = 25
    mu = 0.5 + (seq_len - 256) * (1.15 - 0.5) / (4096 - 256)
    s = np.linspace(1, 1 / T, T)
    want = np.append(math.exp(mu) * s / (math.exp(mu) * s + 1 - s), 0.0)
    np.testing.assert_allclose(flux_sigmas(T, seq_len).numpy(), want, rtol=1e-6, atol=1e-7)


def test_euler_step():
    x, v = torch.randn(2, 5), torch.randn(2, 5)
    s, sn = torch.tensor(0.7), torch.tensor(0.4)
    torch.testing.assert_close(euler_step(x, v, s, sn), x - 0.3 * v)


def test_step_pairs_uniform_and_seeded():
    T = 6
    g = torch.Generator().manual_seed(0)
    pairs = [sample_step_pair(T, g) for _ in range(6000)]
    assert all(0 <= k < j < T for k, j in pairs)
    counts = {}
    for p in pairs:
        counts[p] = counts.get(p, 0) + 1
    assert len(counts) == T * (T - 1) // 2          # every pair occurs
    expected = len(pairs) / len(counts)
    assert max(abs(c - expected) for c in counts.values()) < 5 * math.sqrt(expected)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert [sample_step_pair(25, g1) for _ in range(10)] == [sample_step_pair(25, g2) for _ in range(10)]


def test_bad_schedule_inputs():
    with pytest.raises(ValueError, match="T=1"):
        flux_sigmas(1, 256)
    with pytest.raises(ValueError, match="T=1"):
        sample_step_pair(1, torch.Generator())
    with pytest.raises(ValueError, match="k=3, j=3"):
        check_step_pair(3, 3, 10)
    with pytest.raises(ValueError, match="k=5, j=2"):
        check_step_pair(5, 2, 10)
    with pytest.raises(ValueError, match="j=10"):
        check_step_pair(1, 10, 10)
