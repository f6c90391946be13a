"""Uniform affine quantizers for weights and activations.

Integer convention is the one compressed-tensors stores and vLLM serves: signed integers in
[-2^(b-1), 2^(b-1) - 1], a scale per group (or channel, or tensor) and, when asymmetric, a signed zero
point, with ``x_hat = (clamp(round(x / s + z), qmin, qmax) - z) * s``. Keeping this convention here means
a weight quantized by the search is written to the checkpoint without requantizing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Granularity = Literal["tensor", "token", "channel"]


@dataclass(frozen=True)
class WeightScheme:
    """How one linear layer's weight is quantized. ``group_size == -1`` means one group per output row."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"weight bits must be in 2..8, got {self.bits}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or -1 (per channel), got {self.group_size}")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def groups(self, in_features: int) -> int:
        """Number of groups along the input dimension; raises if the group does not divide it."""
        if self.group_size == -1:
            return 1
        if in_features % self.group_size:
            raise ValueError(
                f"group_size {self.group_size} does not divide the input width {in_features}; "
                "use a divisor of the width or -1 (per channel)"
            )
        return in_features // self.group_size

    def storage_bits(self, out_features: int, in_features: int) -> int:
        """Bits this layer takes in the checkpoint: packed ints, a 16-bit scale per group, packed zeros."""
        n_scales = out_features * self.groups(in_features)
        zero_bits = 0 if self.symmetric else n_scales * self.bits
        return out_features * in_features * self.bits + n_scales * 16 + zero_bits


@dataclass(frozen=True)
class ActScheme:
    """Activation fake quantization at a linear layer's input. ``bits == 16`` means off (weight-only).

    ``token`` is dynamic (range of each token row, computed at run time, the servable W8A8 form);
    ``channel`` and ``tensor`` are static ranges calibrated once (Q-VLM's per-channel LLM setting).
    """

    bits: int = 16
    granularity: Granularity = "token"
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits != 16 and not 2 <= self.bits <= 8:
            raise ValueError(f"activation bits must be 16 (off) or in 2..8, got {self.bits}")

    @property
    def enabled(self) -> bool:
        return self.bits < 16

    @property
    def static(self) -> bool:
        return self.granularity != "token"

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def qparams_from_bounds(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point for the range [lo, hi] (widened to contain 0), as compressed-tensors computes them.

    The scale is cast to ``scale_dtype`` (the dtype the checkpoint stores) before it is used, so that
    in-memory fake quantization and the written checkpoint dequantize to the same values.
    """
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
    hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
    if symmetric:
        scale = torch.maximum(lo.abs(), hi) / ((qmax - qmin) / 2)
    else:
        scale = (hi - lo) / (qmax - qmin)
    scale = scale.to(scale_dtype)
    scale = torch.where(scale == 0, torch.full_like(scale, _eps(scale_dtype)), scale)
    if symmetric:
        return scale, None
    zero = torch.clamp(torch.round(qmin - lo / scale.float()), qmin, qmax).to(torch.int8)
    return scale, zero


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """View a [out, in] weight as [out, groups, group]."""
    out_features, in_features = w.shape
    g = in_features if group_size == -1 else group_size
    return w.reshape(out_features, in_features // g, g)


def percentile_bounds(x: torch.Tensor, percentile: float, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipping bounds along the last dim at ``percentile`` of the values (1.0 = min/max).

    Symmetric bounds use the percentile of |x|. Uses a sort rather than torch.quantile, which refuses
    inputs of more than 16M elements (a 13B MLP weight has 70M).
    """
    if not 0.5 < percentile <= 1.0:
        raise ValueError(f"clipping percentile must be in (0.5, 1.0], got {percentile}")
    n = x.shape[-1]
    if symmetric:
        mag = x.abs()
        top = mag.amax(-1) if percentile == 1.0 else mag.sort(-1).values[..., round((n - 1) * percentile)]
        return -top, top
    if percentile == 1.0:
        return x.amin(-1), x.amax(-1)
    s = x.sort(-1).values
    return s[..., round((n - 1) * (1 - percentile))], s[..., round((n - 1) * percentile)]


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer weight with its quantization parameters; ``dequantize()`` gives the served weight."""

    qweight: torch.Tensor  # int8 [out, in], values in [qmin, qmax]
    scale: torch.Tensor  # [out, groups], checkpoint dtype
    zero: torch.Tensor | None  # int8 [out, groups], None when symmetric
    scheme: WeightScheme

    def dequantize(self) -> torch.Tensor:
        q = grouped(self.qweight.to(self.scale.dtype), self.scheme.group_size)
        if self.zero is not None:
            q = q - self.zero.to(self.scale.dtype).unsqueeze(-1)
        return (q * self.scale.unsqueeze(-1)).reshape(self.qweight.shape)


def quantize_with_qparams(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: WeightScheme
) -> QuantizedWeight:
    scheme.groups(w.shape[1])
    x = grouped(w.to(scale.dtype), scheme.group_size) / scale.unsqueeze(-1)
    if zero is not None:
        x = x + zero.to(scale.dtype).unsqueeze(-1)
    q = torch.clamp(torch.round(x), scheme.qmin, scheme.qmax).to(torch.int8).reshape(w.shape)
    return QuantizedWeight(q, scale, zero, scheme)


def quantize_weight(w: torch.Tensor, scheme: WeightScheme, percentile: float = 1.0) -> QuantizedWeight:
    """Round-to-nearest with per-group clipping bounds at ``percentile`` (1.0 is plain RTN)."""
    scheme.groups(w.shape[1])
    lo, hi = percentile_bounds(grouped(w.float(), scheme.group_size), percentile, scheme.symmetric)
    scale, zero = qparams_from_bounds(lo, hi, scheme.bits, scheme.symmetric, w.dtype)
    return quantize_with_qparams(w, scale, zero, scheme)


def fake_quantize_weight(w: torch.Tensor, scheme: WeightScheme, percentile: float = 1.0) -> torch.Tensor:
    return quantize_weight(w, scheme, percentile).dequantize().to(w.dtype)


@dataclass(frozen=True)
class ActRange:
    """Static activation range: per channel ([C] tensors) or per tensor (scalars)."""

    lo: torch.Tensor
    hi: torch.Tensor


def calibrate_act_range(x: torch.Tensor, scheme: ActScheme, percentile: float = 1.0) -> ActRange:
    """Static range of a linear's input from calibration activations ``x`` [..., C]."""
    if not scheme.static:
        raise ValueError("per-token activation quantization is dynamic and has no calibrated range")
    flat = x.reshape(-1, x.shape[-1]).float()
    values = flat.t() if scheme.granularity == "channel" else flat.reshape(1, -1)
    lo, hi = percentile_bounds(values, percentile, scheme.symmetric)
    if scheme.granularity == "tensor":
        lo, hi = lo.reshape(()), hi.reshape(())
    return ActRange(lo, hi)


def fake_quantize_activation(x: torch.Tensor, scheme: ActScheme, act_range: ActRange | None = None) -> torch.Tensor:
    """Quantize-dequantize an activation [..., C]; static schemes need their calibrated range."""
    if not scheme.enabled:
        return x
    if scheme.static:
        if act_range is None:
            raise ValueError(f"static {scheme.granularity} activation quantization needs a calibrated range")
        lo, hi = act_range.lo.to(x.device), act_range.hi.to(x.device)
    else:
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale, zero = qparams_from_bounds(lo, hi, scheme.bits, scheme.symmetric, torch.float32)
    xs = x.float() / scale
    if zero is not None:
        xs = xs + zero.float()
    q = torch.clamp(round_ste(xs), scheme.qmin, scheme.qmax)
    if zero is not None:
        q = q - zero.float()
    return (q * scale).to(x.dtype)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest; under autograd the gradient passes straight through (learned rounding needs it)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return torch.round(x)
    return x + (torch.round(x) - x).detach()
