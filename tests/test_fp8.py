"""fp8 storage of the frozen base (kernels/fp8_linear.py, engine.build.apply_fp8_base).

Bounds tested (kernels/fp8_linear.py derives them):
* per weight:  |dequantize(quantize(w)) - w| <= 2^-4 |w| + 2^-10 s   (s: the row's scale)
* per output:  |y_fp8 - y| <= 2^-4 (|x| @ |w|^T) + 2^-10 s sum|x|     (+ fp32 / bf16 rounding)
* fp8 compute: with x quantized per row too, (|x| + ex) @ (|w| + ew)^T - |x| @ |w|^T
* whole tiny Flux + LoRA (fp32 compute): output and the LoRA gradients within 2^-6 relative
  (Frobenius) of the unconverted model; measured 0.0039 and 0.0069.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from engine import build
from engine.config import LoraConfig, load_config
from engine.flux.tiny import build_tiny_flux
from kernels import fp8_linear as f8
from kernels.fp8_linear import REL_BOUND, SUB_BOUND, Fp8Linear


def weights(out=67, inp=45, seed=0):
    """Odd sizes, rows spanning 6 decades (so e4m3's subnormals are hit), an all-zero row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * torch.logspace(-3, 3, out).unsqueeze(1)
    w[:, :5] *= 1e-4        # far below each row's max: subnormal after scaling
    w[3] = 0.0
    return w


def linear_bound(x, w, scale):
    return REL_BOUND * (x.abs() @ w.abs().t()) + SUB_BOUND * x.abs().sum(-1, keepdim=True) * scale


# --------------------------------------------------------------------------- quantization
def test_round_trip_within_the_e4m3_bound():
    w = weights()
    q, s = f8.quantize_rowwise(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (w.shape[0],)
    d = f8.dequantize_rowwise(q, s, torch.float32)
    err = (d - w).abs()
    bound = REL_BOUND * w.abs() + SUB_BOUND * s.unsqueeze(1)
    assert (err <= bound * (1 + 1e-6)).all()
    assert (err / bound).max() > 0.5            # the bound is tight, not vacuous
    assert (d[3] == 0).all() and s[3] == 1      # a zero row stays zero, with a harmless scale
    nz = torch.arange(w.shape[0]) != 3
    # each row's largest weight lands on e4m3's largest code (the row uses the full range)
    assert torch.equal(q.float().abs().amax(1)[nz], torch.full((int(nz.sum()),), f8.E4M3_MAX))
    assert len(torch.unique(q.float())) <= 256
    # into bf16: the exact fp32 product, rounded once
    assert torch.equal(f8.dequantize_rowwise(q, s, torch.bfloat16), (q.float() * s.unsqueeze(1)).bfloat16())


def test_quantize_in_row_blocks_is_the_same(monkeypatch):
    w = weights()
    q, s = f8.quantize_rowwise(w)
    monkeypatch.setattr(f8, "_CHUNK", 45 * 4 + 7)      # 4 rows a block, the last one short
    q2, s2 = f8.quantize_rowwise(w)
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="2-d"):
        f8.quantize_rowwise(torch.ones(3))
    with pytest.raises(ValueError, match="floating-point"):
        f8.quantize_rowwise(torch.ones(2, 2, dtype=torch.int32))


# --------------------------------------------------------------------------- the linear op
def noncontiguous_input(inp, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, inp, 14, generator=g).transpose(1, 2)[:, ::2]     # (3, 7, inp), strided
    assert not x.is_contiguous()
    return x


def test_linear_within_bound_fp32_odd_sizes_noncontiguous():
    w = weights()
    b = torch.randn(w.shape[0])
    lin = torch.nn.Linear(w.shape[1], w.shape[0]).requires_grad_(False)
    lin.weight.copy_(w), lin.bias.copy_(b)
    m = Fp8Linear.from_linear(lin)
    x = noncontiguous_input(w.shape[1])
    y, want = m(x), lin(x)
    assert y.shape == want.shape == (3, 7, w.shape[0])
    assert ((y - want).abs() <= linear_bound(x, w, m.weight_scale) + 1e-5 * want.abs() + 1e-6).all()
    assert (y - want).abs().max() > 1e-4        # it really ran on fp8 weights
    # and it is exactly the dequantize-then-matmul reference
    ref = f8.fp8_linear_reference(x, m.weight_e4m3, m.weight_scale, m.bias, torch.float32)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)


def test_linear_within_bound_bf16():
    w = weights(48, 40, seed=2) / 1e3
    lin = torch.nn.Linear(40, 48, bias=False).requires_grad_(False)
    lin.weight.copy_(w)
    m = Fp8Linear.from_linear(lin.to(torch.bfloat16))
    x = noncontiguous_input(40).to(torch.bfloat16)
    y = m(x)
    assert y.dtype == torch.bfloat16
    want = F.linear(x.float(), w)
    # + one bf16 rounding of the dequantized weight and one of the output (2^-8 each, relative)
    extra = 2 * 2.0 ** -8 * (x.float().abs() @ w.abs().t())
    assert ((y.float() - want).abs() <= linear_bound(x.float(), w, m.weight_scale) + extra).all()


def test_input_gradient_and_what_backward_keeps():
    w = weights(32, 24, seed=3)
    lin = torch.nn.Linear(24, 32).requires_grad_(False)
    lin.weight.copy_(w)
    m = Fp8Linear.from_linear(lin)
    x = torch.randn(5, 24, requires_grad=True)
    dy = torch.randn(5, 32)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = m(x)
    y.backward(dy)
    assert m.weight.grad is None and m.bias.grad is None and not m.weight.requires_grad
    torch.testing.assert_close(x.grad, dy @ m.dequantized_weight(torch.float32), rtol=1e-6, atol=1e-6)
    # only the fp8 codes and their scales are kept, never a dequantized weight
    assert {t.dtype for t in saved} == {torch.float8_e4m3fn, torch.float32}
    assert [tuple(t.shape) for t in saved if t.dtype == torch.float32] == [(32,)]

    saved.clear()   # the plain-autograd reference does keep the dequantized weight: the test can tell
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        f8.fp8_linear_reference(x, m.weight_e4m3, m.weight_scale, m.bias, torch.float32)
    assert any(t.dtype == torch.float32 and t.numel() == 32 * 24 for t in saved)


def test_input_size_mismatch_is_one_line():
    m = Fp8Linear.from_linear(torch.nn.Linear(8, 4).requires_grad_(False))
    with pytest.raises(ValueError, match="input has 5 features, the weight expects 8"):
        m(torch.randn(2, 5))


def test_trainable_linear_is_refused_and_dtype_cast_leaves_codes():
    with pytest.raises(ValueError, match="frozen"):
        Fp8Linear.from_linear(torch.nn.Linear(4, 4))
    m = Fp8Linear.from_linear(torch.nn.Linear(16, 16).requires_grad_(False))
    codes = m.weight.clone()
    m.to(torch.bfloat16)           # a model-wide dtype cast must not turn codes into numbers
    assert m.weight.dtype == torch.uint8 and torch.equal(m.weight, codes)


def test_fp8_compute_reference_within_bound():
    w = weights(48, 32, seed=4)
    q, s = f8.quantize_rowwise(w)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(5)) * torch.logspace(-2, 2, 5).unsqueeze(1)
    y = f8.fp8_compute_reference(x, q, s, None)
    xs = x.abs().amax(-1, keepdim=True) / f8.E4M3_MAX
    ex = REL_BOUND * x.abs() + SUB_BOUND * xs
    ew = REL_BOUND * w.abs() + SUB_BOUND * s.unsqueeze(1)
    bound = (x.abs() + ex) @ (w.abs() + ew).t() - x.abs() @ w.abs().t()
    want = x @ w.t()
    assert ((y - want).abs() <= bound * (1 + 1e-5) + 1e-6).all()
    assert not torch.equal(y, f8.fp8_linear_reference(x, q, s, None, torch.float32))   # x was quantized too


# --------------------------------------------------------------------------- where fp8 compute can run
def test_fp8_compute_capability_check(monkeypatch):
    assert "CUDA" in f8.fp8_compute_unavailable(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for cap, ok in (((8, 6), False), ((8, 0), False), ((8, 9), True), ((9, 0), True), ((10, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=cap: c)
        why = f8.fp8_compute_unavailable(torch.device("cuda"))
        assert (why is None) == ok, (cap, why)
        if not ok:
            assert f"sm_{cap[0]}{cap[1]}" in why and "sm_89" in why


def test_rollout_mode_refused_on_cpu():
    tr = lora_flux()
    with pytest.raises(RuntimeError, match="fp8-rollout cannot run: .*sm_89.*model is on cpu"):
        build.apply_fp8_base(tr, "rollout")
    assert not any(isinstance(m, Fp8Linear) for m in tr.modules())   # nothing converted
    from engine import LeapTrainer

    cfg = load_config(None, ["model.base_precision=fp8-rollout", "lora.enabled=true", "device=cpu"])
    with pytest.raises(RuntimeError, match=r"^model.base_precision=fp8-rollout cannot run: [^\n]*$"):
        LeapTrainer(cfg)


def test_fp8_compute_refuses_autograd_inputs():
    m = Fp8Linear.from_linear(torch.nn.Linear(16, 16).requires_grad_(False))
    with pytest.raises(RuntimeError, match="no backward"):
        f8.fp8_compute_linear(torch.randn(2, 16, requires_grad=True), m.weight_e4m3, m.weight_scale)


def check_fp8_compute(device):
    lin = torch.nn.Linear(64, 48).requires_grad_(False).to(device, torch.bfloat16)
    m = Fp8Linear.from_linear(lin, compute="fp8")
    x = noncontiguous_input(64).to(device, torch.bfloat16)
    with torch.no_grad():
        y = m(x)
    ref = f8.fp8_compute_reference(x, m.weight_e4m3, m.weight_scale, m.bias)
    # the same fp8 operands: only the summation order and the bf16 roundings (of the product, then
    # of the bias sum; 2^-8 each) differ, relative to the magnitudes summed, not to y (cancellation)
    scale = x.float().abs() @ m.dequantized_weight(torch.float32).abs().t() + m.bias.float().abs()
    assert ((y.float() - ref.float()).abs() <= 2 ** -7 * scale + 1e-6).all()
    assert not torch.equal(y, f8.fp8_weight_linear(x, m.weight_e4m3, m.weight_scale, m.bias))
    xg = x.detach().requires_grad_(True)     # with grad on, the same module takes the weight path
    m(xg).float().sum().backward()
    want = torch.ones(3, 7, 48, dtype=torch.bfloat16, device=device) @ m.dequantized_weight(torch.bfloat16)
    torch.testing.assert_close(xg.grad, want)


def test_fp8_compute_path_matches_its_reference_on_cpu():
    """torch's CPU build runs _scaled_mm too (slowly): the call's layouts, scales and shapes are
    checked here; the "rollout" mode still refuses the CPU, where fp8 buys no speed."""
    try:
        check_fp8_compute("cpu")
    except NotImplementedError as e:     # a build without the CPU kernel: the GPU test covers it
        pytest.skip(f"no CPU _scaled_mm: {e}")


@pytest.mark.gpu
def test_fp8_compute_on_gpu_matches_its_reference():
    why = f8.fp8_compute_unavailable(torch.device("cuda"))
    if why:
        pytest.skip(why)
    check_fp8_compute("cuda")


# --------------------------------------------------------------------------- tiny Flux with LoRA
def lora_flux(seed=0):
    tr = build_tiny_flux(seed).transformer
    build.apply_lora(tr, LoraConfig(enabled=True, rank=4, alpha=8), seed)
    g = torch.Generator().manual_seed(seed + 1)
    for n, p in tr.named_parameters():    # B starts at zero: give A a gradient too
        if "lora_B" in n:
            p.data.normal_(0, 0.05, generator=g)
    return tr


def flux_inputs(tr, batch=2, side=4, text=8):
    c = tr.config
    g = torch.Generator().manual_seed(2)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side * 1.0), torch.arange(side * 1.0),
                                     indexing="ij"), -1).reshape(-1, 3)
    return dict(hidden_states=torch.randn(batch, side * side, c.in_channels, generator=g),
                encoder_hidden_states=torch.randn(batch, text, c.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(batch, c.pooled_projection_dim, generator=g),
                timestep=torch.full((batch,), 0.6), img_ids=ids, txt_ids=torch.zeros(text, 3),
                guidance=torch.full((batch,), 3.5), return_dict=False)


def out_and_lora_grads(tr):
    tr.zero_grad(set_to_none=True)
    out = tr(**flux_inputs(tr))[0]
    (out ** 2).mean().backward()
    grads = {n: p.grad.clone() for n, p in tr.named_parameters() if p.requires_grad}
    return out.detach(), grads


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def pair():
    ref = lora_flux()
    conv = copy.deepcopy(ref)
    info = build.apply_fp8_base(conv, "weight")
    return ref, conv, info


def test_every_frozen_block_linear_converted_lora_untouched(pair):
    ref, conv, info = pair
    blocks = [*conv.transformer_blocks, *conv.single_transformer_blocks]
    frozen = [m for b in blocks for m in b.modules() if type(m) is torch.nn.Linear
              and not any(p.requires_grad for p in m.parameters())]
    assert frozen == []
    # tiny Flux: 14 linears per double block, 6 per single block
    assert info == {"converted": 14 + 2 * 6, "fp8_compute": 0}
    outside = [n for n, m in conv.named_modules() if isinstance(m, Fp8Linear)
               and not n.startswith(("transformer_blocks.", "single_transformer_blocks."))]
    assert outside == [] and type(conv.proj_out.base_layer) is torch.nn.Linear   # embedders, output: as loaded
    assert isinstance(conv.transformer_blocks[0].attn.to_q.base_layer, Fp8Linear)
    assert isinstance(conv.transformer_blocks[0].norm1.linear, Fp8Linear)      # untargeted, converted too
    assert type(conv.transformer_blocks[0].attn.to_q.lora_A["default"]) is torch.nn.Linear
    assert set(build.trainable_parameters(conv)) == set(build.trainable_parameters(ref))


def test_tiny_flux_output_and_lora_grads_within_bound(pair):
    ref, conv, _ = pair
    (o_ref, g_ref), (o, g) = out_and_lora_grads(ref), out_and_lora_grads(conv)
    assert set(g) == set(g_ref) and len(g) == 46
    flat = lambda d: torch.cat([d[n].flatten() for n in sorted(d)])
    # 2^-6: a quarter of the per-weight bound (the rounding errors are independent, they average
    # out over a dot product); measured 0.0039 (output) and 0.0069 (gradients)
    assert 1e-5 < rel(o, o_ref) < 2 ** -6
    assert 1e-5 < rel(flat(g), flat(g_ref)) < 2 ** -6


def test_lean_policy_on_fp8_base_same_grads(pair):
    _, conv, _ = pair
    lean = copy.deepcopy(conv)
    build.apply_policy(lean, load_config(None, ["model.policy=lean"]).model)
    (o, g), (o_lean, g_lean) = out_and_lora_grads(conv), out_and_lora_grads(lean)
    torch.testing.assert_close(o_lean, o, rtol=1e-4, atol=1e-5)
    for n in g:
        torch.testing.assert_close(g_lean[n], g[n], rtol=1e-4, atol=1e-6)


def test_lora_state_and_export_unchanged(pair, tmp_path):
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from engine.export import export_lora, export_transformer

    ref, conv, _ = pair
    s_ref, s = get_peft_model_state_dict(ref), get_peft_model_state_dict(conv)
    assert list(s) == list(s_ref)
    assert all(torch.equal(s[k], s_ref[k]) for k in s)
    export_lora(ref, tmp_path / "ref")
    export_lora(conv, tmp_path / "fp8")
    a, b = (load_file(tmp_path / d / "pytorch_lora_weights.safetensors") for d in ("ref", "fp8"))
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="stored in fp8"):
        export_transformer(conv, tmp_path / "merged")


def test_converted_state_dict_round_trip(pair):
    _, conv, _ = pair
    other = lora_flux(seed=5)
    build.apply_fp8_base(other, "weight")
    sd = conv.state_dict()
    assert sd["transformer_blocks.0.attn.to_q.base_layer.weight"].dtype == torch.uint8
    assert "transformer_blocks.0.attn.to_q.base_layer.weight_scale" in sd
    other.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(other(**flux_inputs(other))[0], conv(**flux_inputs(conv))[0], rtol=0, atol=0)


def test_apply_again_and_bad_modes(pair):
    _, conv, _ = pair
    codes = conv.transformer_blocks[0].attn.to_q.base_layer.weight.clone()
    assert build.apply_fp8_base(conv, "weight") == {"converted": 26, "fp8_compute": 0}    # no re-quantization
    assert torch.equal(conv.transformer_blocks[0].attn.to_q.base_layer.weight, codes)
    with pytest.raises(ValueError, match="already stored in fp8"):
        build.apply_fp8_base(conv, "none")
    with pytest.raises(ValueError, match="must be one of"):
        build.apply_fp8_base(conv, "fp4")
    fresh = lora_flux()
    assert build.apply_fp8_base(fresh, "none") == {"converted": 0, "fp8_compute": 0}
    assert not any(isinstance(m, Fp8Linear) for m in fresh.modules())


# --------------------------------------------------------------------------- config
def test_config_base_precision():
    assert load_config(None).model.base_precision == "bf16"
    assert load_config(None, ["model.base_precision=fp8", "lora.enabled=true"]).model.base_precision == "fp8"
    with pytest.raises(ValueError, match="model.base_precision must be one of"):
        load_config(None, ["model.base_precision=int4", "lora.enabled=true"])
    with pytest.raises(ValueError, match="needs lora.enabled=true"):
        load_config(None, ["model.base_precision=fp8"])
    with pytest.raises(ValueError, match="distributed=fsdp"):
        load_config(None, ["model.base_precision=fp8-rollout", "lora.enabled=true", "distributed=fsdp"])


def test_build_trainable_applies_it():
    cfg = load_config(None, ["model.base_precision=fp8", "lora.enabled=true", "lora.rank=2"])
    tr = build.build_trainable(cfg, torch.device("cpu"), load_vae=False).transformer
    assert isinstance(tr.single_transformer_blocks[1].proj_out.base_layer, Fp8Linear)


def test_fp8_base_reaches_the_device_layer_by_layer():
    """On a GPU build_model leaves an fp8 base's transformer on the CPU and apply_fp8_base takes it
    over one fp8 layer at a time; "meta" stands in for the GPU (any device but the CPU stages)."""
    cfg = load_config(None, ["model.base_precision=fp8", "lora.enabled=true", "lora.rank=2"])
    meta = torch.device("meta")
    ad = build.build_model(cfg.model, meta)
    assert ad.transformer.device.type == "cpu" and next(ad.vae.parameters()).device == meta
    build.apply_lora(ad.transformer, cfg.lora, cfg.seed)
    info = build.apply_fp8_base(ad.transformer, "weight", meta)
    assert info["converted"] == 26
    assert {t.device for t in [*ad.transformer.parameters(), *ad.transformer.buffers()]} == {meta}
    assert ad.transformer.transformer_blocks[0].attn.to_k.base_layer.weight.dtype == torch.uint8
    bf16 = build.build_model(load_config(None).model, meta)    # the bf16 base is placed at load, as before
    assert bf16.transformer.device == meta


# --------------------------------------------------------------------------- fake tensors
def test_conversion_under_fake_tensors_halves_the_base():
    """FLUX.1-dev's widths (3072, MLP 12288, text 4096) with 1 + 1 blocks, on fake tensors."""
    from bench.fp8_base import measure
    from bench.measure import FLUX_DEV_CONFIG

    r = measure(dict(FLUX_DEV_CONFIG, num_layers=1, num_single_layers=1), rank=4)
    assert r["converted"] == 14 + 6
    # each converted weight: 2 bytes -> 1 byte, plus a 4-byte scale per output row; all else as it was.
    # Weights of d x d units: double block 8 (attention, both streams) + 16 (two MLPs) + 12 (two
    # modulations), single block 3 (q k v) + 4 (proj_mlp) + 5 (proj_out) + 3 (modulation).
    d = 3072
    weights_dd, out_rows = 36 + 15, 30 + 11
    assert r["bf16"] - r["fp8"] == weights_dd * d * d - 4 * out_rows * d


# --------------------------------------------------------------------------- a run on the fp8 base
def test_trainer_step_checkpoint_and_exports(tmp_path):
    from engine import LeapTrainer
    from engine import checkpoint as ckpt
    from engine.export import export_checkpoint

    over = ["model.height=32", "model.width=32", "num_steps=3", "samples=1", "optim.lr=1e-2",
            "lora.enabled=true", "lora.rank=4", f"output_dir={tmp_path}"]
    t = LeapTrainer(load_config(None, [*over, "model.base_precision=fp8"]))
    assert isinstance(t.transformer.transformer_blocks[0].ff.net[2].base_layer, Fp8Linear)
    before = {n: p.detach().clone() for n, p in t.params.items()}
    assert torch.isfinite(torch.tensor(t.step()["loss"]))
    assert any(not torch.equal(before[n], p) for n, p in t.params.items())      # LoRA trained
    t.save_checkpoint(tmp_path / "ck.safetensors")
    # the checkpoint holds only the LoRA weights: it loads into the bf16 base as into the fp8 one
    for prec in ("bf16", "fp8"):
        cfg = load_config(None, [*over, f"model.base_precision={prec}"])
        tr = build.build_trainable(cfg, torch.device("cpu"), load_vae=False).transformer
        ckpt.load_weights(tmp_path / "ck.safetensors", tr)
        got = build.trainable_parameters(tr)
        assert set(got) == set(t.params) and all(torch.equal(got[n], t.params[n]) for n in got)
    # the merged export is LoRA on the bf16 base, whatever the run stored
    out = export_checkpoint(tmp_path / "ck.safetensors", tmp_path / "merged")
    assert (out / "config.json").is_file()
    assert (export_checkpoint(tmp_path / "ck.safetensors", tmp_path / "lora", lora=True)
            / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_compiles_whole_graph_forward_and_backward():
    m = Fp8Linear.from_linear(torch.nn.Linear(24, 40).requires_grad_(False))
    x = torch.randn(3, 24, requires_grad=True)
    y = m(x)
    y.sum().backward()
    want, x.grad = x.grad, None
    yc = torch.compile(m, backend="aot_eager", fullgraph=True)(x)   # no graph break, autograd traced
    yc.sum().backward()
    assert torch.equal(yc, y) and torch.equal(x.grad, want)
