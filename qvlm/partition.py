"""Entropy-guided block partition (Q-VLM Eq. 7, method.md 1.4).

A span of units k..s stays one block while the mean dependency along its chain exceeds h0 and its depth
is at most d_max. ``h0=None`` means "auto": the mean of the series, which is what the authors' code does
in effect. The result is a deterministic function of the series.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Partition:
    blocks: tuple[tuple[int, ...], ...]  # positions in the stream, each block consecutive
    h0: float


def partition(dependency: Sequence[float], n_units: int, max_depth: int, h0: float | None = None) -> Partition:
    """``dependency[j]`` = D(j, j+1) for j in 0..n_units-2."""
    if max_depth < 1:
        raise ValueError(f"max_block_depth must be at least 1, got {max_depth}")
    if len(dependency) != max(n_units - 1, 0):
        raise ValueError(f"need {n_units - 1} dependency values for {n_units} units, got {len(dependency)}")
    if h0 is not None:
        threshold = h0
    else:
        threshold = sum(dependency) / len(dependency) if dependency else 0.0
    blocks, start = [], 0
    while start < n_units:
        end = start
        while end + 1 < n_units and end + 2 - start <= max_depth and sum(dependency[start : end + 1]) > (end + 1 - start) * threshold:
            end += 1
        blocks.append(tuple(range(start, end + 1)))
        start = end + 1
    return Partition(tuple(blocks), threshold)
