"""GPTQ: second-order post-training weight quantization (Frantar et al., 2022).

For one linear layer ``y = x W^T`` the layer-wise objective is ``||X W^T - X W_q^T||^2``, whose Hessian
with respect to each weight row is ``H = 2/n X^T X`` (the same for every row). GPTQ quantizes the input
columns one at a time (in their natural order, or by decreasing diag(H) with act-order) and, after each
column, spreads the quantization error over the columns not yet quantized with the optimal (OBS) update,
which only needs the rows of the upper Cholesky factor of ``H^-1``. Updates to columns outside the current block of
``block_size`` columns are applied lazily, once per block, as one matrix product.

The integers and quantization parameters follow :mod:`qvlm.quant`'s convention, and the values the
algorithm uses as the quantized columns are computed with the same arithmetic as
``QuantizedWeight.dequantize()``, so the returned weight can be packed into a checkpoint as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from qvlm.quant import QuantizedWeight, WeightScheme, grid_integers, grouped, mse_clip_bounds, qparams_from_bounds

__all__ = ["HessianAccumulator", "gptq_quantize", "gptq_quantize_shared", "DAMP_RETRIES", "NumericalFailure",
           "NotPositiveDefinite"]

DAMP_RETRIES = 3  # a Hessian that is not positive definite is damped x10 up to this many more times


class HessianAccumulator:
    """Running ``H = 2/n * sum x x^T`` over calibration tokens of one linear's input, in float32 (float64 on request).

    The unnormalized sum ``sum x x^T`` and the token count are kept separately and ``H`` is formed when it
    is read, so the result does not depend on how the tokens were split into chunks (up to the summation
    order of floating point) and no rescaling error accumulates. Chunks added in the same order give
    bitwise identical results.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        if in_features <= 0:
            raise ValueError(f"in_features must be positive, got {in_features}")
        if dtype not in (torch.float64, torch.float32):
            raise ValueError(f"the Hessian is accumulated in float64 or float32, got {dtype}")
        self.in_features = in_features
        self.dtype = dtype
        self._device = torch.device(device) if device is not None else None
        self._sum: torch.Tensor | None = None
        self._tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Add calibration inputs ``x`` [..., in_features]; every leading index is one token."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with last dimension {self.in_features}, got shape {tuple(x.shape)}")
        flat = x.detach().reshape(-1, self.in_features)
        if flat.shape[0] == 0:
            return
        if self._sum is None:
            device = self._device if self._device is not None else flat.device
            self._sum = torch.zeros(self.in_features, self.in_features, dtype=self.dtype, device=device)
        flat = flat.to(device=self._sum.device, dtype=self.dtype)
        self._sum.addmm_(flat.t(), flat)
        self._tokens += flat.shape[0]

    @property
    def tokens(self) -> int:
        return self._tokens

    @property
    def hessian(self) -> torch.Tensor:
        """``2/n X^T X`` (a new tensor, [in_features, in_features], in the accumulator's dtype)."""
        if self._sum is None:
            raise ValueError("the Hessian has no calibration tokens; add() inputs before reading it")
        return self._sum * (2.0 / self._tokens)


class NumericalFailure(ValueError):
    """The layer's numbers are unusable for GPTQ (a block search quarantines the block on it)."""


class NotPositiveDefinite(NumericalFailure):
    """The damped Hessian has no Cholesky factor."""


def _not_positive_definite(what: str, damp: float) -> NotPositiveDefinite:
    return NotPositiveDefinite(
        f"GPTQ: the Hessian of this layer is not positive definite ({what}) even after damping with "
        f"damp={damp}; use a larger damp (e.g. 0.1) or more calibration tokens"
    )


def _inverse_hessian_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of ``H^-1`` (``H^-1 = U^T U``), in float64."""
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise _not_positive_definite(f"Cholesky of H failed at column {int(info) - 1}", damp)
    h_inv = torch.cholesky_inverse(lower)
    upper, info = torch.linalg.cholesky_ex(h_inv, upper=True)
    if int(info) != 0:
        raise _not_positive_definite(f"Cholesky of H^-1 failed at column {int(info) - 1}", damp)
    if not torch.isfinite(upper).all():
        raise _not_positive_definite("the inverse has non-finite entries", damp)
    return upper


def _check_args(weight: torch.Tensor, hessian: torch.Tensor, damp: float, block_size: int) -> None:
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    in_features = weight.shape[1]
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"expected a [{in_features}, {in_features}] Hessian, got shape {tuple(hessian.shape)}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if damp < 0:
        raise ValueError(f"damp must be non-negative, got {damp}")


@dataclass(frozen=True)
class _Prepared:
    w: torch.Tensor  # float32 working weight, columns in processing order
    u: torch.Tensor  # upper Cholesky factor of the damped H^-1, processing order, float32
    order: torch.Tensor  # original column index of each processed column
    importance: torch.Tensor  # diag(H) per original column (float32): the clipping search's weights


def _prepare(weight: torch.Tensor, hessian: torch.Tensor, damp: float, act_order: bool,
             before_permuting: Callable[[torch.Tensor, torch.Tensor], None]) -> _Prepared:
    """The float32 working weight and the upper Cholesky factor of the damped inverse Hessian, both permuted
    to decreasing diag(H) with ``act_order``. ``before_permuting`` is given the float32 weight in the original
    order (dead columns zeroed) and diag(H): the only moment that copy and the permuted one are both alive."""
    h = hessian.detach().to(device=weight.device, dtype=torch.float64, copy=True)
    if not torch.isfinite(h).all():
        raise NumericalFailure("GPTQ: the Hessian of this layer has non-finite entries (NaN/inf in the calibration inputs?)")
    w = weight.detach().to(torch.float32, copy=True)
    importance = torch.diagonal(h).float().clone()
    # Dead inputs (always zero in calibration): the weight column cannot matter, so drop it and give the
    # Hessian a unit diagonal there to keep it invertible.
    dead = torch.diagonal(h) == 0
    if dead.any():
        idx = dead.nonzero().squeeze(1)
        h[idx, idx] = 1.0
        w[:, dead] = 0.0
    before_permuting(w, importance)
    order = torch.arange(w.shape[1], device=w.device)
    if act_order:
        order = torch.argsort(importance, descending=True, stable=True)
        h, w, dead = h[order][:, order], w[:, order], dead[order]
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    u64 = _inverse_hessian_cholesky(h, damp)
    if dead.any():
        # In exact arithmetic a dead input is decoupled from every other one; make that exact so no error
        # ever flows into (or out of) a dead column.
        diag = u64.diagonal().clone()
        u64[dead, :] = 0.0
        u64[:, dead] = 0.0
        u64.diagonal().copy_(diag)
    return _Prepared(w, u64.to(torch.float32), order, importance)


class _Columns:
    """Output buffers, each group's qparams, and quantization of one column with its group's.

    On a GPU the column loop is bound by kernel launches, not by bytes, so each column launches as few as it can:
    the qparams are also kept in the dtypes the loop computes with (converted once per group, not once per
    column), and a column's integers go to a buffer of its block, written into the outputs once per block."""

    def __init__(self, w: torch.Tensor, scheme: WeightScheme, sdtype: torch.dtype, shrinks: tuple[float, ...],
                 keep_used: bool):
        out_features, in_features = w.shape
        n_groups = scheme.groups(in_features)
        self.scheme, self.sdtype, self.shrinks = scheme, sdtype, shrinks
        self.qweight = torch.empty(out_features, in_features, dtype=torch.int8, device=w.device)
        self.used = torch.empty(out_features, in_features, dtype=torch.float32, device=w.device) if keep_used else None
        self.scale = torch.empty(out_features, n_groups, dtype=sdtype, device=w.device)
        self.zero = None if scheme.symmetric else torch.empty(out_features, n_groups, dtype=torch.int8, device=w.device)
        self._scale32 = torch.empty(out_features, n_groups, dtype=torch.float32, device=w.device)
        self._zero32 = None if scheme.symmetric else torch.empty_like(self._scale32)
        self._zero_stored = None if scheme.symmetric else torch.empty_like(self.scale)  # the zero in sdtype

    def set_qparams(self, groups: slice, values: torch.Tensor, importance: torch.Tensor) -> None:
        """Qparams of ``groups`` from ``values`` [out, n_groups, group] (clipping searched on the shrink grid,
        each weight's error weighted by its input's ``importance`` [n_groups, group])."""
        s = self.scheme
        lo, hi = mse_clip_bounds(values, s.bits, s.symmetric, self.sdtype, importance.unsqueeze(0), self.shrinks)
        scale, zero = qparams_from_bounds(lo, hi, s.bits, s.symmetric, self.sdtype)
        self.scale[:, groups] = scale
        self._scale32[:, groups] = self.scale[:, groups]
        if self.zero is not None:
            self.zero[:, groups] = zero
            self._zero32[:, groups] = self.zero[:, groups]
            self._zero_stored[:, groups] = self.zero[:, groups]

    def quantize(self, g: int, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Quantize column ``x`` with group ``g``'s qparams, its integers into ``q`` (float32); returns the
        dequantized column, computed as QuantizedWeight.dequantize() does."""
        zero = None if self._zero32 is None else self._zero32[:, g]
        grid_integers(x, self._scale32[:, g], zero, self.scheme.qmin, self.scheme.qmax, out=q)
        qs = q.to(self.sdtype)
        if self._zero_stored is not None:
            qs = qs - self._zero_stored[:, g]
        return (qs * self.scale[:, g]).float()

    def store(self, columns: slice | torch.Tensor, q: torch.Tensor, used: torch.Tensor | None) -> None:
        """Write a block's integers (and the dequantized values the loop used) to the original ``columns``."""
        self.qweight[:, columns] = q.to(torch.int8)
        if self.used is not None:
            self.used[:, columns] = used


def _gptq(
    weight: torch.Tensor, hessian: torch.Tensor, scheme: WeightScheme, damp: float, block_size: int,
    act_order: bool = False, shrinks: tuple[float, ...] = (1.0,), keep_used: bool = False,
) -> tuple[QuantizedWeight, torch.Tensor | None]:
    """GPTQ proper; with ``keep_used`` also returns the float32 quantized columns the algorithm used (for tests)."""
    _check_args(weight, hessian, damp, block_size)
    in_features = weight.shape[1]
    gs = in_features if scheme.group_size == -1 else scheme.group_size
    static = act_order or scheme.group_size == -1
    cols = _Columns(weight, scheme, weight.dtype, shrinks, keep_used)

    def static_qparams(original: torch.Tensor, importance: torch.Tensor) -> None:
        if static:  # every group's qparams from the weight before any error feedback
            cols.set_qparams(slice(None), grouped(original, scheme.group_size),
                             grouped(importance.unsqueeze(0), scheme.group_size)[0])

    p = _prepare(weight, hessian, damp, act_order, static_qparams)
    w, u = p.w, p.u
    group_of = (p.order // gs).tolist()
    for b1 in range(0, in_features, block_size):
        b2 = min(b1 + block_size, in_features)
        w_blk, u_blk = w[:, b1:b2].clone(), u[b1:b2, b1:b2]
        err_blk, q_blk = torch.zeros_like(w_blk), torch.empty_like(w_blk)
        used_blk = torch.empty_like(w_blk) if keep_used else None
        for i in range(b2 - b1):
            col = b1 + i
            if not static and col % gs == 0:
                _dynamic_group(cols, w, u, w_blk, err_blk, p.importance, b1, b2, i, gs)
            x, e = w_blk[:, i], err_blk[:, i]
            x_hat = cols.quantize(group_of[col], x, q_blk[:, i])
            if used_blk is not None:
                used_blk[:, i] = x_hat
            torch.sub(x, x_hat, out=e).div_(u_blk[i, i])
            w_blk[:, i:] -= e.unsqueeze(1) * u_blk[i, i:].unsqueeze(0)
        cols.store(p.order[b1:b2] if act_order else slice(b1, b2), q_blk, used_blk)
        if b2 < in_features:
            w[:, b2:] -= err_blk @ u[b1:b2, b2:]
    return QuantizedWeight.of(cols.qweight, cols.scale, cols.zero, scheme), cols.used


def _dynamic_group(cols: _Columns, w, u, w_blk, err_blk, importance, b1: int, b2: int, i: int, gs: int) -> None:
    """Qparams of the group starting at column b1 + i from its columns as they stand now: those inside this
    block carry every update so far; those past the block still miss this block's pending (lazy) update,
    added here."""
    col, end = b1 + i, b1 + i + gs
    current = w_blk[:, i : min(end, b2) - b1]
    if end > b2:
        current = torch.cat([current, w[:, b2:end] - err_blk[:, :i] @ u[b1:col, b2:end]], dim=1)
    g = col // gs
    cols.set_qparams(slice(g, g + 1), current.unsqueeze(1), importance[col:end].unsqueeze(0))


def gptq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, scheme: WeightScheme, damp: float = 0.01, block_size: int = 128,
    retries: int = DAMP_RETRIES, act_order: bool = False, shrinks: tuple[float, ...] = (1.0,),
) -> QuantizedWeight:
    """Quantize ``weight`` [out, in] with GPTQ given its input Hessian ``hessian`` [in, in].

    Columns are processed in natural order, or with ``act_order`` in order of decreasing diag(H) with static
    groups: every group's qparams are computed from the original weight before the column loop and each
    column keeps its own group's, so the checkpoint needs no g_idx and serves like one without act-order.
    ``damp * mean(diag(H))`` is added to the diagonal of H; when H is still not positive definite the damping
    is raised x10, up to ``retries`` more times. Inputs with ``diag(H) == 0`` are dead: their weight column is
    set to 0 and H[i, i] to 1. Per channel (``group_size == -1``) the scale/zero of a row come from the whole
    row before the loop; with groups and no act-order they come from the group's current (error-updated)
    columns when the algorithm reaches the group's first column. Each group's range is its min/max shrunk by
    the factor of ``shrinks`` with the lowest reconstruction error weighted by diag(H) (``(1.0,)``: plain
    min/max). Scales are in ``weight.dtype``. ``dequantize()`` of the result is exactly the quantized weight
    the algorithm used. Computes in float32 (float64 for the damped Hessian and its Cholesky factors) on the
    weight's device.

    Raises ``NotPositiveDefinite`` if the Hessian is not positive definite at the largest damping tried, and
    ``NumericalFailure`` if it has non-finite entries.
    """
    for attempt in range(retries + 1):
        try:
            return _gptq(weight, hessian, scheme, damp * 10**attempt, block_size, act_order, shrinks)[0]
        except NotPositiveDefinite:
            if attempt == retries:
                raise
    raise AssertionError("unreachable")


def gptq_quantize_shared(
    weights: Sequence[torch.Tensor], hessian: torch.Tensor, scheme: WeightScheme, damp: float = 0.01,
    block_size: int = 128, retries: int = DAMP_RETRIES, act_order: bool = False, shrinks: tuple[float, ...] = (1.0,),
) -> list[QuantizedWeight]:
    """:func:`gptq_quantize` of linears that read one input (q/k/v, gate/up), in one column loop over their rows.

    Given the Hessian, every step of GPTQ is a step on each row alone (a group's qparams, a column's integer, the
    error it spreads along its row), and the damping, act-order and Cholesky factor come from the shared Hessian.
    So quantizing the rows together gives each linear what it would get alone, with a third of the kernel
    launches for q/k/v, which is what the column loop on a GPU is bound by.
    """
    if len({(w.dtype, w.shape[1]) for w in weights}) != 1:
        raise ValueError("GPTQ quantizes linears together only when they have one dtype and one input width, got "
                         f"{[(str(w.dtype), tuple(w.shape)) for w in weights]}")
    if len(weights) == 1:
        return [gptq_quantize(weights[0], hessian, scheme, damp, block_size, retries, act_order, shrinks)]
    rows = [w.shape[0] for w in weights]
    joint = gptq_quantize(torch.cat(list(weights)), hessian, scheme, damp, block_size, retries, act_order, shrinks)
    bounds = [sum(rows[:k]) for k in range(len(rows) + 1)]
    parts = [joint.rows(start, stop) for start, stop in zip(bounds, bounds[1:])]
    return [QuantizedWeight(p.codes.clone(), p.scale.clone(), None if p.zero is None else p.zero.clone(), scheme)
            for p in parts]  # each its own storage, not a view that keeps the joint one alive
