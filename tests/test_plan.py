"""The memory planner (engine/plan.py): its prediction, made on fake tensors, against what a real
training iteration allocates; the CLI; the budget search."""
from __future__ import annotations

import gc
import json

import pytest
import torch

from engine import plan
from engine.config import load_config
from engine.memory import PeakLiveBytes

TINY = ["device=cpu", "lora.enabled=true", "lora.rank=4", "lora.alpha=4", "model.height=64", "model.width=64",
        "batch_size=2"]


@pytest.fixture(scope="module", autouse=True)
def _cheap_gc():
    # engine.memory.held_bytes collects garbage after every block it measures; with diffusers,
    # transformers and peft imported that is ~0.5 s a call, unless the imported objects are frozen
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def config_folder(tmp_path, tcfg: dict, vcfg: dict, device: str, res: int) -> list[str]:
    """A diffusers folder holding only the transformer's and VAE's configs, and the overrides of a
    bf16 lean LoRA run on it (prompt embeddings cached)."""
    for sub, c in (("transformer", tcfg), ("vae", vcfg)):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "config.json").write_text(json.dumps(c))
    return [f"model.source={tmp_path}", f"device={device}", "model.dtype=bfloat16", f"model.height={res}",
            f"model.width={res}", "model.policy=lean", "lora.enabled=true", "lora.rank=16", "lora.alpha=16",
            "batch_size=1", f"embed_cache_dir={tmp_path / 'cache'}", "prompts=[a red square]", "num_steps=4"]


def measured_peak(overrides: list[str]) -> tuple[int, int, int]:
    """(resident bytes, PeakLiveBytes of one trainer.step(), their sum) on real tensors: the
    parameters, buffers, optimizer state and EMA after a first step, then a second step measured
    whole (rollout, passes, decode, reward, backward, clipping, AdamW, EMA)."""
    from engine.trainer import LeapTrainer

    tr = LeapTrainer(load_config("configs/tiny.yaml", overrides))
    tr.step()
    ts = [*tr.transformer.parameters(), *tr.transformer.buffers(), *tr.adapter.vae.parameters(),
          *tr.adapter.vae.buffers(), *tr.reward_model.parameters(), *tr.reward_model.buffers(),
          *tr.text_encoder.buffers(), *tr.text_encoder.parameters(),
          *[v for st in tr.optimizer.state.values() for v in st.values() if torch.is_tensor(v)], *tr.ema.values()]
    host = tr.swap.host_tensor_ids() if tr.swap else set()     # block swap's: not on the device
    resident = plan.storage_bytes([t for t in ts if id(t) not in host])
    with PeakLiveBytes() as m:
        tr.step()
    return resident, m.peak, resident + m.peak


def test_plan_within_5_percent_of_a_real_iteration():
    ov = TINY + ["model.policy=none"]
    r = plan.run_plan(load_config("configs/tiny.yaml", ov))
    resident, act, total = measured_peak(ov)
    assert r["target"] == "cpu"
    assert abs(r["peak"] - total) / total < 0.05, (r["peak"], total)
    # the activations alone, not only the sum the weights dominate; the step creates its inputs
    # (noise, prompt embeddings), which the plan lists with the resident bytes
    inputs = sum(r["resident"]["iteration inputs (noise, prompt embeddings, ids)"].values())
    predicted_act = r["peak"] - r["resident_total"] + inputs
    assert abs(predicted_act - act) / act < 0.05, (predicted_act, act)
    # the terms combine to the whole iteration
    assert abs(r["composed"] - r["iteration"]["peak"]) / r["iteration"]["peak"] < 0.05


def test_folder_model_in_bf16_with_lean_blocks_within_5_percent(tmp_path):
    """A diffusers folder holding only config.json files (no weights: the plan never reads them),
    Flux's widths cut down, bf16, LoRA, lean blocks, the embedding cache: against a real
    trainer.step() given the same modules."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from engine.flux.adapter import FluxAdapter
    from engine.flux.tiny import HashTextEncoder
    from engine.rewards import ColourReward
    from engine.trainer import LeapTrainer

    tcfg = dict(plan.FLUX_DEV_TRANSFORMER, num_layers=1, num_single_layers=2, num_attention_heads=2)
    vcfg = dict(plan.FLUX_DEV_VAE, block_out_channels=[32, 32, 64, 64])
    ov = config_folder(tmp_path, tcfg, vcfg, "cpu", 128)
    cfg = load_config(None, ov)
    r = plan.run_plan(cfg)
    assert "text encoders (embed_cache_dir: cached on disk / CPU)" in r["resident"]
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        adapter = FluxAdapter(FluxTransformer2DModel(**tcfg), AutoencoderKL(**vcfg))
    finally:
        torch.set_default_dtype(old)
    # the cache's stand-in: 512 tokens of T5's width, computed on the CPU as the cache keeps them
    text = HashTextEncoder(tcfg["joint_attention_dim"], tcfg["pooled_projection_dim"], max_length=512)
    tr = LeapTrainer(cfg, adapter=adapter, text_encoder=text, reward=ColourReward())
    tr.step()
    resident = plan.storage_bytes([*tr.transformer.parameters(), *tr.transformer.buffers(), *adapter.vae.parameters(),
                                   *adapter.vae.buffers(), *tr.ema.values(),
                                   *[v for st in tr.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]])
    with PeakLiveBytes() as m:
        tr.step()
    total = resident + m.peak
    assert abs(r["peak"] - total) / total < 0.05, (r["peak"], total)
    inputs = sum(r["resident"]["iteration inputs (noise, prompt embeddings, ids)"].values())
    predicted_act = r["peak"] - r["resident_total"] + inputs
    assert abs(predicted_act - m.peak) / m.peak < 0.05, (predicted_act, m.peak)


def test_cli_prints_every_term_and_refuses_a_budget_nothing_fits(capsys):
    from engine.__main__ import main

    rc = main(["plan", "--config", "configs/tiny.yaml", *TINY, "--budget-gib", "0.0001"])
    out, err = capsys.readouterr()
    assert rc == 2
    for term in ("transformer base weights", "LoRA weights", "VAE weights", "reward weights", "text encoder",
                 "AdamW states", "EMA (fp32)", "rollout: one no-grad forward", "graph-keeping pass 1",
                 "graph-keeping pass 2", "VAE decode + reward", "pass backward", "LoRA / trainable gradients",
                 "optimizer step", "whole iteration", "predicted peak"):
        assert term in out, term
    assert "nothing fits" in out
    assert err.strip().startswith("error: nothing fits 0.0001 GiB") and len(err.strip().splitlines()) == 1


def test_cli_user_error_is_one_line(capsys):
    from engine.__main__ import main

    assert main(["plan", "--config", "configs/tiny.yaml", "model.source=/nonexistent/flux"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: missing model folder") and len(err.splitlines()) == 1


def test_budget_picks_the_fastest_setting_that_fits_and_a_real_run_fits(tmp_path):
    cfg = load_config("configs/tiny.yaml", TINY + ["model.policy=none"])
    p = plan.Planner(cfg)
    res = p.resident()
    resident = sum(sum(v.values()) for v in res.values())
    base = p.iteration("none", 0.0, True, "auto")
    cands = plan.candidates(p, resident, base)
    lo, hi = min(c.peak for c in cands), max(c.peak for c in cands)
    assert lo < hi
    budget = (lo + hi) // 2
    choice, _ = plan.search(p, budget, resident, base, verify=True, levers=[])
    assert choice is not None and choice.peak <= budget and choice.verified <= budget
    fitting = [c for c in cands if c.peak <= budget]
    assert choice.flops == min(c.flops for c in fitting)
    assert any(c.peak > budget for c in cands)   # the budget did exclude settings
    assert plan.search(p, lo - 1, resident, base, verify=False, levers=[])[0] is None
    # the fp8 base (a lever) stores the frozen weights in half the bytes: below every bf16 setting
    fp8, _ = plan.search(p, lo - 1, resident, base, verify=False)
    assert fp8 is not None and fp8.overrides["model.base_precision"] == "fp8" and fp8.peak <= lo - 1
    # the printed overrides, applied to a real run, fit the budget
    ov = TINY + [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in choice.overrides.items()]
    _, _, total = measured_peak(ov)
    assert total <= budget * 1.01, (total, budget)


def test_block_swap_planned_within_5_percent():
    ov = TINY + ["model.policy=full", "model.swap_blocks=2"]
    r = plan.run_plan(load_config("configs/tiny.yaml", ov))
    resident, act, total = measured_peak(ov)
    assert abs(r["peak"] - total) / total < 0.05, (r["peak"], total)
    unswapped = plan.run_plan(load_config("configs/tiny.yaml", TINY + ["model.policy=full"]))
    assert r["resident_total"] + r["swap"]["host_bytes"] == unswapped["resident_total"]
    # a forward pass copies each swapped block once: T forwards + the two passes' recomputation
    T = load_config("configs/tiny.yaml", ov).num_steps
    assert (T + 2) * r["swap"]["host_bytes"] * 0.9 <= r["swap"]["bytes_per_iteration"] <= (T + 3) * r["swap"]["host_bytes"]


def test_budget_search_swaps_the_fewest_blocks_that_fit(tmp_path):
    """Below what every setting needs, the search offers block swap: the fewest blocks that fit by
    the terms (tiny Flux has too few blocks: 2 in flight of 3, so a Flux-wide folder model with
    9 blocks). The verified whole iteration is the CLI's (--verify) and the 5 % test's business."""
    tcfg = dict(plan.FLUX_DEV_TRANSFORMER, num_layers=1, num_single_layers=8, num_attention_heads=2)
    vcfg = dict(plan.FLUX_DEV_VAE, block_out_channels=[32, 32, 64, 64])
    cfg = load_config(None, config_folder(tmp_path, tcfg, vcfg, "cpu", 128) + ["model.policy=none"])
    p = plan.Planner(cfg)
    resident = sum(sum(v.values()) for v in p.resident().values())
    base = p.iteration("none", 0.0, True, "auto")
    lo = min(c.peak for c in plan.candidates(p, resident, base))
    budget = lo - 4 * 2 ** 20
    choice, cands = plan.search(p, budget, resident, base, verify=False, levers=[])
    assert choice is not None and choice.swap_blocks > 0 and choice.peak <= budget
    assert choice.overrides["model.swap_blocks"] == choice.swap_blocks
    opts = {n: (host, fl) for n, host, fl in plan.swap_options(p)}
    host, inflight = opts[choice.swap_blocks]
    assert choice.swap_bytes == host * (cfg.num_steps + 2)
    # one block fewer would not have fitted: the same setting's peak without the swap, less one
    # block fewer's saving, is over the budget
    plain = next(c for c in cands if c.overrides == {k: v for k, v in choice.overrides.items()
                                                      if k != "model.swap_blocks"})
    if choice.swap_blocks > 1:
        h1, f1 = opts[choice.swap_blocks - 1]
        assert plain.peak - h1 + f1 > budget
    assert plan.search(p, resident - opts[9][0], resident, base, verify=False, levers=[])[0] is None


def test_a_reward_that_cannot_be_built_without_weights_is_reported_missing(capsys):
    from engine.__main__ import main

    assert main(["plan", "--config", "configs/tiny.yaml", *TINY, "reward.name=hpsv3",
                 "reward.params.path=/nonexistent/hpsv3"]) == 0
    out = capsys.readouterr().out
    assert "note: hpsv3 is NOT built without its weights" in out and "predicted peak" in out


def test_levers_are_searched_only_where_the_config_has_them():
    cfg = load_config("configs/tiny.yaml", TINY)
    assert plan.lever_settings(cfg, [("model.no_such_key", ("a", "b"))]) == [{}]
    got = plan.lever_settings(cfg, [("lora.rank", (8, 4)), ("model.policy", ("none", "full"))])
    assert got[0] == {"lora.rank": 4, "model.policy": "none"}          # the config's own values first
    assert len(got) == 4 and {"lora.rank": 8, "model.policy": "full"} in got
    assert plan._override(cfg, {"lora.rank": 8}).lora.rank == 8


def test_published_config_is_sized_without_a_folder():
    cfg = load_config("configs/flux-dev-hpsv21-lora.yaml", [])
    mc = plan.model_configs(cfg, "flux-dev")
    assert mc["transformer"]["num_layers"] == 19 and mc["transformer"]["num_single_layers"] == 38
    assert plan.model_configs(load_config(None, ["model.source=flux-dev-config"]))["vae"]["latent_channels"] == 16
    with pytest.raises(FileNotFoundError, match="--model-config"):
        plan.model_configs(cfg)   # models/FLUX.1-dev is not here, and no weights are needed to say so


@pytest.mark.gpu
def test_plan_within_10_percent_of_cuda_max_memory_allocated(tmp_path):
    """A Flux-width model (2 double + 4 single blocks, 3072 wide) with Flux's VAE at 512x512, LoRA,
    bf16: the plan (fake tensors, CPU) against torch.cuda.max_memory_allocated over a real
    trainer.step()."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from engine.flux.adapter import FluxAdapter
    from engine.flux.tiny import HashTextEncoder
    from engine.trainer import LeapTrainer

    tcfg = dict(plan.FLUX_DEV_TRANSFORMER, num_layers=2, num_single_layers=4)
    ov = config_folder(tmp_path, tcfg, plan.FLUX_DEV_VAE, "cuda", 512)
    cfg = load_config(None, ov)
    r = plan.run_plan(cfg, device="cuda")
    torch.manual_seed(0)
    with torch.device("cuda"):
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            adapter = FluxAdapter(FluxTransformer2DModel(**tcfg), AutoencoderKL(**plan.FLUX_DEV_VAE))
        finally:
            torch.set_default_dtype(old)
    # the embeddings' encoder stays on the CPU, as the embedding cache keeps them
    text = HashTextEncoder(tcfg["joint_attention_dim"], tcfg["pooled_projection_dim"], max_length=512)
    from engine.rewards import ColourReward

    tr = LeapTrainer(cfg, adapter=adapter, text_encoder=text, reward=ColourReward())
    tr.step()
    peak = tr.step()["peak_mem_bytes"]
    assert abs(r["peak"] - peak) / peak < 0.10, (r["peak"], peak)


def test_fsdp_plan_shards_what_fsdp2_shards():
    """Full fine-tuning under FSDP2: weights, optimizer state and EMA divided over the ranks, the
    gradients sharded as reduce-scatter leaves them, the all-gathered blocks on top."""
    base = TINY + ["lora.enabled=false", "distributed=fsdp", "model.policy=full"]
    one = plan.run_plan(load_config("configs/tiny.yaml", base))
    four = plan.run_plan(load_config("configs/tiny.yaml", base), world_size=4)
    assert "fsdp" not in one and four["world_size"] == 4
    for name in ("transformer base weights", "AdamW states (exp_avg + exp_avg_sq)", "EMA (fp32)"):
        whole = sum(one["resident"][name].values())
        shard = sum(four["resident"][f"{name}, 1/4 shard"].values())
        assert whole / 4 <= shard < whole / 4 + 8 * len(one["resident"][name])
    assert one["resident"]["VAE weights"] == four["resident"]["VAE weights"]     # replicated
    fs = four["fsdp"]
    assert fs["gradient shards"] == -(-one["trainable_bytes"] // 4)
    # every gradient dropped as it lands: the iteration no longer ends holding all of them
    assert one["iteration"]["held_after_backward"] >= one["trainable_bytes"]
    assert four["iteration"]["held_after_backward"] < one["trainable_bytes"] // 4
    assert four["iteration"]["peak"] <= one["iteration"]["peak"]
    assert four["peak"] == four["resident_total"] + max(four["iteration"]["peak"] + sum(fs.values()),
                                                        four["step_phase"])
    assert four["peak"] < one["peak"]
    with pytest.raises(ValueError, match="set distributed=fsdp"):
        plan.run_plan(load_config("configs/tiny.yaml", TINY), world_size=2)
    with pytest.raises(ValueError, match="not searched"):
        plan.run_plan(load_config("configs/tiny.yaml", base), budget_gib=1.0, world_size=2)


def test_fp8_dequantization_traffic_is_counted_per_pass():
    """1 byte read + 2 written per fp8 weight in each of T forwards, the two passes' backwards and
    their recomputation; none in the rollout's no-grad steps with fp8 compute."""
    from kernels.fp8_linear import Fp8Linear

    r = plan.run_plan(load_config("configs/tiny.yaml", TINY + ["model.base_precision=fp8", "model.policy=full"]))
    p = plan.Planner(load_config("configs/tiny.yaml", TINY + ["model.base_precision=fp8"]))
    n = sum(m.weight.numel() for m in p.adapter.transformer.modules() if isinstance(m, Fp8Linear))
    T = p.cfg.num_steps
    assert n > 0 and r["fp8_dequant_bytes"] == 3 * n * (T + 2 + 2)
    assert plan.fp8_dequant_bytes(p, "none", "weight") == 3 * n * (T + 2)
    assert plan.fp8_dequant_bytes(p, "full", "rollout") == 3 * n * (2 + 2 + 2)
    assert "fp8_dequant_bytes" not in plan.run_plan(load_config("configs/tiny.yaml", TINY))
