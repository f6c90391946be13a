"""Cross-layer dependency D(k, k+1): conditional entropy of consecutive units' quantized outputs (Q-VLM Eq. 4-5).

Our readings where the paper is silent (method.md 1.3 and 3):
- the "layer activation" is a unit's output (the residual stream), so units k and k+1 share element indices;
- D is measured on the *quantized* activations, as Eq. 4 names them: each element is rounded to the nearest of
  the M = 2^bits levels of its channel's uniform grid (per-channel min/max over the calibration data), the
  joint P(m, m') of consecutive units' levels is pooled over elements and samples, and
  D = H(k+1 | k) / H(k+1): the share of unit k+1's quantized entropy that unit k leaves unexplained. It is 0
  when k+1's levels are a function of k's and about 1 when the two are independent, at any bit widths, so
  units of different widths compare (mixed precision changes them). The previous reading, a soft assignment
  divided by log M, sat on a floor that depended on the width (identical outputs gave 0.50 at 4 bits, 0.26 at
  8 bits);
- the soft assignment ``p(m) ∝ exp(-((x - q_m) / Δ)^2)`` (Eq. 5, distance in grid steps) stays for what must be
  differentiable: the dependency term of visual-encoder optimisation (qvlm/veo.py).
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Sequence

import torch

from qvlm.capture import sampled_rows


@dataclass(frozen=True)
class ChannelGrid:
    lo: torch.Tensor  # [C]
    hi: torch.Tensor  # [C]
    levels: int


def channel_grid(rows: torch.Tensor, bits: int) -> ChannelGrid:
    return ChannelGrid(rows.amin(0), rows.amax(0), 1 << bits)


def soft_assign(rows: torch.Tensor, grid: ChannelGrid) -> torch.Tensor:
    """[N, C] values -> [N * C, M] soft level probabilities."""
    span = (grid.hi - grid.lo).clamp_min(torch.finfo(torch.float32).tiny)
    steps = (rows - grid.lo) / span * (grid.levels - 1)  # position in grid steps, [N, C]
    levels = torch.arange(grid.levels, dtype=rows.dtype, device=rows.device)
    logits = -((steps.reshape(-1, 1) - levels) ** 2)
    return torch.softmax(logits, dim=-1)


def joint_distribution(
    rows_k: torch.Tensor, rows_next: torch.Tensor, grid_k: ChannelGrid, grid_next: ChannelGrid, chunk_rows: int = 256
) -> torch.Tensor:
    """P(m, m') pooled over every element, accumulated in float64 in a fixed order."""
    joint = torch.zeros(grid_k.levels, grid_next.levels, dtype=torch.float64, device=rows_k.device)
    for start in range(0, rows_k.shape[0], chunk_rows):
        joint += chunk_counts(rows_k[start : start + chunk_rows], rows_next[start : start + chunk_rows], grid_k, grid_next)
    return joint / joint.sum()


def chunk_counts(rows_k: torch.Tensor, rows_next: torch.Tensor, grid_k: ChannelGrid, grid_next: ChannelGrid) -> torch.Tensor:
    """One chunk of rows' share of the (unnormalised) joint of soft levels, in float64."""
    return (soft_assign(rows_k, grid_k).T @ soft_assign(rows_next, grid_next)).double()


def conditional_entropy_tensor(joint: torch.Tensor) -> torch.Tensor:
    """H(next | k) = -sum P(m, m') log(P(m, m') / P(m)), in nats, as a tensor (differentiable in ``joint``)."""
    marginal = joint.sum(1, keepdim=True)
    ratio = torch.where(joint > 0, joint / marginal.clamp_min(1e-300), torch.ones_like(joint))
    return -(joint * ratio.log()).sum()


def conditional_entropy(joint: torch.Tensor) -> float:
    return float(conditional_entropy_tensor(joint))


def entropy(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def quantized_levels(rows: torch.Tensor, grid: ChannelGrid) -> torch.Tensor:
    """[N, C] values -> [N * C] level indices on each channel's grid (round to nearest, clamped)."""
    span = (grid.hi - grid.lo).clamp_min(torch.finfo(torch.float32).tiny)
    steps = (rows.float() - grid.lo) / span * (grid.levels - 1)
    return torch.clamp(torch.round(steps), 0, grid.levels - 1).long().reshape(-1)


def level_joint(rows_k: torch.Tensor, rows_next: torch.Tensor, grid_k: ChannelGrid, grid_next: ChannelGrid,
                chunk_rows: int = 1024) -> torch.Tensor:
    """P(m, m') of the two units' quantized levels, pooled over every element (exact integer counts)."""
    counts = torch.zeros(grid_k.levels * grid_next.levels, dtype=torch.int64, device=rows_k.device)
    for start in range(0, rows_k.shape[0], chunk_rows):
        a = quantized_levels(rows_k[start : start + chunk_rows], grid_k)
        b = quantized_levels(rows_next[start : start + chunk_rows], grid_next)
        counts += torch.bincount(a * grid_next.levels + b, minlength=counts.numel())
    joint = counts.double().reshape(grid_k.levels, grid_next.levels)
    return joint / joint.sum()


@dataclass(frozen=True)
class DependencySeries:
    """For one stream of n units: normalised entropy of each unit's output and D between neighbours."""

    entropy: tuple[float, ...]  # n values, H(k) / log M_k
    dependency: tuple[float, ...]  # n - 1 values, H(k+1 | k) / H(k+1)


def unit_rows(outputs: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None], max_rows: int | None = 4096) -> torch.Tensor:
    """One unit's output rows over all batches (valid tokens only, float32), strided down to ``max_rows`` one
    batch at a time."""
    return sampled_rows(outputs, masks, max_rows)


def unit_entropy(rows: torch.Tensor, bits: int) -> float:
    """H(k) / log M_k of the unit's quantized levels, pooled over its elements."""
    grid = channel_grid(rows, bits)
    counts = torch.bincount(quantized_levels(rows, grid), minlength=grid.levels).double()
    return entropy(counts / counts.sum()) / math.log(grid.levels)


def pair_dependency(rows_k: torch.Tensor, rows_next: torch.Tensor, bits_k: int, bits_next: int) -> float:
    """D(k, k+1) = H(k+1 | k) / H(k+1) on the quantized levels; rows of both units must come from the same
    tokens. 0 when unit k+1's output is constant."""
    joint = level_joint(rows_k, rows_next, channel_grid(rows_k, bits_k), channel_grid(rows_next, bits_next))
    h_next, h_cond = entropy(joint.sum(0)), conditional_entropy(joint)
    return h_cond / h_next if h_next > 0 and h_cond > 0 else 0.0


def dependency_series(
    outputs: Sequence[Sequence[torch.Tensor]],
    masks: Sequence[Sequence[torch.Tensor | None]],
    bits: Sequence[int],
    max_rows: int | None = 4096,
) -> DependencySeries:
    """``outputs[k][b]`` is unit k's output on batch b ([B, T, C]); all units of a stream share shapes.

    ``max_rows`` keeps an evenly strided subset of token rows (the same rows for every unit).
    """
    rows = [unit_rows(o, m, max_rows) for o, m in zip(outputs, masks)]
    entropies = tuple(unit_entropy(r, b) for r, b in zip(rows, bits))
    deps = tuple(pair_dependency(rows[k], rows[k + 1], bits[k], bits[k + 1]) for k in range(len(rows) - 1))
    return DependencySeries(entropies, deps)
