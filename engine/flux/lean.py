"""Memory-lean forwards for diffusers' Flux blocks, swapped in per block (design.md, "The
memory-lean backward").

``apply_policy(transformer, policy)`` rebinds ``forward`` on each block of
``transformer.transformer_blocks`` / ``single_transformer_blocks`` as an instance attribute. No
module is replaced or wrapped, so parameter names, the state_dict, ``save_pretrained`` and peft's
LoRA layers are untouched: the lean forwards call the block's own submodules (``attn.to_q``,
``norm1.linear``, ``ff.net[0].proj``, ``proj_mlp``, ``proj_out``, ...), whatever peft has put
there, before or after the swap.

Policies:
  none    diffusers' own forward, plain autograd.
  lean    the fused ops of ``kernels``: modulated LayerNorm, QK RMSNorm + RoPE, GELU-tanh and the
          gated residual (fused with the next modulated norm in the double block); attention
          through flash-attn (CUDA, fp16/bf16, when importable) else SDPA. Under selective
          activation checkpointing: the outputs of the matmuls and of attention are kept, every
          elementwise chain is recomputed in the backward (by the same fused kernels). So no
          matmul and no attention forward runs twice, and what stays between forward and
          backward is the block input, the projections and the attention output/logsumexp.
  full    non-reentrant ``torch.utils.checkpoint`` around the lean forward: saves the block's
          inputs, recomputes the rest. The inner forward is the lean one, so the recompute and
          the no-grad rollout run the fused ops too.
  budget  ``lean`` on as many blocks as fit ``budget_bytes`` of saved activations, ``full`` on
          the rest (:func:`plan_budget`).
Under ``torch.no_grad()`` (the rollout) lean and full run the same fused forward and save nothing.

Numerics follow diffusers 0.42 (fp32 to ~1e-5): its RMSNorms are ``torch.nn.RMSNorm`` (fp32
math, rounded to the input dtype), ``apply_rotary_emb`` computes in fp32, and the blocks clip to
+-65504 in fp16 (the double block its text stream, the single block the joint stream; diffusers
0.42 has no ``.float()`` upcast there). In bf16/fp16 the fused ops round once where diffusers
rounds after each elementwise op, so low-precision results agree to rounding, not bit for bit.
"""
from __future__ import annotations

import functools
import inspect
import types
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import (
    FluxAttnProcessor,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
    _get_qkv_projections,  # handles diffusers' fused qkv projections too
)

from engine.memory import held_bytes
from kernels import backend
from kernels.gated_residual import gated_residual
from kernels.gelu_tanh import gelu_tanh
from kernels.mod_layernorm import mod_layernorm
from kernels.qk_norm_rope import qk_norm_rope

__all__ = ["ATTENTION", "POLICIES", "apply_policy", "attention", "block_inputs",
           "describe", "measure_policy_bytes", "measure_saved_bytes", "plan_budget", "policy_of"]

from engine.params import BLOCK_POLICIES as POLICIES  # noqa: E402  (shared with the config check)
_POLICY_ATTR = "_leapalign_policy"
# The key under which the lean blocks' attention notes what ran in a ``kernels.backend.recording()``.
ATTENTION = "attention"


# --------------------------------------------------------------------------- attention
@functools.lru_cache(maxsize=None)
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


def _sdpa_name(q, k, v) -> str:
    # torch's own dispatcher decision for these inputs (private; "sdpa" alone if it goes away).
    try:
        return "sdpa:" + SDPBackend(torch._fused_sdp_choice(q, k, v)).name.lower()
    except (AttributeError, RuntimeError, ValueError):
        return "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal attention on (B, N, H, Dh) tensors; returns (B, N, H*Dh).

    What ran ("flash-attn" or "sdpa:<backend>") is noted in any open ``backend.recording()``."""
    fa = _flash_attn_func()
    if fa is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        name, out = "flash-attn", fa(q, k, v)
    else:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # SDPA wants (B, H, N, Dh), as diffusers
        name = None if torch.compiler.is_compiling() else _sdpa_name(q, k, v)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    if name is not None:
        backend.note(ATTENTION, name)
    return out.flatten(2, 3)


# --------------------------------------------------------------------------- lean forwards
def _modulation(norm, temb: torch.Tensor, n: int):
    return norm.linear(norm.silu(temb)).chunk(n, dim=1)


def _heads(attn, t: torch.Tensor) -> torch.Tensor:
    return t.unflatten(-1, (-1, attn.head_dim))


def _qk_norm_rope(attn, q, k, rotary, n_txt: int):
    if rotary is None:
        raise ValueError("the lean Flux forward needs image_rotary_emb (FluxTransformer2DModel passes it)")
    cos, sin = (t.to(q.device) for t in rotary)
    txt = dict(wq_txt=attn.norm_added_q.weight, wk_txt=attn.norm_added_k.weight, n_txt=n_txt) if n_txt else {}
    return qk_norm_rope(q, k, attn.norm_q.weight, attn.norm_k.weight, cos, sin, attn.norm_q.eps, **txt)


def _no_attention_kwargs(joint_attention_kwargs) -> None:
    if joint_attention_kwargs:
        raise NotImplementedError(
            f"lean Flux blocks take no joint_attention_kwargs (got {sorted(joint_attention_kwargs)})")


def _residual_mlp(ff, norm2, x, gate, attn_out, scale_mlp, shift_mlp, gate_mlp):
    # x + gate*attn feeds straight into norm2's modulated LayerNorm: one fused pass, which also
    # keeps the new residual stream out of the saved tensors (its backward recomputes it).
    x, h = gated_residual(x, gate, attn_out, scale_mlp, shift_mlp, norm2.eps)
    act, *rest = ff.net  # GELU(proj, tanh), Dropout, Linear
    h = gelu_tanh(act.proj(h))
    for m in rest:
        h = m(h)
    return gated_residual(x, gate_mlp, h)


def _double_lean(self: FluxTransformerBlock, hidden_states, encoder_hidden_states, temb,
                 image_rotary_emb=None, joint_attention_kwargs=None):
    _no_attention_kwargs(joint_attention_kwargs)
    attn, n_txt = self.attn, encoder_hidden_states.shape[1]
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = _modulation(self.norm1, temb, 6)
    c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = _modulation(self.norm1_context, temb, 6)
    x = mod_layernorm(hidden_states, scale, shift, self.norm1.norm.eps)
    c = mod_layernorm(encoder_hidden_states, c_scale, c_shift, self.norm1_context.norm.eps)

    q, k, v, cq, ck, cv = (_heads(attn, t) for t in _get_qkv_projections(attn, x, c))
    # Text tokens first, as FluxAttnProcessor concatenates them; the kernel picks the
    # norm_added_* weights for tokens [0, n_txt).
    q, k, v = torch.cat([cq, q], dim=1), torch.cat([ck, k], dim=1), torch.cat([cv, v], dim=1)
    q, k = _qk_norm_rope(attn, q, k, image_rotary_emb, n_txt)
    out = attention(q, k, v).to(q.dtype)
    c_out, out = out.split_with_sizes([n_txt, out.shape[1] - n_txt], dim=1)
    out = attn.to_out[1](attn.to_out[0](out.contiguous()))
    c_out = attn.to_add_out(c_out.contiguous())

    hidden_states = _residual_mlp(self.ff, self.norm2, hidden_states, gate, out,
                                  scale_mlp, shift_mlp, gate_mlp)
    encoder_hidden_states = _residual_mlp(self.ff_context, self.norm2_context, encoder_hidden_states,
                                          c_gate, c_out, c_scale_mlp, c_shift_mlp, c_gate_mlp)
    if encoder_hidden_states.dtype == torch.float16:  # as diffusers: text stream only
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


def _single_lean(self: FluxSingleTransformerBlock, hidden_states, encoder_hidden_states, temb,
                 image_rotary_emb=None, joint_attention_kwargs=None):
    _no_attention_kwargs(joint_attention_kwargs)
    attn, n_txt = self.attn, encoder_hidden_states.shape[1]
    x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    shift, scale, gate = _modulation(self.norm, temb, 3)
    n = mod_layernorm(x, scale, shift, self.norm.norm.eps)
    mlp = gelu_tanh(self.proj_mlp(n))
    q, k, v = (_heads(attn, t) for t in _get_qkv_projections(attn, n)[:3])
    q, k = _qk_norm_rope(attn, q, k, image_rotary_emb, 0)
    out = attention(q, k, v).to(q.dtype)
    x = gated_residual(x, gate, self.proj_out(torch.cat([out, mlp], dim=2)))
    if x.dtype == torch.float16:
        x = x.clip(-65504, 65504)
    return x[:, :n_txt], x[:, n_txt:]


def _lean_fn(block):
    return _double_lean if isinstance(block, FluxTransformerBlock) else _single_lean


_aten = torch.ops.aten
# Ops whose outputs a lean block keeps: the matmuls and attention, the expensive part of a block.
# Everything else (the fused elementwise ops, cats, splits, copies) is recomputed in backward.
_KEEP = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default,
         _aten._scaled_dot_product_flash_attention.default,
         _aten._scaled_dot_product_flash_attention_for_cpu.default,
         _aten._scaled_dot_product_efficient_attention.default,
         _aten._scaled_dot_product_cudnn_attention.default}
if hasattr(torch.ops, "flash_attn") and hasattr(torch.ops.flash_attn, "_flash_attn_forward"):
    _KEEP.add(torch.ops.flash_attn._flash_attn_forward.default)


def _keep_matmuls(ctx, op, *args, **kwargs):
    if op not in _KEEP:
        return CheckpointPolicy.PREFER_RECOMPUTE
    # A low-rank up-projection (LoRA's lora_B: contraction over the rank r, output D wide) is as
    # big to keep as the base matmul's output but costs only r/D of its FLOPs to redo: keeping it
    # would double what a LoRA block holds, recomputing it adds ~2 % FLOPs at r=64, D=3072. Its
    # small input (lora_A's output, N x r) is kept.
    if op in (_aten.mm.default, _aten.addmm.default):
        a, b = args[-2], args[-1]
        if a.shape[-1] * 8 <= b.shape[-1]:
            return CheckpointPolicy.PREFER_RECOMPUTE
    return CheckpointPolicy.MUST_SAVE


def _checkpointed(fn, self, args, kwargs, context_fn=None):
    # diffusers calls blocks with keywords; checkpoint keeps keyword tensors in a closure, where
    # saved-tensor hooks cannot count them, and positional ones through save_for_backward.
    bound = inspect.signature(fn).bind(self, *args, **kwargs)
    extra = {"context_fn": context_fn} if context_fn is not None else {}
    return checkpoint(fn, *bound.args, use_reentrant=False, **extra)


def _lean_forward(self, *args, **kwargs):
    fn = _lean_fn(self)
    if not torch.is_grad_enabled():  # rollout: nothing to keep
        return fn(self, *args, **kwargs)
    return _checkpointed(fn, self, args, kwargs,
                         functools.partial(create_selective_checkpoint_contexts, _keep_matmuls))


def _full_forward(self, *args, **kwargs):
    fn = _lean_fn(self)
    if not torch.is_grad_enabled():  # rollout: nothing to checkpoint
        return fn(self, *args, **kwargs)
    return _checkpointed(fn, self, args, kwargs)


# --------------------------------------------------------------------------- swapping
def _check_block(block) -> None:
    """Refuse configurations the lean forwards do not reproduce, rather than silently differ."""
    attn = block.attn
    proc = attn.processor
    if type(proc) is not FluxAttnProcessor or proc._parallel_config is not None:
        raise NotImplementedError(f"lean Flux blocks support FluxAttnProcessor without context "
                                  f"parallelism, got {type(proc).__name__}")
    norms = [attn.norm_q, attn.norm_k]
    if isinstance(block, FluxTransformerBlock):
        norms += [attn.norm_added_q, attn.norm_added_k]
        gelus = [block.ff.net[0], block.ff_context.net[0]]
        if block.norm1.emb is not None or block.norm1_context.emb is not None:
            raise NotImplementedError("AdaLayerNormZero with its own embedding is not Flux's")
    elif isinstance(block, FluxSingleTransformerBlock):
        gelus = [block.act_mlp]
    else:
        raise TypeError(f"not a Flux block: {type(block).__name__}")
    if any(getattr(g, "approximate", None) != "tanh" for g in gelus):
        raise NotImplementedError("lean Flux blocks expect the GELU-tanh MLP activation")
    if any(m.weight is None or m.eps != norms[0].eps for m in norms):
        raise NotImplementedError("QK RMSNorms must have weights and one shared eps")


def policy_of(block) -> str:
    return getattr(block, _POLICY_ATTR, "none")


def _set_policy(block, policy: str) -> None:
    current = getattr(block.__dict__.get("forward"), "__func__", None)
    if "forward" in block.__dict__ and current not in (_lean_forward, _full_forward):
        # e.g. a diffusers hook (offloading, caching) wrapped forward: swapping would drop it.
        raise RuntimeError(f"{type(block).__name__}.forward is already replaced by something else; "
                           "apply the policy before registering hooks on the blocks")
    if policy == "none":
        block.__dict__.pop("forward", None)  # the class's (diffusers') forward shows through again
    else:
        fn = _lean_forward if policy == "lean" else _full_forward
        # A bound method in the instance dict: deepcopy rebinds it to the copy, and nothing
        # enters parameters, buffers or the state_dict.
        block.forward = types.MethodType(fn, block)
    setattr(block, _POLICY_ATTR, policy)


def _blocks(transformer: FluxTransformer2DModel):
    return list(transformer.transformer_blocks), list(transformer.single_transformer_blocks)


def apply_policy(transformer: FluxTransformer2DModel, policy: str, *, budget_bytes: int | None = None,
                 per_block_bytes: dict | None = None, inputs: dict | None = None) -> dict:
    """Set every block's forward to ``policy`` (see the module docstring); returns :func:`describe`.

    For ``"budget"``: ``budget_bytes`` bounds the summed saved bytes of all blocks;
    ``per_block_bytes`` is :func:`measure_policy_bytes`' result, measured here from ``inputs``
    (:func:`block_inputs`) when not given. Calling again replaces the previous policy.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if policy != "none" and getattr(transformer, "gradient_checkpointing", False):
        raise ValueError("diffusers' gradient checkpointing is on: it would wrap these forwards in a "
                         "second checkpoint; turn it off and use policy 'full' instead")
    doubles, singles = _blocks(transformer)
    for block in doubles + singles:
        _check_block(block)
    if policy == "budget":
        if budget_bytes is None:
            raise ValueError("policy 'budget' needs budget_bytes")
        if per_block_bytes is None:
            if inputs is None:
                raise ValueError("policy 'budget' needs per_block_bytes, or inputs to measure them")
            per_block_bytes = measure_policy_bytes(transformer, inputs)
        plan = plan_budget(["double"] * len(doubles) + ["single"] * len(singles), per_block_bytes,
                           budget_bytes)
    else:
        plan = [policy] * (len(doubles) + len(singles))
    for block, p in zip(doubles + singles, plan):
        _set_policy(block, p)
    return describe(transformer)


def describe(transformer: FluxTransformer2DModel, ran: dict[str, str] | None = None) -> dict:
    """Per-block policies; with ``ran``, the record of a ``kernels.backend.recording()`` around
    the forward/backward, also the attention and each fused op's backend that ran there
    (else None and {})."""
    doubles, singles = _blocks(transformer)
    double, single = [policy_of(b) for b in doubles], [policy_of(b) for b in singles]
    ran = ran or {}
    return {"double": double, "single": single,
            "counts": {p: (double + single).count(p) for p in sorted(set(double + single))},
            "attention": ran.get(ATTENTION), "kernels": {k: v for k, v in ran.items() if k != ATTENTION}}


# --------------------------------------------------------------------------- memory budget
def measure_saved_bytes(block: torch.nn.Module, inputs: dict) -> int:
    """Bytes the block's current forward leaves held for its backward on ``inputs``.

    Counted as the storages the forward creates that are still alive after it (its outputs
    excepted), so what selective checkpointing caches outside the autograd graph counts too.
    Parameters (LoRA included) are resident anyway and not counted. Every policy keeps the block's
    input streams and temb alive for its backward (``full`` keeps nothing else), so their bytes
    are added once.
    """
    tensors = [t for t in torch.utils._pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]
    with torch.enable_grad():
        out, held = held_bytes(lambda: block(**inputs), exclude=[*block.parameters(), *block.buffers(), *tensors])
    del out
    kept = [inputs[k] for k in ("hidden_states", "encoder_hidden_states", "temb") if k in inputs]
    return held + sum(t.numel() * t.element_size() for t in kept)


def block_inputs(transformer: FluxTransformer2DModel, batch: int, txt_tokens: int,
                 img_hw: tuple[int, int], requires_grad: bool = True) -> dict:
    """Random block inputs of the real shapes (img_hw in packed tokens), for the measurements.

    The streams require grad as they do inside a trained model, so every op saves what it would.
    """
    p = next(transformer.parameters())
    dim = transformer.inner_dim
    g = dict(dtype=p.dtype, device=p.device, requires_grad=requires_grad)
    h, w = img_hw
    ids = torch.cat([torch.zeros(txt_tokens, 3, device=p.device, dtype=p.dtype),
                     FluxPipeline._prepare_latent_image_ids(batch, h, w, p.device, p.dtype)])
    return dict(hidden_states=torch.randn(batch, h * w, dim, **g),
                encoder_hidden_states=torch.randn(batch, txt_tokens, dim, **g),
                temb=torch.randn(batch, dim, **g),
                image_rotary_emb=transformer.pos_embed(ids))


def measure_policy_bytes(transformer: FluxTransformer2DModel, inputs: dict) -> dict:
    """{"double"|"single": {"none"|"lean"|"full": saved bytes}} of the first block of each kind."""
    result = {}
    for kind, blocks in zip(("double", "single"), _blocks(transformer)):
        if not blocks:
            continue
        block, before = blocks[0], policy_of(blocks[0])
        result[kind] = {}
        try:
            for policy in ("none", "lean", "full"):
                _set_policy(block, policy)
                result[kind][policy] = measure_saved_bytes(block, inputs)
        finally:
            _set_policy(block, before)
    return result


def plan_budget(kinds: list[str], per_block_bytes: dict, budget_bytes: int) -> list[str]:
    """``lean`` for as many blocks as fit ``budget_bytes``, ``full`` for the rest.

    Starting from all ``full``, blocks turn lean cheapest extra bytes first (ties: earlier
    block first), which maximises the number of lean blocks, i.e. of blocks not recomputed.
    """
    extra = [per_block_bytes[k]["lean"] - per_block_bytes[k]["full"] for k in kinds]
    total = sum(per_block_bytes[k]["full"] for k in kinds)
    if total > budget_bytes:
        warnings.warn(f"memory budget {budget_bytes} B is below even all-'full' ({total} B); "
                      f"using 'full' everywhere", stacklevel=3)
    plan = ["full"] * len(kinds)
    for i in sorted(range(len(kinds)), key=lambda i: (extra[i], i)):
        if total + extra[i] > budget_bytes:
            break
        plan[i] = "lean"
        total += extra[i]
    return plan
