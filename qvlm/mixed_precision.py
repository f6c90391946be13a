"""SensiBoost / KurtBoost mixed-precision allocation (method.md §2).

Difficulty signals per linear (kurtosis of the weight, or the normalised output error of its module
group), a trimmed z-score detector that flags the layer after a jump in a module type's series, and a
greedy allocator that moves flagged groups up a ladder of (bits, group_size) rungs within a storage budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .quant import WeightScheme, fake_quantize_weight, row_slices

Method = Literal["divide", "subtract"]

LADDER: tuple[tuple[int, int], ...] = (
    (2, 128), (2, 64), (2, 32),
    (3, 128), (3, 64), (3, 32),
    (4, 128), (4, 64), (4, 32),
    (8, 128), (8, 64), (8, 32),
)  # fmt: skip

_REF_SHAPE = (4096, 4096)  # representative layer used only to order the ladder by cost
_CHUNK_ELEMENTS = 1 << 22  # input elements multiplied at a time (16 MiB in float32)
_REL_SD_FLOOR = 1e-9


# --------------------------------------------------------------------------------------------- signals


KURTOSIS_CHUNK = 1 << 22  # elements per float64 copy: a 13B MLP weight is never copied whole to float64


def kurtosis(w: torch.Tensor) -> float:
    """Pearson (non-excess) kurtosis over all elements, in float64 chunk by chunk; NaN for a constant tensor."""
    if w.numel() == 0:
        raise ValueError("kurtosis of an empty tensor")
    chunks = w.detach().reshape(-1).split(KURTOSIS_CHUNK)
    n = w.numel()
    mean = sum(float(c.double().sum()) for c in chunks) / n
    m2 = m4 = 0.0
    for c in chunks:
        sq = (c.double() - mean).square()
        m2 += float(sq.sum())
        m4 += float(sq.square().sum())
    m2, m4 = m2 / n, m4 / n
    if m2 == 0:
        return math.nan
    return m4 / (m2 * m2)


def sensitivity_terms(weight: torch.Tensor, inputs: torch.Tensor, scheme: WeightScheme) -> tuple[float, float]:
    """(||W X - Q(W) X||^2, ||W X||^2) summed over all tokens of ``inputs`` [..., in].

    Output rows go a slice at a time (every group lies within one row, so quantizing a slice is quantizing the
    rows it holds): the float32 copies are one slice of the weight, never the whole of a wide layer."""
    w = weight.detach()
    x = inputs.detach().reshape(-1, inputs.shape[-1]).to(w.device)
    err = out = 0.0
    for w_rows in row_slices(w):
        wt = w_rows.float().t()
        delta = wt - fake_quantize_weight(w_rows, scheme).float().t()
        for chunk in x.split(max(1, _CHUNK_ELEMENTS // x.shape[1])):  # bounds the float32 copies and [tokens, out]
            c = chunk.float()
            err += float((c @ delta).double().square_().sum())
            out += float((c @ wt).double().square_().sum())
    return err, out


def group_sensitivity(terms: Sequence[tuple[float, float]]) -> float:
    """Summed error energy over summed output energy for the linears of one module group."""
    err = sum(t[0] for t in terms)
    out = sum(t[1] for t in terms)
    if out <= 0.0:
        return 0.0 if err == 0.0 else math.inf
    return err / out


# --------------------------------------------------------------------------------------------- detector


def _jumps(series: Sequence[float], method: Method) -> list[float]:
    if method == "subtract":
        return [b - a for a, b in zip(series, series[1:])]
    if method != "divide":
        raise ValueError(f"method must be 'divide' or 'subtract', got {method!r}")
    return [_ratio(a, b) for a, b in zip(series, series[1:])]


def _ratio(a: float, b: float) -> float:
    if a != 0:
        return b / a
    return 1.0 if b == 0 else math.copysign(math.inf, b)  # an infinite jump always scores z = inf


def _trimmed_mean_std(values: Sequence[float], trim: float) -> tuple[float, float]:
    """Mean and std (ddof=1) after cutting ``trim`` of the sorted values at each tail, keeping >= 2."""
    s = sorted(values)
    cut = min(int(trim * len(s)), max(0, (len(s) - 2) // 2))
    kept = s[cut : len(s) - cut]
    mu = sum(kept) / len(kept)
    var = sum((v - mu) ** 2 for v in kept) / (len(kept) - 1)
    return mu, math.sqrt(var)


def outlier_scores(
    series: Sequence[float], method: Method, top_m: int = 0, z_threshold: float = 3.0, trim: float = 0.05
) -> list[tuple[int, float]]:
    """(series index of the sensitive layer, z of the jump into it), kept ones only, sorted by index."""
    if top_m < 0 or not 0.0 <= trim < 0.5:
        raise ValueError(f"need top_m >= 0 and 0 <= trim < 0.5, got top_m={top_m}, trim={trim}")
    if any(math.isnan(v) for v in series):
        raise ValueError("metric series contains NaN")
    if len(series) < 3:
        return []
    d = _jumps(series, method)
    mu, sd = _trimmed_mean_std(d, trim)
    if not (math.isfinite(mu) and math.isfinite(sd)):
        return []
    # A spread at floating-point rounding level (e.g. a linear series) is no spread; without this floor
    # rounding noise in the jumps would get z-scores in the thousands.
    scale = max(abs(v) for v in series) if method == "subtract" else abs(mu)
    if sd <= _REL_SD_FLOOR * scale:
        return []
    cand = [(abs(v - mu) / sd, i) for i, v in enumerate(d)]
    cand = sorted((c for c in cand if c[0] > z_threshold), key=lambda c: (-c[0], c[1]))
    if top_m:
        cand = cand[:top_m]
    return sorted((i + 1, z) for z, i in cand)


def detect_outliers(
    series: Sequence[float], method: Method, top_m: int = 0, z_threshold: float = 3.0, trim: float = 0.05
) -> list[int]:
    """Sensitive layer positions (the layer after each outlying jump, §2.4), ascending; never 0."""
    return [i for i, _ in outlier_scores(series, method, top_m, z_threshold, trim)]


# --------------------------------------------------------------------------------------------- ladder


def _cost_key(s: WeightScheme) -> tuple[int, int, float]:
    return (s.storage_bits(*_REF_SHAPE), s.bits, math.inf if s.group_size == -1 else s.group_size)


def ladder_for(base: WeightScheme) -> list[WeightScheme]:
    """The ladder rungs with the base's symmetry, plus the base if off-ladder, by storage cost."""
    rungs = {WeightScheme(b, g, base.symmetric) for b, g in LADDER} | {base}
    return sorted(rungs, key=_cost_key)


def _fits(scheme: WeightScheme, in_features: int) -> bool:
    return scheme.group_size == -1 or in_features % scheme.group_size == 0


# --------------------------------------------------------------------------------------------- allocation


@dataclass(frozen=True)
class LinearInfo:
    name: str  # full module name
    type_key: str  # module type (or module group) within its unit, e.g. "self_attn.q_proj"
    position: int  # index of the unit (layer) along the series
    out_features: int
    in_features: int
    metric: float  # kurtosis of this linear, or the sensitivity of its group


@dataclass(frozen=True)
class LayerAssignment:
    name: str
    scheme: WeightScheme
    boosted: bool
    metric: float
    z: float | None  # z of the jump into this layer when flagged, else None


@dataclass(frozen=True)
class MixedPrecisionPlan:
    assignments: tuple[LayerAssignment, ...]  # one per input LinearInfo, same order
    base_bits: int  # storage bits of all layers at the base scheme
    total_bits: int  # storage bits with the plan
    budget_bits: int  # floor(base_bits * (1 + extra_budget))
    n_weights: int  # number of weights over all layers

    def scheme_for(self, name: str) -> WeightScheme:
        for a in self.assignments:
            if a.name == name:
                return a.scheme
        raise KeyError(name)

    @property
    def boosted(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.assignments if a.boosted)

    @property
    def bits_per_weight(self) -> float:
        return self.total_bits / self.n_weights if self.n_weights else 0.0


Group = tuple[str, int]  # (type_key, position)


def _groups(layers: Sequence[LinearInfo], base: WeightScheme) -> dict[Group, list[int]]:
    """Member indices per (type_key, position); validates names, base fit and shared metrics."""
    groups: dict[Group, list[int]] = {}
    seen: set[str] = set()
    for i, info in enumerate(layers):
        if info.name in seen:
            raise ValueError(f"duplicate layer name {info.name!r}")
        seen.add(info.name)
        if not _fits(base, info.in_features):
            raise ValueError(
                f"base group_size {base.group_size} does not divide in_features {info.in_features} of {info.name}"
            )
        members = groups.setdefault((info.type_key, info.position), [])
        if members and layers[members[0]].metric != info.metric:
            raise ValueError(f"{info.name} and {layers[members[0]].name} share a group but not a metric")
        members.append(i)
    return groups


def _flagged(
    layers: Sequence[LinearInfo], groups: dict[Group, list[int]], method: Method, top_m: int
) -> list[tuple[float, Group]]:
    """(z, group) for every flagged group, in visiting order: descending z, then type_key, position."""
    flagged = []
    for key in sorted({k for k, _ in groups}):
        positions = sorted(p for k, p in groups if k == key)
        series = [layers[groups[(key, p)][0]].metric for p in positions]
        flagged += [(z, (key, positions[i])) for i, z in outlier_scores(series, method, top_m)]
    return sorted(flagged, key=lambda f: (-f[0], f[1]))


def _boost_target(ladder: list[WeightScheme], base_idx: int, steps: int, ins: list[int]) -> WeightScheme | None:
    """Rung ``steps`` above base (capped at the top), moved up to the next rung all members fit."""
    valid = [j for j in range(base_idx + 1, len(ladder)) if all(_fits(ladder[j], n) for n in ins)]
    if not valid:
        return None
    target = min(base_idx + steps, len(ladder) - 1)
    return ladder[next((j for j in valid if j >= target), valid[-1])]


def allocate(
    layers: Sequence[LinearInfo],
    base: WeightScheme,
    method: Method,
    extra_budget: float,
    stop: int,
    top_m: int = 0,
) -> MixedPrecisionPlan:
    """Boost flagged groups by up to ``stop`` rungs, most outlying first, within the storage budget."""
    if extra_budget < 0 or stop < 0:
        raise ValueError(f"need extra_budget >= 0 and stop >= 0, got {extra_budget}, {stop}")
    groups = _groups(layers, base)
    schemes = [base] * len(layers)
    cost = [base.storage_bits(x.out_features, x.in_features) for x in layers]
    base_bits = total = sum(cost)
    budget = math.floor(base_bits * (1 + extra_budget))
    ladder = ladder_for(base)
    base_idx = ladder.index(base)
    zs: dict[int, float] = {}
    for z, group in _flagged(layers, groups, method, top_m):
        members = groups[group]
        zs.update((i, z) for i in members)
        for steps in range(stop, 0, -1):
            target = _boost_target(ladder, base_idx, steps, [layers[i].in_features for i in members])
            if target is None:
                break
            new = [target.storage_bits(layers[i].out_features, layers[i].in_features) for i in members]
            delta = sum(new) - sum(cost[i] for i in members)
            if total + delta <= budget:
                total += delta
                for i, c in zip(members, new):
                    schemes[i], cost[i] = target, c
                break
    return _plan(layers, schemes, base, zs, base_bits, total, budget)


def _plan(layers, schemes, base, zs, base_bits, total, budget) -> MixedPrecisionPlan:
    assignments = tuple(
        LayerAssignment(x.name, s, s != base, x.metric, zs.get(i)) for i, (x, s) in enumerate(zip(layers, schemes))
    )
    n_weights = sum(x.out_features * x.in_features for x in layers)
    return MixedPrecisionPlan(assignments, base_bits, total, budget, n_weights)
