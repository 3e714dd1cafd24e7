"""A frozen Linear whose weight is stored in fp8 (float8_e4m3fn, one fp32 scale per output channel).

Storage: ``q = round_e4m3(w / s)`` with ``s = max|w_row| / 448`` per output row, so each row uses
e4m3's whole range. Bound per weight (what tests/test_fp8.py checks)::

    |dequantize(q, s) - w| <= 2^-4 |w| + 2^-10 s        (+ one rounding into the compute dtype)

2^-4 is half the spacing of a 3-bit mantissa (relative), 2^-10 s half the subnormal spacing 2^-9
(absolute, for the |w| < 2^-6 s that fall below e4m3's normal range). A linear output then obeys
``|y_fp8 - y| <= 2^-4 (|x| @ |w|^T) + 2^-10 s sum|x|`` (elementwise, before compute-dtype rounding).

Two ways to compute, chosen per call:

* weight path (default, any device, autograd): dequantize to the compute dtype, then matmul.
  A custom ``autograd.Function``, because plain autograd through ``F.linear(x, dequantize(...))``
  would save the dequantized weight for the input gradient: the bf16 base would be back in memory
  for every graph-keeping pass. Here only the fp8 weight and its scales (resident anyway) are
  saved; backward dequantizes again. The frozen weight gets no gradient, the input does.
* fp8 compute (``compute="fp8"``, only under ``torch.no_grad()``, CUDA sm_89+): the input is
  quantized per row (per token) to e4m3 too and ``torch._scaled_mm`` multiplies in fp8 with both
  rowwise scales, bf16 out. Meant for the no-grad rollout; graph-keeping passes take the weight
  path, so gradients never go through fp8 activations.

Why not torchao (not tried here: it is not in the engine's environment): its fp8 weight-only
configs wrap weights in tensor subclasses, peft's torchao LoRA layer documents int8 weights only,
FakeTensorMode sizing and a plain ``state_dict`` of subclass weights would be new ground for the
engine, and its API moves between releases (it would need a pin). This file is small, plain torch, and the rollout/graph-keeping split
(fp8 compute only without grad) is a per-call rule none of its configs express.

The weight is kept as a ``uint8`` Parameter holding the e4m3 bits (viewed back as float8 for
compute): ``module.to(torch.bfloat16)`` casts only floating-point tensors, so a later dtype cast
of the model cannot silently turn the fp8 codes into bf16 numbers without their scales.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)   # 448
REL_BOUND = 2.0 ** -4                     # e4m3 rounding, relative (normal range)
SUB_BOUND = 2.0 ** -10                    # e4m3 rounding, absolute in units of the row scale
MIN_CAPABILITY = (8, 9)                   # fp8 tensor cores: Ada (sm_89), Hopper (sm_90) and later
COMPUTES = ("bf16", "fp8")


# ----------------------------------------------------------------------------- quantization
def _rowwise(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # fp32 math so the scale and the division are exact to 2^-24, far below e4m3's 2^-4.
    t = t.float()
    amax = t.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))   # an all-zero row stays zero
    # clamp: a quotient that rounds a hair above 448 would become NaN in e4m3fn (it has no inf)
    q = (t / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


_CHUNK = 1 << 24


def quantize_rowwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn of w's shape, scale fp32 of shape (rows,)) for a 2-d weight."""
    if w.dim() != 2:
        raise ValueError(f"quantize_rowwise expects a 2-d weight (out, in), got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"quantize_rowwise expects a floating-point weight, got {w.dtype}")
    # Row blocks of <= 2^24 elements: the fp32 temporaries stay ~64 MiB whatever the weight, so
    # converting a model on its device needs barely more memory than the model as loaded.
    rows = max(1, _CHUNK // max(1, w.shape[1]))
    q = torch.empty(w.shape, dtype=E4M3, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for i in range(0, w.shape[0], rows):
        q[i:i + rows], s = _rowwise(w[i:i + rows])
        scale[i:i + rows] = s.squeeze(1)
    return q, scale


def dequantize_rowwise(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q * scale rounded once into ``dtype`` (the fp32 product is exact: 4-bit x 24-bit mantissas)."""
    # In place on the one weight-sized buffer: an out-of-place fp32 product would add two fp32
    # weight-sized temporaries (~0.45 GiB for FLUX's 3072 x 15360 proj_out) to every pass's peak.
    # mul_ computes in the promoted fp32 and rounds into ``dtype`` once.
    return q.to(dtype).mul_(scale.unsqueeze(1))


# ----------------------------------------------------------------------------- torch references
def fp8_linear_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                         dtype: torch.dtype) -> torch.Tensor:
    """The weight path, with plain autograd (it keeps the dequantized weight: reference only)."""
    return F.linear(x, dequantize_rowwise(q, scale, dtype), bias)


def fp8_compute_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """What the fp8-compute path computes, in fp32 on any device: input quantized per row, weight
    per output channel, product of the dequantized operands, rounded to x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = _rowwise(x2)
    y = (xq.float() * xs) @ (q.float() * scale.unsqueeze(1)).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], q.shape[0])


# ----------------------------------------------------------------------------- weight path
class Fp8WeightLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q, scale, bias):
        ctx.save_for_backward(q, scale)   # never the dequantized weight (see the module docstring)
        ctx.has_bias = bias is not None
        return F.linear(x, dequantize_rowwise(q, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx, dy):
        q, scale = ctx.saved_tensors
        dx = dy @ dequantize_rowwise(q, scale, dy.dtype) if ctx.needs_input_grad[0] else None
        db = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return dx, None, None, db


def fp8_weight_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, dequantize(q, scale), bias)`` computed in x's dtype, saving only q and scale."""
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"fp8 linear: input has {x.shape[-1]} features, the weight expects {q.shape[1]}")
    return Fp8WeightLinearFunction.apply(x, q, scale, bias)


# ----------------------------------------------------------------------------- fp8 compute path
def fp8_compute_unavailable(device: torch.device) -> str | None:
    """Why fp8 matmuls (``torch._scaled_mm``, rowwise scales) cannot run on ``device``; None if they can."""
    device = torch.device(device)
    want = f"sm_{MIN_CAPABILITY[0]}{MIN_CAPABILITY[1]} or later"
    if device.type != "cuda":
        return f"fp8 compute needs a CUDA GPU with fp8 tensor cores ({want}); the model is on {device.type}"
    if not torch.cuda.is_available():
        return f"fp8 compute needs a CUDA GPU with fp8 tensor cores ({want}); torch sees no CUDA device"
    cap = tuple(torch.cuda.get_device_capability(device))
    if cap < MIN_CAPABILITY:
        return f"fp8 compute needs fp8 tensor cores ({want}); this GPU is sm_{cap[0]}{cap[1]}"
    if not hasattr(torch, "_scaled_mm"):
        return f"fp8 compute needs torch._scaled_mm, which torch {torch.__version__} lacks"
    return None


def fp8_compute_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """No-grad fp8 x fp8 matmul on tensor cores, bf16 out (x must be bf16, on CUDA)."""
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        raise RuntimeError("fp8 compute has no backward: graph-keeping passes must take the weight path")
    if x.dtype != torch.bfloat16:
        raise ValueError(f"fp8 compute writes bf16 (rowwise scaled_mm); the input is {x.dtype}")
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = _rowwise(x2)
    # mat2 must be column-major: q is (out, in) row-major, so q.t() is (in, out) column-major, free.
    y = torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=scale.unsqueeze(0), out_dtype=torch.bfloat16)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], q.shape[0])


# ----------------------------------------------------------------------------- module
class Fp8Linear(nn.Module):
    """A frozen ``nn.Linear`` stored in fp8. ``compute``: "bf16" (dequantize, then matmul in the
    input's dtype: bf16 in a bf16 model) or "fp8" (fp8 matmuls in no-grad calls, the weight path
    otherwise)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 device=None, compute: str = "bf16"):
        super().__init__()
        if compute not in COMPUTES:
            raise ValueError(f"Fp8Linear compute must be one of {list(COMPUTES)}, got {compute!r}")
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = dtype
        self.compute = compute
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.uint8, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute: str = "bf16", device=None) -> "Fp8Linear":
        """The fp8 copy of a frozen ``linear``, quantized on and placed at ``device`` (default: where
        ``linear`` is), so only one layer's bf16 weight at a time needs to be there."""
        if linear.weight.requires_grad or (linear.bias is not None and linear.bias.requires_grad):
            raise ValueError("only a frozen Linear can be stored in fp8 (its weights would be trained)")
        w = linear.weight.detach().to(device or linear.weight.device)
        # built on meta, then given the real tensors: no weight-sized placeholder is allocated
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, "meta", compute)
        q, scale = quantize_rowwise(w)
        new.weight = nn.Parameter(q.view(torch.uint8), requires_grad=False)
        new.weight_scale = scale
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().to(w.device), requires_grad=False)
        new.train(linear.training)
        return new

    @property
    def weight_e4m3(self) -> torch.Tensor:
        return self.weight.view(E4M3)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_rowwise(self.weight_e4m3, self.weight_scale, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compute == "fp8" and not torch.is_grad_enabled():
            return fp8_compute_linear(x, self.weight_e4m3, self.weight_scale, self.bias)
        return fp8_weight_linear(x, self.weight_e4m3, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, e4m3 per-row scales, compute={self.compute}")


def fp8_compute_fits(in_features: int, out_features: int) -> bool:
    """``torch._scaled_mm`` needs both weight dimensions to be multiples of 16."""
    return in_features % 16 == 0 and out_features % 16 == 0


def convert_linears(root: nn.Module, compute: str = "bf16", device=None) -> list[str]:
    """Replace every frozen ``nn.Linear`` under ``root`` (exact class: peft's LoRA wrappers are not
    Linears, their ``base_layer`` is) by an ``Fp8Linear``; trainable Linears (LoRA's A and B) stay.
    With ``compute="fp8"``, layers whose sizes ``_scaled_mm`` cannot take keep bf16 compute.
    ``device``: where the fp8 layers are quantized and go (``Fp8Linear.from_linear``).
    Returns the qualified names of the converted modules."""
    if compute not in COMPUTES:
        raise ValueError(f"compute must be one of {list(COMPUTES)}, got {compute!r}")
    done = []
    for parent_name, parent in list(root.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or any(p.requires_grad for p in child.parameters()):
                continue
            c = compute if fp8_compute_fits(child.in_features, child.out_features) else "bf16"
            setattr(parent, name, Fp8Linear.from_linear(child, c, device))
            done.append(f"{parent_name}.{name}" if parent_name else name)
    return done


def set_compute(root: nn.Module, compute: str) -> int:
    """Switch every ``Fp8Linear`` under ``root`` to ``compute`` (where its sizes allow fp8)."""
    if compute not in COMPUTES:
        raise ValueError(f"compute must be one of {list(COMPUTES)}, got {compute!r}")
    n = 0
    for m in root.modules():
        if isinstance(m, Fp8Linear):
            m.compute = compute if fp8_compute_fits(m.in_features, m.out_features) else "bf16"
            n += 1
    return n
