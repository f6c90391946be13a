"""Uniform affine quantizers for weights and activations.

Integer convention is the one compressed-tensors stores and vLLM serves: signed integers in
[-2^(b-1), 2^(b-1) - 1], a scale per group (or channel, or tensor) and, when asymmetric, a signed zero
point, with ``x_hat = (clamp(round(x / s + z), qmin, qmax) - z) * s``. Keeping this convention here means
a weight quantized by the search is written to the checkpoint without requantizing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

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
    in-memory fake quantization and the written checkpoint dequantize to the same values; the zero point is
    computed against that stored scale, in float32.
    """
    with torch.no_grad():
        scale, zero = grid_qparams(lo, hi, bits, symmetric, scale_dtype)
    return scale.to(scale_dtype), None if zero is None else zero.to(torch.int8)


def grid_qparams(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float32 scale (its value the one stored in ``scale_dtype``) and float32 integer-valued zero point.

    Differentiable in ``lo`` and ``hi``: the rounding of the scale to its stored dtype and of the zero point
    pass the gradient straight through (learned rounding trains the clipping bounds through it).
    """
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    lo = torch.clamp(lo.float(), max=0.0)
    hi = torch.clamp(hi.float(), min=0.0)
    scale = torch.maximum(-lo, hi) / ((qmax - qmin) / 2) if symmetric else (hi - lo) / (qmax - qmin)
    stored = scale.detach().to(scale_dtype)
    stored = torch.where(stored == 0, torch.full_like(stored, _eps(scale_dtype)), stored).float()
    scale = stored + (scale - scale.detach())  # the stored value exactly, the gradient of the float one
    if symmetric:
        return scale, None
    return scale, torch.clamp(round_ste(qmin - lo / scale), qmin, qmax)


def grid_integers(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, qmin: int, qmax: int,
                  offset: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``clamp(round(x / scale + offset + zero), qmin, qmax)`` in float32 (integer valued), broadcasting; written
    into ``out`` when given (GPTQ's column loop, which counts every kernel it launches).

    Every path that makes integers (RTN, GPTQ, learned rounding, its export) goes through this one
    expression, so the integers written are the ones searched whatever the model's dtype.
    """
    t = x.float() / scale.float()
    if offset is not None:
        t = t + offset
    if zero is not None:
        t = t + zero.float()
    return torch.clamp(round_ste(t), qmin, qmax, out=out)


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


def held_two_a_byte(bits: int, in_features: int) -> bool:
    """Whether :class:`QuantizedWeight` holds a weight's integers two a byte: 4 bits and fewer, an even ``in``."""
    return bits <= 4 and in_features % 2 == 0


def held_codes(qweight: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:
    """int8 integers [out, in] as :class:`QuantizedWeight` holds them: themselves, or two a byte where
    :func:`held_two_a_byte`."""
    if not held_two_a_byte(scheme.bits, qweight.shape[1]):
        return qweight
    low = (qweight - scheme.qmin).to(torch.uint8)
    return low[:, 0::2] | (low[:, 1::2] << 4)


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer weight with its quantization parameters; ``dequantize()`` gives the served weight. Build one from its
    integers with :meth:`of`.

    At 4 bits and fewer the integers are held two a byte: a search keeps several candidates of a block, and a stage
    keeps a block's result until its file is written, so at 1 byte a weight these were half a layer's weights each.
    """

    # int8 [out, in] in [qmin, qmax]; at 4 bits and fewer with an even ``in``, uint8 [out, in / 2]: each integer
    # minus qmin, an even column's in the low four bits and the next column's in the high four
    codes: torch.Tensor
    scale: torch.Tensor  # [out, groups], checkpoint dtype
    zero: torch.Tensor | None  # int8 [out, groups], None when symmetric
    scheme: WeightScheme

    @classmethod
    def of(cls, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
           scheme: WeightScheme) -> "QuantizedWeight":
        """From int8 integers ``qweight`` [out, in] (held as they are, or packed two a byte)."""
        return cls(held_codes(qweight, scheme), scale, zero, scheme)

    @property
    def packed(self) -> bool:
        return self.codes.dtype == torch.uint8

    @property
    def shape(self) -> torch.Size:
        rows, columns = self.codes.shape
        return torch.Size((rows, 2 * columns if self.packed else columns))

    @property
    def qweight(self) -> torch.Tensor:
        """The integers as int8 [out, in] (a new tensor when they are packed)."""
        return self.integers(torch.int8)

    def integers(self, dtype: torch.dtype) -> torch.Tensor:
        """The integers [out, in] as ``dtype`` (a new tensor, except the held int8 ones asked for as int8)."""
        if not self.packed:
            return self.codes.to(dtype)
        out = torch.empty(self.shape, dtype=dtype, device=self.codes.device)
        out[:, 0::2] = self.codes & 0xF
        out[:, 1::2] = self.codes >> 4
        return out.add_(self.scheme.qmin)

    def dequantize(self) -> torch.Tensor:
        """The weight in the scale's dtype; one tensor of that size is made (the zero and scale go in place), since
        a search's fake-quant linears dequantize at every call (``FakeQuantLinear.quantized``)."""
        w = self.integers(self.scale.dtype)
        q = grouped(w, self.scheme.group_size)
        if self.zero is not None:
            q.sub_(self.zero.to(self.scale.dtype).unsqueeze(-1))
        q.mul_(self.scale.unsqueeze(-1))
        return w

    def rows(self, start: int, stop: int) -> "QuantizedWeight":
        """Output rows ``start:stop`` (views), with their qparams."""
        zero = None if self.zero is None else self.zero[start:stop]
        return QuantizedWeight(self.codes[start:stop], self.scale[start:stop], zero, self.scheme)

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        """The same weight with its tensors on ``device`` (itself when they are there already)."""
        if self.codes.device == torch.device(device):
            return self
        zero = None if self.zero is None else self.zero.to(device)
        return QuantizedWeight(self.codes.to(device), self.scale.to(device), zero, self.scheme)


def quantize_with_qparams(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: WeightScheme
) -> QuantizedWeight:
    """Nearest integers of ``w`` on the grid of the stored ``scale`` (and ``zero``), computed in float32."""
    scheme.groups(w.shape[1])
    z = None if zero is None else zero.unsqueeze(-1)
    q = grid_integers(grouped(w, scheme.group_size), scale.unsqueeze(-1), z, scheme.qmin, scheme.qmax)
    return QuantizedWeight.of(q.to(torch.int8).reshape(w.shape), scale, zero, scheme)


ROW_SLICE_ELEMENTS = 1 << 22  # a weight's float32 temporaries are made this many elements (16 MiB) at a time


def row_slices(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``w`` [out, in] as views of whole rows, at most ``ROW_SLICE_ELEMENTS`` elements each. Every quantization
    group lies within one row, so quantizing the slices one by one is quantizing the whole weight."""
    return w.split(max(1, ROW_SLICE_ELEMENTS // max(1, w.shape[1])))


def _by_row_slices(w: torch.Tensor, scheme: WeightScheme, quantize: Callable[[torch.Tensor], QuantizedWeight]
                   ) -> QuantizedWeight:
    scheme.groups(w.shape[1])
    slices = row_slices(w)
    if len(slices) == 1:
        return quantize(slices[0])
    whole, start = None, 0
    for rows in slices:  # each slice's integers go straight into the whole weight's (a list joined would hold twice)
        part = quantize(rows)
        if whole is None:
            whole = _empty_rows(part, w.shape[0])
        for mine, theirs in ((whole.codes, part.codes), (whole.scale, part.scale), (whole.zero, part.zero)):
            if theirs is not None:
                mine[start:start + rows.shape[0]] = theirs
        start += rows.shape[0]
    return whole


def _empty_rows(like: QuantizedWeight, rows: int) -> QuantizedWeight:
    """An uninitialised weight of ``rows`` rows with ``like``'s dtypes, device and scheme."""
    def empty(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.new_empty((rows, *t.shape[1:]))

    return QuantizedWeight(empty(like.codes), empty(like.scale), empty(like.zero), like.scheme)


def quantize_weight(w: torch.Tensor, scheme: WeightScheme, percentile: float = 1.0) -> QuantizedWeight:
    """Round-to-nearest with per-group clipping bounds at ``percentile`` (1.0 is plain RTN)."""
    return _by_row_slices(w, scheme, lambda rows: _quantize_rows(rows, scheme, percentile))


def _quantize_rows(w: torch.Tensor, scheme: WeightScheme, percentile: float) -> QuantizedWeight:
    lo, hi = percentile_bounds(grouped(w.float(), scheme.group_size), percentile, scheme.symmetric)
    scale, zero = qparams_from_bounds(lo, hi, scheme.bits, scheme.symmetric, w.dtype)
    return quantize_with_qparams(w, scale, zero, scheme)


def shrink_grid(max_shrink: float, steps: int) -> tuple[float, ...]:
    """``steps + 1`` shrink factors from 1.0 down to ``1 - max_shrink`` (GPTQ's reference MSE grid)."""
    if not 0.0 <= max_shrink < 1.0 or steps < 1:
        raise ValueError(f"need 0 <= max_shrink < 1 and steps >= 1, got {max_shrink} and {steps}")
    return tuple(round(1.0 - max_shrink * i / steps, 6) for i in range(steps + 1))


SHRINK_MAX, SHRINK_STEPS = 0.2, 20
SHRINK_GRID = shrink_grid(SHRINK_MAX, SHRINK_STEPS)  # 1.00, 0.99, ..., 0.80


@torch.no_grad()
def mse_clip_bounds(g: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype,
                    importance: torch.Tensor | None = None, shrinks: tuple[float, ...] = SHRINK_GRID
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group clipping bounds of ``g`` [..., group]: the min/max shrunk by the factor of ``shrinks`` that
    gives the group the lowest reconstruction error, each weight's squared error weighted by ``importance``
    (the mean square of its input channel, broadcast against ``g``: llm-compressor's imatrix idea; None =
    plain MSE). The error is scored with the scale as stored in ``scale_dtype``."""
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    g = g.float()
    lo0, hi0 = percentile_bounds(g, 1.0, symmetric)
    best_err = torch.full(lo0.shape, float("inf"), device=g.device)
    best = torch.ones_like(lo0)
    for shrink in shrinks:
        scale, zero = grid_qparams(lo0 * shrink, hi0 * shrink, bits, symmetric, scale_dtype)
        zero = None if zero is None else zero.unsqueeze(-1)
        q = grid_integers(g, scale.unsqueeze(-1), zero, qmin, qmax)
        sq = ((q if zero is None else q - zero) * scale.unsqueeze(-1) - g) ** 2
        err = (sq if importance is None else sq * importance).sum(-1)
        take = err < best_err
        best_err = torch.where(take, err, best_err)
        best = torch.where(take, torch.full_like(best, shrink), best)
    return lo0 * best, hi0 * best


def quantize_clipped(w: torch.Tensor, scheme: WeightScheme, importance: torch.Tensor | None = None,
                     shrinks: tuple[float, ...] = SHRINK_GRID) -> QuantizedWeight:
    """Round-to-nearest with each group's clipping picked from the MSE shrink grid (``mse_clip_bounds``);
    ``importance`` [in_features] is the mean square of each input channel (None = unweighted)."""
    return _by_row_slices(w, scheme, lambda rows: _clip_rows(rows, scheme, importance, shrinks))


def _clip_rows(w: torch.Tensor, scheme: WeightScheme, importance: torch.Tensor | None, shrinks: tuple[float, ...]
               ) -> QuantizedWeight:
    g = grouped(w.float(), scheme.group_size)
    imp = None if importance is None else grouped(importance.float().reshape(1, -1), scheme.group_size)
    lo, hi = mse_clip_bounds(g, scheme.bits, scheme.symmetric, w.dtype, imp, shrinks)
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
    scale, zero = grid_qparams(lo, hi, scheme.bits, scheme.symmetric, torch.float32)
    if zero is not None:
        zero = zero.detach()  # ranges train through the scale only
    q = grid_integers(x, scale, zero, scheme.qmin, scheme.qmax)
    if zero is not None:
        q = q - zero
    return (q * scale).to(x.dtype)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest; under autograd the gradient passes straight through (learned rounding needs it).
    The value is exactly ``torch.round(x)`` either way."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return torch.round(x)
    return torch.round(x).detach() + (x - x.detach())
