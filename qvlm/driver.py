"""``quantize``: the whole method in one process, for a model that fits in memory.

It runs :func:`qvlm.method.run_method` over stages that are plain objects in this process (one stage owning
every unit unless ``stages`` says how a job would cut them), so the distributed job, which runs the same
sequence over Ray actors, gives the same tensors bit for bit: every random choice is seeded and every
reduction ordered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from qvlm.config import QuantConfig
from qvlm.dependency import DependencySeries
from qvlm.method import (Block, Hooks, Layout, MethodResult, linear_shapes, plan_blocks, run_method, select_units,
                         vision_streams)
from qvlm.mixed_precision import MixedPrecisionPlan
from qvlm.search import BlockResult, linear_tensors
from qvlm.stage import Stage
from qvlm.stats import UnitStats
from qvlm.structure import Unit, segments_of
from qvlm.veo import VeoResult, tower_part, veo_phase


class LocalPipeline:
    """Stages in this process: calls run at once and their results are the values themselves."""

    def __init__(self, stages: Sequence[Stage]):
        self.stages = list(stages)
        self.n_stages = len(self.stages)

    def call(self, stage: int, method: str, *args: Any, returns: int = 1) -> Any:
        return getattr(self.stages[stage], method)(*args)

    def get(self, futures: Any) -> Any:
        return futures

    def completed(self, futures: Sequence[Any]) -> Iterable[tuple[Any, Any]]:
        return ((f, f) for f in futures)


@dataclass(frozen=True)
class VeoSummary:
    """What visual-encoder optimisation did, with the dependency series and partition it replaced."""

    history: tuple[dict, ...]  # per epoch: mean loss terms
    seconds: float
    error_before: float  # vision-output MSE with round-to-nearest quantizers
    error_after: float
    dependency_before: tuple[DependencySeries, ...]  # per stream, full-precision vision tower
    h0_before: tuple[float, ...]
    blocks_before: tuple[Block, ...]


@dataclass(frozen=True)
class QuantizeResult:
    units: tuple[Unit, ...]
    stats: tuple[UnitStats, ...]
    precision: MixedPrecisionPlan | None
    schemes: dict  # full linear name -> WeightScheme
    streams: tuple[tuple[int, ...], ...]  # unit indices of each stream (a run of one layer list)
    dependency: tuple[DependencySeries, ...]  # one per stream
    h0: tuple[float, ...]  # threshold used per stream
    blocks: tuple[Block, ...]
    block_results: tuple[BlockResult, ...]
    seconds: dict
    veo: VeoSummary | None = None

    def linear_results(self):
        return [r for b in self.block_results for r in b.linears]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every quantized tensor by name, in a fixed order (what the block shards hold)."""
        return linear_tensors(self.linear_results())


def layout_of(model: nn.Module, config: QuantConfig, stages: Sequence[Sequence[int]] | None = None) -> Layout:
    """The units to quantize, their streams and their stages (one stage unless ``stages`` gives unit indices)."""
    units = select_units(model, config)
    streams = tuple(tuple(u.index for u in run) for run in segments_of(units))
    return Layout(tuple(units), streams, tuple(tuple(s) for s in stages) if stages else (tuple(u.index for u in units),))


def local_pipeline(model: nn.Module, layout: Layout) -> LocalPipeline:
    """The stages of ``layout`` over ``model`` itself, in this process."""
    units = {u.index: u for u in layout.units}
    return LocalPipeline([Stage(model, [units[i] for i in s], first=(k == 0), device=_device(model))
                          for k, s in enumerate(layout.stages)])


def optimize_vision_encoder(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], config: QuantConfig,
                            schemes: dict, bits: dict[int, int], answers: Sequence[torch.Tensor] | None = None,
                            stages: Sequence[Sequence[int]] | None = None) -> VeoResult:
    """VEO alone, in this process, through stages cut as ``stages`` says (one by default); ``model`` unchanged."""
    layout = layout_of(model, config, stages)
    return veo_phase(local_pipeline(model, layout), batches, layout.units, schemes, bits, config, answers)


def _veo_hook(stage: Stage, pipe, layout: Layout, batches, config, answers):
    """Tune the tower through the stages, apply it in the first stage and capture again behind it."""

    def tune(schemes, bits, deps):
        tuned = veo_phase(pipe, batches, layout.units, schemes, bits, config, answers)
        blocks_before, h0_before = plan_blocks(layout.streams, deps, config, layout=layout)
        stage.apply([tuned.block], config.activations)
        for s in pipe.stages:
            s.reset_captures()
        for batch in batches:
            call = batch
            for s in pipe.stages:
                call = s.capture(call)
        return tuned, VeoSummary(tuned.history, tuned.seconds, tuned.block.error_before, tuned.block.error_after,
                                 tuple(deps), tuple(h0_before), tuple(blocks_before))

    return tune


def _finished_vision(stage: Stage, layout: Layout, tuned: list):
    def finished(blocks: Sequence[Block]) -> set[int]:
        if not tuned:
            return set()
        whole = vision_streams(layout.streams, layout.units)
        names = {u.index: u.name for u in layout.units}
        done = {b.index: b for b in blocks if b.stream in whole}
        for index, block in done.items():
            stage.results[index] = tower_part(tuned[0].block, [names[i] for i in block.units])
        return set(done)

    return finished


def quantize(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], config: QuantConfig,
             answers: Sequence[torch.Tensor] | None = None,
             stages: Sequence[Sequence[int]] | None = None) -> tuple[nn.Module, QuantizeResult]:
    """Quantize ``model`` in place (its targeted linears become FakeQuantLinear) and describe what was done.

    ``answers`` (``qvlm.batches.answer_masks``) only matters to VEO: its next-token loss covers the answers.
    ``stages`` (unit indices per stage, as a job's plan cuts them) keeps blocks inside stage boundaries the way
    a distributed job does; by default the whole model is one stage.
    """
    model.eval()
    layout = layout_of(model, config, stages)
    pipe = local_pipeline(model, layout)
    tuned: list = []
    hooks = Hooks(finished=_finished_vision(pipe.stages[0], layout, tuned))
    if config.veo.enabled:
        tune = _veo_hook(pipe.stages[0], pipe, layout, batches, config, answers)

        def tune_and_keep(schemes, bits, deps):
            result, summary = tune(schemes, bits, deps)
            tuned.append(result)
            return summary

        hooks.tune_vision = tune_and_keep
    result = run_method(pipe, layout, linear_shapes(model, layout.units), batches, config, hooks)
    return model, _finish(model, pipe, layout, result, config)


def _device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _finish(model: nn.Module, pipe: LocalPipeline, layout: Layout, result: MethodResult, config: QuantConfig) -> QuantizeResult:
    """Apply every block's quantizers to the model and gather the results in block order."""
    by_index = {i: r for s in pipe.stages for i, r in s.results.items()}
    block_results = tuple(by_index[b.index] for b in result.blocks)
    for s in pipe.stages:
        s.apply([by_index[b.index] for b in result.blocks if layout.stage_of(b.units[0]) == pipe.stages.index(s)
                 and b.index not in result.done], config.activations)
    seconds = {k: v for k, v in vars(result.seconds).items() if k != "veo" or config.veo.enabled}
    return QuantizeResult(layout.units, result.stats, result.precision, result.schemes, layout.streams, result.dependency,
                          result.h0, result.blocks, block_results, seconds, result.veo)
