"""Typed settings of one quantization run (the numerical part of a job file)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from qvlm.quant import SHRINK_GRID, ActScheme, WeightScheme
from qvlm.search import SearchConfig
from qvlm.structure import SEGMENTS, Segment


@dataclass(frozen=True)
class MixedPrecisionConfig:
    metric: Literal["none", "sensitivity", "kurtosis"] = "none"
    extra_budget: float = 0.02
    stop: int = 2
    top_m: int = 0


@dataclass(frozen=True)
class VeoConfig:
    """Visual-encoder optimisation (Q-VLM Eq. 8-10, our reading in qvlm/veo.py); off by default."""

    enabled: bool = False
    epochs: int = 4
    lr: float = 0.01
    lambda_entropy: float = 0.1
    lambda_error: float = 1.0
    eta: float = 0.1
    max_rows: int = 512  # token rows per decoder layer in the differentiable dependency term


@dataclass(frozen=True)
class QuantConfig:
    method: Literal["qvlm", "gptq", "rtn"] = "qvlm"
    weights: WeightScheme = field(default_factory=WeightScheme)
    activations: ActScheme = field(default_factory=ActScheme)
    targets: tuple[Segment, ...] = SEGMENTS
    ignore: tuple[str, ...] = ("lm_head",)  # module names, or "re:<pattern>" matched from the start
    search: Literal["clip", "learned", "best"] = "best"  # defaults chosen by bench/quality.py (BENCHMARKS.md)
    max_block_depth: int = 3
    h0: float | None = None  # None = auto (mean of the dependency series)
    percentiles: tuple[float, ...] = (1.0, 0.995, 0.99, 0.985, 0.98)
    epochs: int = 4
    iters: int = 100
    propagation: Literal["fp", "quantized"] = "quantized"
    mixed_precision: MixedPrecisionConfig = field(default_factory=MixedPrecisionConfig)
    veo: VeoConfig = field(default_factory=VeoConfig)
    seed: int = 0
    shrinks: tuple[float, ...] = SHRINK_GRID  # weight clipping: shrink factors of each group's range
    act_order: bool = True  # gptq (the method, and the candidate of search `best`): static-group act-order
    damp: float = 0.01  # gptq: damping, x mean(diag(H)), raised x10 on failure
    lr: float | None = None  # learned rounding: first step size (None = 1 / iters)

    def search_config(self) -> SearchConfig:
        method = self.search if self.method == "qvlm" else self.method
        return SearchConfig(method, self.percentiles, self.epochs, self.iters, self.lr, self.seed,
                            shrinks=self.shrinks, act_order=self.act_order, damp=self.damp)

    def is_ignored(self, linear_name: str) -> bool:
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                if re.match(pattern[3:], linear_name):
                    return True
            elif linear_name == pattern or linear_name.endswith("." + pattern):
                return True
        return False
