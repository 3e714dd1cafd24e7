"""Block swap (engine/swap.py, engine.build.apply_block_swap): the same numbers as the resident
model, forward and backward, under every policy and on an fp8 base; the copies made one block
ahead; nothing of the model changed between calls; the configurations it cannot serve refused."""
import copy

import pytest
import torch

from engine import build, swap
from engine.config import load_config
from tests.test_fp8 import flux_inputs, lora_flux, out_and_lora_grads

POLICIES = ["none", "lean", "full", "diffusers"]


def swapped(tr, n, policy="none", fp8=False):
    tr = copy.deepcopy(tr)
    if fp8:
        build.apply_fp8_base(tr, "weight")
    build.apply_policy(tr, load_config(None, [f"model.policy={policy}"]).model)
    return tr, build.apply_block_swap(tr, n, torch.device("cpu"))


@pytest.fixture(scope="module")
def ref():
    return lora_flux()


@pytest.mark.parametrize("policy", POLICIES)
def test_same_output_and_lora_grads_every_policy(ref, policy):
    plain, _ = swapped(ref, 0, policy)
    sw, s = swapped(ref, 3, policy)       # tiny Flux: 1 double + 2 single blocks, all swapped
    (o0, g0), (o1, g1) = out_and_lora_grads(plain), out_and_lora_grads(sw)
    assert torch.equal(o0, o1)
    assert g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0)
    assert s.copies >= 3 and s.bytes_moved > 0


def test_fp8_base_swapped_same_as_fp8_resident(ref):
    plain, _ = swapped(ref, 0, "full", fp8=True)
    sw, s = swapped(ref, 2, "full", fp8=True)
    (o0, g0), (o1, g1) = out_and_lora_grads(plain), out_and_lora_grads(sw)
    assert torch.equal(o0, o1) and all(torch.equal(g0[k], g1[k]) for k in g0)
    # what moves is the fp8 codes (1 byte a weight) and their scales
    assert s.swapped_bytes() == sum(swap.block_bytes(b) for b in sw.single_transformer_blocks)
    assert any(t.dtype == torch.uint8 for p, _ in s.host.values() for t in p.values())


def test_only_frozen_linears_move_and_the_model_is_restored_after_each_call(ref):
    sw, s = swapped(ref, 2)
    before = {n: t for n, t in [*sw.named_parameters(), *sw.named_buffers()]}
    keys = set(sw.state_dict())
    with torch.no_grad():
        sw(**flux_inputs(sw))
    after = {n: t for n, t in [*sw.named_parameters(), *sw.named_buffers()]}
    assert before.keys() == after.keys() and all(before[n] is after[n] for n in before)
    assert set(sw.state_dict()) == keys == set(ref.state_dict())
    host = s.host_tensor_ids()
    moved = {n for n, t in before.items() if id(t) in host}
    assert moved and all(n.startswith("single_transformer_blocks.") for n in moved)
    assert not any("lora_" in n or "norm_q" in n for n in moved)      # trainable and tiny: resident
    assert all(not before[n].requires_grad for n in moved)
    assert set(build.trainable_parameters(sw)) == set(build.trainable_parameters(ref))


def test_rollout_prefetches_one_block_ahead(ref):
    sw, s = swapped(ref, 3)
    x = flux_inputs(sw)
    with torch.no_grad():
        out = [sw(**x)[0] for _ in range(4)]
    assert all(torch.equal(o, out[0]) for o in out)
    # the first block is copied when first needed; every later copy was made one block ahead,
    # the last block prefetching the first for the next pass
    assert s.misses == 1
    assert s.copies == 4 * 3 + 1
    per_block = [swap.block_bytes(b) for b in swap.blocks_in_order(sw)]
    assert s.bytes_moved == 4 * sum(per_block) + per_block[0]
    assert len(s.inflight) <= 2       # device copies held between calls: the next block's at most


def test_checkpointed_backward_fetches_again_in_reverse(ref):
    sw, s = swapped(ref, 3, "full")
    out = sw(**flux_inputs(sw))[0]
    fwd = s.copies
    (out ** 2).mean().backward()
    # the recomputation runs blocks 2, 1, 0: block 2's copy is still held from the forward, block 1
    # is a miss (the direction turned) and block 0 was prefetched for the next pass: one copy
    assert fwd == 4 and s.copies == fwd + 1
    assert s.misses == 2
    assert s.direction == -1


def test_bad_settings_are_refused(ref):
    sw, _ = swapped(ref, 1)
    with pytest.raises(ValueError, match="already swaps 1 blocks"):
        build.apply_block_swap(sw, 2, torch.device("cpu"))
    assert build.apply_block_swap(sw, 1, torch.device("cpu")) is sw._engine_block_swap
    with pytest.raises(ValueError, match=r"model.swap_blocks must lie in \[0, 3\].*got 4"):
        build.apply_block_swap(copy.deepcopy(ref), 4, torch.device("cpu"))
    for over, msg in [(["lora.enabled=false"], "needs lora.enabled=true"),
                      (["distributed=ddp"], "is for one device"),
                      (["model.compile=inductor"], "torch.compile"),
                      ([], None)]:
        args = ["model.swap_blocks=2", "lora.enabled=true", *over]
        if msg is None:
            with pytest.raises(ValueError, match="model.swap_blocks must be >= 0"):
                load_config(None, ["model.swap_blocks=-1"])
            continue
        with pytest.raises(ValueError, match=msg):
            load_config(None, args)


def test_trainer_step_same_with_swap(tmp_path):
    from engine.trainer import LeapTrainer

    base = ["lora.enabled=true", "lora.rank=4", "steps=1", "batch_size=2", "num_steps=4", "device=cpu",
            "model.policy=full"]
    runs = []
    for n in (0, 2):
        tr = LeapTrainer(load_config(None, [*base, f"model.swap_blocks={n}", f"output_dir={tmp_path}/s{n}"]))
        m = tr.step()
        runs.append((m, {k: p.detach().clone() for k, p in tr.params.items()}, tr.swap))
    (m0, p0, s0), (m1, p1, s1) = runs
    assert s0 is None and s1 is not None and s1.copies > 0
    assert m0["loss"] == m1["loss"] and all(torch.equal(p0[k], p1[k]) for k in p0)


@pytest.mark.gpu
def test_copies_overlap_compute_on_gpu():
    """On a GPU the copies run on the side stream while the blocks compute: some host-to-device
    copy overlaps a kernel of the compute stream, and a swapped rollout takes less time than its
    compute plus its copies one after the other."""
    from torch.profiler import ProfilerActivity, profile

    from diffusers import FluxTransformer2DModel

    from engine.flux.tiny import tiny_transformer_config

    dev = torch.device("cuda")
    # wide enough (1024) that a block's compute and its copy both take ~100 us or more
    tr = FluxTransformer2DModel(**{**tiny_transformer_config(), "num_layers": 2, "num_single_layers": 6,
                                   "attention_head_dim": 128, "num_attention_heads": 8,
                                   "axes_dims_rope": [16, 56, 56]})
    tr = tr.requires_grad_(False).to(torch.bfloat16)     # on the CPU: apply_block_swap places it
    s = build.apply_block_swap(tr, 4, dev)
    x = {k: v.to(dev, torch.bfloat16 if k not in ("img_ids", "txt_ids") else torch.float32)
         if torch.is_tensor(v) else v for k, v in flux_inputs(tr, batch=4, side=32, text=64).items()}
    with torch.no_grad():
        for _ in range(3):
            tr(**x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                tr(**x)
            torch.cuda.synchronize()
    ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    copies = [e for e in ev if "Memcpy HtoD" in e.name]
    kernels = [e for e in ev if "Memcpy" not in e.name and "Memset" not in e.name]
    assert copies and kernels
    overlap = any(c.time_range.start < k.time_range.end and k.time_range.start < c.time_range.end
                  for c in copies for k in kernels)
    assert overlap, "no host-to-device copy overlapped a kernel"
    assert s.misses <= 1


def test_the_host_tensors_go_back_when_a_forward_raises(ref):
    sw, s = swapped(ref, 2)
    leaf = s.leaves[0][0]
    before = dict(leaf._parameters)

    def boom(m, args):
        raise RuntimeError("boom")

    h = leaf.register_forward_pre_hook(boom)     # runs after the swap's own pre-hook
    try:
        with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
            sw(**flux_inputs(sw))
    finally:
        h.remove()
    assert all(leaf._parameters[k] is v for k, v in before.items())
