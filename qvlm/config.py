"""Typed settings of one quantization run (the numerical part of a job file) and its calibration data, with the
one definition of every default (the job file's schema, jobs/spec.py, takes its defaults from here)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from qvlm.quant import ActScheme, WeightScheme
from qvlm.search import SearchConfig
from qvlm.structure import SEGMENTS, Segment


@dataclass(frozen=True)
class CalibrationSettings:
    """Where the calibration records come from and how they are batched (``calibration`` in a job file)."""

    data: str = "builtin:shapes"  # builtin:<name> or a JSONL file (qvlm.calibration)
    samples: int = 64
    eval_samples: int = 16  # held out for the evaluation
    max_length: int = 512
    batch_size: int = 8
    seed: int = 0


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
    lr: float = 0.001  # lr and lambda_error chosen by the ablation in BENCHMARKS.md "VEO"
    lambda_entropy: float = 0.1
    lambda_error: float = 10.0
    eta: float = 0.1
    max_rows: int = 512  # token rows per decoder layer in the differentiable dependency term


DEFAULT_IGNORE = ("lm_head",)


@dataclass(frozen=True)
class QuantConfig:
    method: Literal["qvlm", "gptq", "rtn"] = "qvlm"
    weights: WeightScheme = field(default_factory=WeightScheme)
    activations: ActScheme = field(default_factory=ActScheme)
    targets: tuple[Segment, ...] = SEGMENTS
    ignore: tuple[str, ...] = DEFAULT_IGNORE  # module names, or "re:<pattern>" matched from the start
    search: Literal["clip", "learned", "best"] = "best"  # defaults chosen by bench/quality.py (BENCHMARKS.md)
    max_block_depth: int = 3
    h0: float | None = None  # None = auto (mean of the dependency series)
    percentiles: tuple[float, ...] = SearchConfig.percentiles  # the search's own defaults, stated once there
    epochs: int = SearchConfig.epochs
    iters: int = SearchConfig.iters
    # What a block is calibrated on (Eq. 3): "quantized", the quantized output of the block before it in its
    # stream, across stages too (the model's blocks one after another); "stage", that within a stage and the
    # full-precision captured inputs at a stage's first block (stages search in parallel; with one stage the
    # same as "quantized"); "fp", the full-precision captured inputs everywhere.
    propagation: Literal["fp", "stage", "quantized"] = "quantized"
    mixed_precision: MixedPrecisionConfig = field(default_factory=MixedPrecisionConfig)
    veo: VeoConfig = field(default_factory=VeoConfig)
    seed: int = 0
    shrinks: tuple[float, ...] = SearchConfig.shrinks  # weight clipping: shrink factors of each group's range
    act_order: bool = SearchConfig.act_order  # gptq (the method, and the candidate of search `best`): static-group act-order
    damp: float = SearchConfig.damp  # gptq: damping, x mean(diag(H)), raised x10 on failure
    lr: float | None = None  # learned rounding: first step size (None = 1 / iters)

    def search_config(self) -> SearchConfig:
        method = self.search if self.method == "qvlm" else self.method
        return SearchConfig(method, self.percentiles, self.epochs, self.iters, self.lr, self.seed,
                            shrinks=self.shrinks, act_order=self.act_order, damp=self.damp)

    def is_ignored(self, linear_name: str) -> bool:
        return any(ignore_matches(pattern, linear_name) for pattern in self.ignore)

    def unmatched_ignore(self, module_names) -> tuple[str, ...]:
        """The ``ignore`` entries that name none of ``module_names`` (a typo ignores nothing, silently); the
        default entries are left out, since a model without an ``lm_head`` (an encoder) is no mistake of the job."""
        names = list(module_names)
        return tuple(p for p in self.ignore
                     if p not in DEFAULT_IGNORE and not any(ignore_matches(p, n) for n in names))


def ignore_matches(pattern: str, module_name: str) -> bool:
    """An ``ignore`` entry names a module: ``re:<pattern>`` matched from the start of the full name, else the
    full name or its trailing dotted part (``mlp.down_proj`` names ``model.layers.3.mlp.down_proj``)."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module_name) is not None
    return module_name == pattern or module_name.endswith("." + pattern)
