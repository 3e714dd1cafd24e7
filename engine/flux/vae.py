"""Exact, fine-grained recomputation of the frozen VAE decoder for the reward backward.

The reward gradient flows from the image back through diffusers' ``AutoencoderKL`` decoder into
the latent; the decoder's weights are frozen. Plain autograd keeps every GroupNorm input, SiLU
input and conv input of the decoder for that backward (11.4 GiB at 1024x1024 bf16 for Flux's VAE);
diffusers' ``enable_gradient_checkpointing()`` recomputes one mid/up block at a time (6.1 GiB), but
one full-resolution block still rebuilds ~20 full-resolution tensors in its backward.

:func:`checkpoint_decoder` replaces the decoder's forward (an instance attribute: parameters,
buffers, ``state_dict`` and the class are untouched; :func:`uncheckpoint_decoder` removes it) by
one that runs the same modules with the same ops (each resnet's shortcut conv moved first; no
value depends on that order), in segments under
``torch.utils.checkpoint(use_reentrant=False)``, and, with ``frozen_ops`` (default), two exact
autograd Functions that save less for a frozen module:

- ``conv`` whose weight and bias need no gradient: saves nothing (the input-gradient of a conv
  needs the weight only; autograd's conv node would keep the input); its backward is the same
  ``aten.convolution_backward`` call autograd makes, with output mask (input only), given a
  shape-only stand-in for the input, as ``torch.nn.grad.conv2d_input`` does;
- ``GroupNorm -> SiLU`` with frozen affine: saves the GroupNorm input only (autograd keeps the
  GroupNorm input, its output and the SiLU output is kept by the next conv); the backward
  recomputes the GroupNorm under the forward's autocast state and runs autograd's own GroupNorm
  backward and ``silu_backward`` on it.

Forward values and the gradient into the latent are bit-identical to the plain decoder's (same
kernels, same arguments, same order; tests/test_vae_checkpoint.py checks ``torch.equal``).
A module whose parameters require grad gets plain ops (so a trained VAE still gets its weight
gradients), as does any module of an unexpected form (spatial norm, conv-transpose upsampler,
non-SiLU activation, non-zero padding mode): those run exactly as diffusers runs them.

Granularities (where the checkpoint segments are cut; each segment keeps only its input for the
backward and is recomputed once in it):

- ``"block"``: the mid block and each up block (as diffusers) plus the output chain;
- ``"resnet"``: every ResnetBlock2D, the mid-block attention, every Upsample2D, the output chain;
- ``"auto"`` (default, lowest peak): cuts at the smallest tensors -- one segment per up block
  *including the previous block's upsampler* (so the boundaries kept are pre-upsample, 4x
  smaller), the mid block one segment, and the last, full-resolution up block cut per ResnetBlock2D
  (its block-level recompute would rebuild all of its full-resolution tensors at once). With
  ``frozen_ops`` the upsampler feeding the last block and the output chain are not checkpointed at
  all: they save nothing / only their input anyway, so recomputing them would buy nothing.

Measured on Flux's VAE (FakeTensors, bf16, decode + ColourReward forward+backward peak; see
bench/bench_step.py and bench/results/step_cpu_*.md): 1024^2: plain 11.37 GiB, diffusers per-block
6.09 GiB, ``auto`` 2.36 GiB; 512^2: 2.84 / 1.52 / 0.59 GiB. The extra cost is one more forward of
the checkpointed segments (the post chain, the last upsampler and conv_in are not recomputed).

Caveats. Checked bit-identical on CPU (fp32, bf16, CPU autocast, channels-last inputs); on CUDA
the same argument holds (cuDNN's input-gradient reads the input's sizes and layout only, and only
makes the input contiguous when a weight gradient is asked for), but no GPU was available to run
the tests there. On CPU, oneDNN's conv backward makes its input argument contiguous even when it
only needs its shape, so there the stand-in briefly becomes a real buffer the size of the conv
input inside that one call (not held; CUDA's path does not do this).

Nothing here approximates: tiling (``vae.enable_tiling()``, diffusers' blended tiles, NOT exact)
is a separate, orthogonal knob; it composes with this (each tile runs the patched decoder).
"""
from __future__ import annotations

import functools
import types
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["GRANULARITIES", "checkpoint_decoder", "uncheckpoint_decoder", "decoder_checkpointing",
           "frozen_conv2d", "frozen_group_norm_silu"]

from engine.params import DECODER_GRANULARITIES as GRANULARITIES  # noqa: E402
_STATE = "_leapalign_decoder_ckpt"


# ----------------------------------------------------------------------------- exact frozen ops
def _frozen(m: nn.Module) -> bool:
    return not any(p.requires_grad for p in m.parameters(recurse=False))


def _autocast_state(device_type: str):
    try:
        if torch.is_autocast_enabled(device_type):
            return True, torch.get_autocast_dtype(device_type), torch.is_autocast_cache_enabled()
    except (RuntimeError, TypeError, ValueError):  # a device type autocast does not know
        pass
    return False, None, None


def _suggests_channels_last(x: Tensor) -> bool:
    """ATen's ``suggest_memory_format(x) == channels_last`` (what picks the conv backward's layout)."""
    try:
        from torch._prims_common import suggest_memory_format
        return suggest_memory_format(x) == torch.channels_last
    except (ImportError, AttributeError):   # the same test, by the public API
        return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class _FrozenConv2d(torch.autograd.Function):
    """``conv(x)`` for a conv whose weight/bias need no gradient; saves nothing for backward."""

    @staticmethod
    def forward(ctx, x: Tensor, conv: nn.Conv2d) -> Tensor:
        y = conv._conv_forward(x, conv.weight, conv.bias)   # under the caller's autocast, as nn.Conv2d
        ctx.conv = conv
        ctx.in_shape, ctx.in_dtype, ctx.dtype = x.shape, x.dtype, y.dtype
        ctx.channels_last = _suggests_channels_last(x)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        conv = ctx.conv
        w = conv.weight
        if w.dtype != ctx.dtype:     # autocast ran the conv on a cast copy of the weight
            w = w.to(ctx.dtype)
        # autograd's ConvolutionBackward0 with output mask (input, not weight, not bias): the input
        # enters only through its sizes and its memory format; a stride-0 stand-in (as
        # torch.nn.grad.conv2d_input passes) suggests NCHW, so a channels-last input (the decoder
        # runs channels-last after the mid-block attention's reshape) is signalled through the
        # weight, which the backends (cuDNN, oneDNN) read the layout from as well and convert to it
        # anyway: same backend, same layout, same kernel as with the real input
        if ctx.channels_last and not w.is_contiguous(memory_format=torch.channels_last):
            w = w.contiguous(memory_format=torch.channels_last)
        stand_in = g.new_empty(1).expand(ctx.in_shape)
        gx = torch.ops.aten.convolution_backward(
            g, stand_in, w, None, list(conv.stride), list(conv.padding), list(conv.dilation), False,
            [0, 0], conv.groups, (True, False, False))[0]
        if gx.dtype != ctx.in_dtype:  # the backward of autocast's cast of the input
            gx = gx.to(ctx.in_dtype)
        return gx, None


class _FrozenGroupNormSiLU(torch.autograd.Function):
    """``silu(group_norm(x))`` with a frozen affine; saves only ``x``, recomputes the norm in
    backward (under the forward's autocast state, so the same casts and the same kernels)."""

    @staticmethod
    def forward(ctx, x: Tensor, norm: nn.GroupNorm) -> Tensor:
        ctx.norm = norm
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(x)
        n = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
        return F.silu(n, inplace=True)       # n is ours: same kernel, one tensor fewer

    @staticmethod
    def backward(ctx, g: Tensor):
        (x,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        norm = ctx.norm
        enabled, dtype, cache = ctx.autocast
        ac = (torch.autocast(x.device.type, dtype=dtype, cache_enabled=cache) if enabled
              else torch.autocast(x.device.type, enabled=False))
        with torch.enable_grad(), ac:
            xd = x.detach().requires_grad_(True)
            n = F.group_norm(xd, norm.num_groups, norm.weight, norm.bias, norm.eps)
        with torch.no_grad():       # autograd's SiluBackward0, written over the recomputed n
            nd = n.detach()         # (the GroupNorm backward does not read its output)
            gn = torch.ops.aten.silu_backward.grad_input(g, nd, grad_input=nd)
        (gx,) = torch.autograd.grad(n, xd, gn)
        return gx, None


def _plain_conv_ok(conv) -> bool:
    return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and _frozen(conv))


def frozen_conv2d(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(x)``; when the conv is frozen and a gradient is being recorded, without saving x."""
    if torch.is_grad_enabled() and x.requires_grad and _plain_conv_ok(conv):
        return _FrozenConv2d.apply(x, conv)
    return conv(x)


def frozen_group_norm_silu(norm: nn.GroupNorm, act: nn.Module, x: Tensor) -> Tensor:
    """``act(norm(x))``; when frozen GroupNorm + SiLU under grad, saving only x."""
    if (torch.is_grad_enabled() and x.requires_grad and type(norm) is nn.GroupNorm and isinstance(act, nn.SiLU)
            and _frozen(norm)):
        return _FrozenGroupNormSiLU.apply(x, norm)
    return act(norm(x))


# ----------------------------------------------------------------------------- units of the decoder
def _resnet_ok(r) -> bool:
    from diffusers.models.resnet import ResnetBlock2D
    return (isinstance(r, ResnetBlock2D) and r.upsample is None and r.downsample is None
            and r.time_embedding_norm in ("default", "group") and type(r.norm1) is nn.GroupNorm
            and type(r.norm2) is nn.GroupNorm)


def _resnet(r, frozen_ops: bool, x: Tensor) -> Tensor:
    """diffusers' ResnetBlock2D.forward(x, temb=None) for the form the VAE uses, with the shortcut
    computed first (its value and the final ``shortcut + h`` are unchanged; in the backward the
    engine then runs the main branch first, so the wide shortcut gradient is not held during it)."""
    if not _resnet_ok(r):
        return r(x, None)
    conv = frozen_conv2d if frozen_ops else (lambda c, t: c(t))
    gns = frozen_group_norm_silu if frozen_ops else (lambda n, a, t: a(n(t)))
    s = conv(r.conv_shortcut, x) if r.conv_shortcut is not None else x
    h = conv(r.conv1, gns(r.norm1, r.nonlinearity, x))
    h = conv(r.conv2, r.dropout(gns(r.norm2, r.nonlinearity, h)))
    return (s + h) / r.output_scale_factor


def _upsample_ok(u) -> bool:
    from diffusers.models.upsampling import Upsample2D
    return (isinstance(u, Upsample2D) and u.norm is None and not u.use_conv_transpose and u.interpolate
            and u.use_conv and u.name == "conv")


def _upsample(u, frozen_ops: bool, x: Tensor) -> Tensor:
    """diffusers' Upsample2D.forward(x) (nearest x2 + conv) for the form the VAE uses."""
    if not (frozen_ops and _upsample_ok(u)):
        return u(x)
    if x.numel() * 2 > 2 ** 31:     # as diffusers (no effect on values)
        x = x.contiguous()
    return frozen_conv2d(u.conv, F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _post(dec, frozen_ops: bool, x: Tensor) -> Tensor:
    if frozen_ops:
        return frozen_conv2d(dec.conv_out, frozen_group_norm_silu(dec.conv_norm_out, dec.conv_act, x))
    return dec.conv_out(dec.conv_act(dec.conv_norm_out(x)))


def _conv_in(dec, frozen_ops: bool, x: Tensor) -> Tensor:
    return frozen_conv2d(dec.conv_in, x) if frozen_ops else dec.conv_in(x)


def _plan(dec, granularity: str, frozen_ops: bool) -> list[tuple[bool, list[Callable]]]:
    """The decoder as (checkpointed?, [unit, ...]) segments run in order."""
    P = functools.partial
    mid = dec.mid_block
    mid_units = [P(_resnet, mid.resnets[0], frozen_ops)]
    for attn, r in zip(mid.attentions, mid.resnets[1:]):
        if attn is not None:
            mid_units.append(attn)
        mid_units.append(P(_resnet, r, frozen_ops))
    blocks = [([P(_resnet, r, frozen_ops) for r in b.resnets],
               [P(_upsample, u, frozen_ops) for u in (b.upsamplers or [])]) for b in dec.up_blocks]
    segs: list[tuple[bool, list[Callable]]] = [(False, [P(_conv_in, dec, frozen_ops)])]
    post = (not frozen_ops, [P(_post, dec, frozen_ops)])   # frozen_ops: it keeps only its input anyway
    if granularity == "block":
        segs.append((True, mid_units))
        segs += [(True, res + ups) for res, ups in blocks]
    elif granularity == "resnet":
        segs += [(True, [u]) for u in mid_units]
        for res, ups in blocks:
            segs += [(True, [u]) for u in res]
            segs += [(not frozen_ops, [u]) for u in ups]   # frozen: nearest + conv save nothing
    elif granularity == "auto":
        segs.append((True, mid_units))
        carry: list[Callable] = []        # the previous block's upsampler, run in this block's segment
        last = len(blocks) - 1
        for i, (res, ups) in enumerate(blocks):
            if i == last:
                if carry:
                    segs.append((not frozen_ops, carry))
                segs += [(True, [u]) for u in res]
                if ups:
                    segs.append((not frozen_ops, ups))
            else:
                segs.append((True, carry + res))
                carry = ups
    else:
        raise ValueError(f"granularity {granularity!r}: expected one of {GRANULARITIES}")
    segs.append(post)
    return [s for s in segs if s[1]]


def _run(units, x):
    for u in units:
        x = u(x)
    return x


def _checkpointed_forward(self, sample: Tensor, latent_embeds: Tensor | None = None) -> Tensor:
    cfg = getattr(self, _STATE)
    if latent_embeds is not None or not torch.is_grad_enabled():
        # spatial-norm decoders, and no-grad decodes (sampling, eval): diffusers' own forward
        return type(self).forward(self, sample, latent_embeds)
    x = sample
    for ckpt, units in _plan(self, cfg["granularity"], cfg["frozen_ops"]):
        run = functools.partial(_run, units)
        x = checkpoint(run, x, use_reentrant=False) if ckpt else run(x)
    return x


# ----------------------------------------------------------------------------- public
def _decoder(vae) -> nn.Module:
    dec = getattr(vae, "decoder", vae)
    for name in ("conv_in", "mid_block", "up_blocks", "conv_norm_out", "conv_act", "conv_out"):
        if not hasattr(dec, name):
            raise TypeError(f"{type(dec).__name__} is not a diffusers VAE Decoder (no .{name})")
    return dec


def checkpoint_decoder(vae, granularity: str = "auto", frozen_ops: bool = True):
    """Recompute the decoder of ``vae`` (an AutoencoderKL, or its ``.decoder``) in the backward,
    exactly, at ``granularity`` ("auto" | "resnet" | "block"). Idempotent (a second call re-sets
    the options), undone by :func:`uncheckpoint_decoder`. Parameters, buffers and ``state_dict``
    are untouched; diffusers' own ``gradient_checkpointing`` flags are ignored while this is on
    (no nested recomputation) and keep their value for when it is off. Returns ``vae``."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity {granularity!r}: expected one of {GRANULARITIES}")
    dec = _decoder(vae)
    object.__setattr__(dec, _STATE, {"granularity": granularity, "frozen_ops": bool(frozen_ops)})
    object.__setattr__(dec, "forward", types.MethodType(_checkpointed_forward, dec))
    return vae


def uncheckpoint_decoder(vae) -> bool:
    """Undo :func:`checkpoint_decoder`; returns whether it was on."""
    dec = _decoder(vae)
    on = _STATE in dec.__dict__
    dec.__dict__.pop(_STATE, None)
    if isinstance(dec.__dict__.get("forward"), types.MethodType) and \
            dec.__dict__["forward"].__func__ is _checkpointed_forward:
        del dec.__dict__["forward"]
    return on


def decoder_checkpointing(vae) -> dict | None:
    """{"granularity", "frozen_ops"} when :func:`checkpoint_decoder` is on, else None."""
    st = _decoder(vae).__dict__.get(_STATE)
    return dict(st) if st is not None else None
