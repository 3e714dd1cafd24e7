"""Lean Flux blocks (engine.flux.lean) against an untouched diffusers model.

CPU tests run the fused ops' torch references (``LEAPALIGN_BACKEND=torch``); the Triton kernels
run through the interpreter in a subprocess, because triton fixes interpret-vs-compile when it is
first imported and this process may already have imported it in compile mode.
"""
import copy
import os
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig

from diffusers import FluxPipeline, FluxTransformer2DModel
from engine.flux import lean
from kernels import backend

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# heads x head_dim = 2 x 16 and 3 x 8; text + image tokens odd, the image grid non-square.
WIDTHS = {
    "2x16": dict(num_attention_heads=2, attention_head_dim=16, axes_dims_rope=[4, 6, 6]),
    "3x8": dict(num_attention_heads=3, attention_head_dim=8, axes_dims_rope=[2, 2, 4]),
}
SHAPES = {"2x16": (7, (3, 5)), "3x8": (7, (1, 9))}  # (text tokens, packed image h x w)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2", "norm1.linear", "norm1_context.linear", "norm.linear",
                "proj_mlp", "proj_out"]
TOL = 1e-5
FUSED_OPS = ("mod_layernorm", "qk_norm_rope", "gelu_tanh", "gated_residual")


def make_model(width, layers=(2, 2), seed=0):
    cfg = dict(patch_size=1, in_channels=16, num_layers=layers[0], num_single_layers=layers[1],
               joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=True, **WIDTHS[width])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FluxTransformer2DModel(**cfg)
        with torch.no_grad():  # bigger than the default init, so every path moves the output
            for p in model.parameters():
                p.normal_(0, 0.3)
    return model


def add_lora(model, seed=1):
    """peft LoRA on every linear of the blocks, with lora_B non-zero so that it matters."""
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def model_inputs(width, batch=2):
    txt, (h, w) = SHAPES[width]
    g = torch.Generator().manual_seed(2)
    return dict(
        hidden_states=torch.randn(batch, h * w, 16, generator=g).requires_grad_(),
        encoder_hidden_states=torch.randn(batch, txt, 24, generator=g).requires_grad_(),
        pooled_projections=torch.randn(batch, 20, generator=g).requires_grad_(),
        timestep=torch.rand(batch, generator=g), guidance=torch.full((batch,), 3.5),
        txt_ids=torch.zeros(txt, 3),
        img_ids=FluxPipeline._prepare_latent_image_ids(batch, h, w, "cpu", torch.float32),
    )


def forward_backward(model, inputs):
    """Output, and gradients of a fixed random projection of it: inputs (temb too) and parameters."""
    inputs = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in inputs.items()}
    kept = {}

    def keep_temb(module, args, out):
        out.retain_grad()
        kept["temb"] = out

    hook = model.time_text_embed.register_forward_hook(keep_temb)
    try:
        out = model(**inputs, return_dict=False)[0]
    finally:
        hook.remove()
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    (out * w.to(out.device)).sum().backward()
    grads = {"hidden_states": inputs["hidden_states"].grad,
             "encoder_hidden_states": inputs["encoder_hidden_states"].grad,
             "temb": kept["temb"].grad}
    grads.update({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    return out.detach(), grads


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def assert_same(out, grads, ref_out, ref_grads, tol=TOL):
    assert rel_err(out, ref_out) <= tol, f"output: rel err {rel_err(out, ref_out):.3g}"
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert g is not None and grads[name] is not None, name
        err = rel_err(grads[name], g)
        assert err <= tol, f"grad of {name}: rel err {err:.3g} > {tol}"


def budget_kwargs(model, width, batch=2):
    """A budget that fits exactly one lean block, so the plan mixes lean and full."""
    txt, hw = SHAPES[width]
    per = lean.measure_policy_bytes(model, lean.block_inputs(model, batch, txt, hw))
    n_double, n_single = len(model.transformer_blocks), len(model.single_transformer_blocks)
    all_full = n_double * per["double"]["full"] + n_single * per["single"]["full"]
    one = min(per[k]["lean"] - per[k]["full"] for k in per)
    return dict(budget_bytes=all_full + one, per_block_bytes=per)


def check_policy(policy, width, lora, batch=2, layers=(2, 2)):
    """The swapped model's output and gradients equal an untouched copy's."""
    ref = make_model(width, layers)
    if lora == "before":
        add_lora(ref)
    model = copy.deepcopy(ref)
    kwargs = budget_kwargs(model, width, batch) if policy == "budget" else {}
    info = lean.apply_policy(model, policy, **kwargs)
    if lora == "after":
        add_lora(ref)
        add_lora(model)
    if policy == "budget":
        assert sorted(info["counts"]) == ["full", "lean"], info
    inputs = model_inputs(width, batch)
    with backend.recording() as ran:
        got = forward_backward(model, inputs)
    assert_same(*got, *forward_backward(ref, inputs))
    return lean.describe(model, ran)


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("LEAPALIGN_BACKEND", "torch")


# --------------------------------------------------------------------------- torch backend
@pytest.mark.parametrize("lora", [None, "before", "after"])
@pytest.mark.parametrize("width", sorted(WIDTHS))
@pytest.mark.parametrize("policy", lean.POLICIES)
def test_policy_matches_diffusers(policy, width, lora):
    info = check_policy(policy, width, lora)
    if policy != "none":
        assert {info["kernels"][op] for op in FUSED_OPS} == {"torch"}
        assert info["attention"].startswith("sdpa")


def test_state_dict_unchanged_and_loads_into_plain_diffusers(tmp_path):
    ref = make_model("2x16")
    model = copy.deepcopy(ref)
    before = model.state_dict()
    lean.apply_policy(model, "lean")
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(after[k].data_ptr() == before[k].data_ptr() for k in before)
    model.save_pretrained(tmp_path)
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path)
    assert all("forward" not in b.__dict__ for b in loaded.transformer_blocks)
    inputs = model_inputs("2x16")
    with torch.no_grad():
        want = ref(**inputs, return_dict=False)[0]
        assert rel_err(loaded(**inputs, return_dict=False)[0], want) == 0
        assert rel_err(model(**inputs, return_dict=False)[0], want) <= TOL


def test_deepcopy_and_reset():
    model = make_model("3x8", layers=(1, 1))
    lean.apply_policy(model, "full")
    twin = copy.deepcopy(model)
    block = twin.single_transformer_blocks[0]
    assert block.forward.__self__ is block and lean.policy_of(block) == "full"
    lean.apply_policy(model, "none")
    assert all("forward" not in b.__dict__ for b in [*model.transformer_blocks, *model.single_transformer_blocks])
    with pytest.raises(ValueError, match="policy"):
        lean.apply_policy(model, "fast")
    model.transformer_blocks[0].forward = lambda *args, **kwargs: None  # e.g. a diffusers hook
    with pytest.raises(RuntimeError, match="already replaced"):
        lean.apply_policy(model, "lean")
    model.enable_gradient_checkpointing()
    with pytest.raises(ValueError, match="checkpointing"):
        lean.apply_policy(model, "lean")


@pytest.mark.parametrize("policy", ["lean", "full"])
def test_no_grad_saves_nothing(policy):
    model = make_model("2x16", layers=(1, 1))
    lean.apply_policy(model, policy)
    txt, hw = SHAPES["2x16"]
    inputs = lean.block_inputs(model, 2, txt, hw)
    saved = []
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
            outs = block(**inputs)
    assert saved == [] and all(o.grad_fn is None for o in outs)


def test_saved_bytes_and_budget_plan():
    model = make_model("2x16")
    txt, hw = SHAPES["2x16"]
    inputs = lean.block_inputs(model, 2, txt, hw)
    per = lean.measure_policy_bytes(model, inputs)
    print(f"\nsaved bytes per block (torch references, batch 2, {txt}+{hw[0] * hw[1]} tokens): {per}")
    stream = 2 * (txt + hw[0] * hw[1]) * model.inner_dim * 4
    for kind, b in per.items():
        # full keeps its inputs (the two streams and temb) and nothing else
        assert b["full"] == stream + 2 * model.inner_dim * 4
        # lean keeps only the matmul and attention outputs (the elementwise chains are recomputed)
        assert b["full"] < b["lean"] <= 0.5 * b["none"]
    kinds = ["double", "single", "single"]
    full = sum(per[k]["full"] for k in kinds)
    assert lean.plan_budget(kinds, per, 10**12) == ["lean"] * 3
    assert lean.plan_budget(kinds, per, full) == ["full"] * 3
    cheapest = min(("double", "single"), key=lambda k: per[k]["lean"] - per[k]["full"])
    one = lean.plan_budget(kinds, per, full + per[cheapest]["lean"] - per[cheapest]["full"])
    assert one.count("lean") == 1 and kinds[one.index("lean")] == cheapest
    with pytest.warns(UserWarning, match="budget"):
        assert lean.plan_budget(kinds, per, full - 1) == ["full"] * 3
    info = lean.apply_policy(model, "budget", budget_bytes=full + 10**9, inputs=inputs)
    assert info["counts"] == {"lean": 4}


def test_leapalign_step_same_gradients_under_every_policy():
    from engine.flux.tiny import HashTextEncoder, build_tiny_flux, tiny_transformer_config
    from engine.flux.adapter import FluxAdapter
    from engine.leap import leapalign
    from engine.rewards.colour import ColourReward
    from engine.schedule import flux_sigmas

    base = build_tiny_flux(seed=0)
    cfg = tiny_transformer_config()
    prompts = ["a red car", "a blue sky at night"]
    pe, pooled = HashTextEncoder(cfg["joint_attention_dim"], cfg["pooled_projection_dim"]).encode(prompts)
    size = 48, 80  # 3 x 5 packed image tokens
    x1 = base.noise(2, *size, generator=torch.Generator().manual_seed(4))
    sigmas = flux_sigmas(4, base.image_seq_len(*size))
    reward_model = ColourReward()

    grads = {}
    for policy in ("none", "full", "lean"):
        adapter = FluxAdapter(copy.deepcopy(base.transformer), base.vae)
        lean.apply_policy(adapter.transformer, policy)
        cond = adapter.condition(pe, pooled, *size)

        def reward(x0):
            return reward_model(adapter.decode(x0, *size), prompts)

        out = leapalign(adapter.velocity_fn(cond), reward, x1, sigmas, k=1, j=2, alpha=0.3, lam=2.0)
        out.loss.backward()
        grads[policy] = {n: p.grad for n, p in adapter.transformer.named_parameters()}
    assert max(g.abs().max().item() for g in grads["none"].values()) > 1e-3  # the step does train
    for policy in ("full", "lean"):
        for name, g in grads["none"].items():
            assert rel_err(grads[policy][name], g) <= TOL, (policy, name)


# --------------------------------------------------------------------------- Triton (interpreter)
def _triton_checks():
    """Run in a subprocess with TRITON_INTERPRET=1 and LEAPALIGN_BACKEND=triton."""
    import triton

    assert triton.knobs.runtime.interpret, "TRITON_INTERPRET=1 must be set before triton's import"
    for policy, width, lora in [("lean", "2x16", None), ("lean", "3x8", "before"), ("full", "3x8", None)]:
        info = check_policy(policy, width, lora, batch=1, layers=(1, 1))
        assert {info["kernels"][op] for op in FUSED_OPS} == {"triton"}, info["kernels"]
        print(f"{policy} {width} lora={lora}: matches diffusers; {info['attention']}, {info['kernels']}")

    model = make_model("2x16", layers=(1, 1))
    txt, hw = SHAPES["2x16"]
    inputs = lean.block_inputs(model, 2, txt, hw)
    per = lean.measure_policy_bytes(model, inputs)
    print(f"saved bytes per block (triton, batch 2, {txt}+{hw[0] * hw[1]} tokens, width 32): {per}")
    for b in per.values():
        assert b["full"] < b["lean"] < b["none"], per

    lean.apply_policy(model, "lean")
    saved = []
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
            outs = block(**inputs)
    assert saved == [] and all(o.grad_fn is None for o in outs)
    print("no-grad lean forward: 0 saved tensors")


def test_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "LEAPALIGN_BACKEND": "triton"}
    proc = subprocess.run([sys.executable, "-c", "from tests.test_lean import _triton_checks; _triton_checks()"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_lean_matches_diffusers(dtype, monkeypatch):
    """On a GPU (triton / csrc / flash-attn as available) against fp32 diffusers: the lean model
    is as close to it as diffusers itself is in the same dtype."""
    monkeypatch.delenv("LEAPALIGN_BACKEND")
    ref32 = make_model("2x16").cuda()
    inputs = {k: v.cuda() for k, v in model_inputs("2x16").items()}
    want = forward_backward(ref32, inputs)

    def run(policy):
        model = copy.deepcopy(ref32).to(dtype)
        model.zero_grad(set_to_none=True)  # the copy carries ref32's gradients
        lean.apply_policy(model, policy)
        cast = {k: v.to(dtype) if k in ("hidden_states", "encoder_hidden_states", "pooled_projections")
                else v for k, v in inputs.items()}
        with backend.recording() as ran:
            out = forward_backward(model, cast)
        return model, out, ran

    _, plain, _ = run("none")
    model, fused, ran = run("lean")
    info = lean.describe(model, ran)
    assert {info["kernels"][op] for op in FUSED_OPS} <= {"triton", "cuda"}, info
    print(f"\n{dtype}: {info['attention']}, {info['kernels']}")
    slack = 5e-3 if dtype == torch.bfloat16 else 1e-5
    for name in want[1]:
        e_plain = rel_err(plain[1][name].float(), want[1][name])
        e_fused = rel_err(fused[1][name].float(), want[1][name])
        assert e_fused <= 2 * e_plain + slack, (name, e_fused, e_plain)
    e_plain, e_fused = rel_err(plain[0].float(), want[0]), rel_err(fused[0].float(), want[0])
    assert e_fused <= 2 * e_plain + slack, ("output", e_fused, e_plain)
