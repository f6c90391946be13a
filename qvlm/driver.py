"""``quantize``: the whole method in one process, for a model that fits in memory.

capture -> statistics -> mixed-precision plan -> dependency + partition -> block searches -> apply.
The distributed job runs the same steps through `plan_*` and `search.search_block`, so its result must
match this one bit for bit: every random choice here is seeded and every reduction ordered.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from qvlm.capture import UnitCapture, capture_units
from qvlm.config import QuantConfig
from qvlm.dependency import DependencySeries, dependency_series
from qvlm.fakequant import swap_in_fake_quant
from qvlm.mixed_precision import LinearInfo, MixedPrecisionPlan, allocate
from qvlm.partition import partition
from qvlm.search import (BlockData, BlockResult, apply_linear_results, linear_tensors, quantized_block_outputs,
                         search_block)
from qvlm.stats import UnitStats, unit_statistics
from qvlm.structure import Unit, find_units, segments_of
from qvlm.veo import apply_veo, optimize_vision_encoder

_DETECTOR = {"sensitivity": "divide", "kurtosis": "subtract"}


@dataclass(frozen=True)
class Block:
    index: int
    stream: int
    units: tuple[int, ...]  # global unit indices, consecutive within one stream


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


def select_units(model: nn.Module, config: QuantConfig) -> list[Unit]:
    """Units in the targeted segments, each keeping only its linears that ``ignore`` does not name."""
    units = []
    for u in find_units(model):
        linears = tuple(n for n in u.linears if not config.is_ignored(u.linear_name(n)))
        if u.segment in config.targets and linears:
            units.append(Unit(len(units), u.name, u.segment, linears))
    if not units:
        raise ValueError("nothing to quantize: every unit is outside `targets` or fully covered by `ignore`")
    return units


def linear_shapes(model: nn.Module, units: Sequence[Unit]) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every unit linear; works on a meta-device skeleton."""
    return {
        u.linear_name(n): (lin.out_features, lin.in_features)
        for u in units for n in u.linears for lin in [model.get_submodule(u.linear_name(n))]
    }


def plan_precision(
    shapes: dict[str, tuple[int, int]], units: Sequence[Unit], stats: Sequence[UnitStats], config: QuantConfig
) -> tuple[dict, MixedPrecisionPlan | None]:
    """Weight scheme per linear: the base everywhere, boosted where the mixed-precision plan says so."""
    mp = config.mixed_precision
    if mp.metric == "none":
        for name, (_, in_features) in shapes.items():
            config.weights.groups(in_features)
        return {n: config.weights for n in shapes}, None
    infos = []
    for pos, (u, st) in enumerate(zip(units, stats)):
        for n in u.linears:
            out_f, in_f = shapes[u.linear_name(n)]
            key, metric = (st.group_of(n), st.sensitivity[st.group_of(n)]) if mp.metric == "sensitivity" else (n, st.kurtosis[n])
            infos.append(LinearInfo(u.linear_name(n), f"{u.segment}:{key}", pos, out_f, in_f, metric))
    plan = allocate(infos, config.weights, _DETECTOR[mp.metric], mp.extra_budget, mp.stop, mp.top_m)
    return {a.name: a.scheme for a in plan.assignments}, plan


def unit_bits(unit: Unit, schemes: dict, config: QuantConfig) -> int:
    """Bits of the grid a unit's output is measured on for D: activation bits, else its widest weight bits."""
    if config.activations.enabled:
        return config.activations.bits
    return max(schemes[unit.linear_name(n)].bits for n in unit.linears)


def plan_blocks(streams: Sequence[Sequence[int]], deps: Sequence[DependencySeries], config: QuantConfig,
                whole_streams: Sequence[int] = ()) -> tuple[list[Block], list[float]]:
    """Entropy-guided partition per stream for `qvlm`; one unit per block for the baselines.

    Streams listed in ``whole_streams`` (the vision tower once VEO has tuned it) become a single block.
    """
    blocks, thresholds = [], []
    for s, (stream, dep) in enumerate(zip(streams, deps)):
        depth = config.max_block_depth if config.method == "qvlm" else 1
        part = partition(dep.dependency, len(stream), depth, config.h0)
        thresholds.append(part.h0)
        spans = [tuple(range(len(stream)))] if s in whole_streams else part.blocks
        blocks += [Block(len(blocks) + i, s, tuple(stream[j] for j in b)) for i, b in enumerate(spans)]
    return blocks, thresholds


def vision_streams(streams: Sequence[Sequence[int]], units: Sequence[Unit]) -> list[int]:
    return [s for s, stream in enumerate(streams) if units[stream[0]].segment == "vision"]


def block_data(model: nn.Module, block: Block, units: Sequence[Unit], caps: Sequence[UnitCapture],
               schemes: dict, config: QuantConfig, inputs: list[torch.Tensor] | None) -> BlockData:
    us = [units[i] for i in block.units]
    calls = [list(caps[i].calls) for i in block.units]
    if inputs is not None:
        calls[0] = [c.with_hidden(h) for c, h in zip(calls[0], inputs)]
    return BlockData(
        [model.get_submodule(u.name) for u in us], [u.name for u in us], [u.linears for u in us], calls,
        caps[block.units[-1]].outputs, {u.linear_name(n): schemes[u.linear_name(n)] for u in us for n in u.linears},
        config.activations,
    )


@torch.no_grad()
def _statistics(model, units, caps, config) -> list[UnitStats]:
    return [unit_statistics(model.get_submodule(u.name), u, u.linears, c.calls, config.weights) for u, c in zip(units, caps)]


def _dependencies(units, caps, schemes, config, streams) -> list[DependencySeries]:
    return [
        dependency_series([caps[i].outputs for i in s], [[c.mask for c in caps[i].calls] for i in s],
                          [unit_bits(units[i], schemes, config) for i in s])
        for s in streams
    ]


def _search_all(model, blocks, units, caps, schemes, config, done: dict[int, BlockResult]) -> list[BlockResult]:
    """Blocks in order; with ``propagation: quantized`` a block takes the quantized output of the block
    before it in the same stream (Eq. 3); the first block of each stream takes the captured FP input.
    Blocks in ``done`` (the VEO-tuned vision tower) keep their result."""
    results, carried = [], None
    for i, b in enumerate(blocks):
        if b.index in done:
            results.append(done[b.index])
            carried = None  # a done block is a whole stream: nothing follows it in the same stream
            continue
        same_stream = i > 0 and blocks[i - 1].stream == b.stream
        inputs = carried if config.propagation == "quantized" and same_stream else None
        data = block_data(model, b, units, caps, schemes, config, inputs)
        result = search_block(data, config.search_config())
        results.append(result)
        if config.propagation == "quantized":
            carried = quantized_block_outputs(data, result)
    return results


def quantize(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], config: QuantConfig,
             answers: Sequence[torch.Tensor] | None = None) -> tuple[nn.Module, QuantizeResult]:
    """Quantize ``model`` in place (its targeted linears become FakeQuantLinear) and describe what was done.

    ``answers`` (``qvlm.batches.answer_masks``) only matters to VEO: its next-token loss covers the answers.
    """
    model.eval()
    seconds, t = {}, time.perf_counter()
    units = select_units(model, config)
    caps = capture_units(model, units, batches)
    seconds["capture"], t = time.perf_counter() - t, time.perf_counter()
    stats = _statistics(model, units, caps, config)
    schemes, precision = plan_precision(linear_shapes(model, units), units, stats, config)
    seconds["statistics"], t = time.perf_counter() - t, time.perf_counter()
    streams = [tuple(u.index for u in run) for run in segments_of(units)]
    deps = _dependencies(units, caps, schemes, config, streams)
    veo, done, whole = None, {}, []
    if config.veo.enabled:
        bits = {u.index: unit_bits(u, schemes, config) for u in units}
        tuned = optimize_vision_encoder(model, batches, units, schemes, config, bits, answers)
        blocks_before, h0_before = plan_blocks(streams, deps, config)
        apply_veo(model, tuned, config.activations)
        caps = capture_units(model, units, batches)  # the language model now sees the tuned quantized tower
        veo = VeoSummary(tuned.history, tuned.seconds, tuned.block.error_before, tuned.block.error_after, tuple(deps),
                         tuple(h0_before), tuple(blocks_before))
        deps = _dependencies(units, caps, schemes, config, streams)
        whole = vision_streams(streams, units)
        seconds["veo"], t = time.perf_counter() - t, time.perf_counter()
    blocks, thresholds = plan_blocks(streams, deps, config, whole)
    if veo is not None:
        done = {b.index: tuned.block for b in blocks if b.stream in whole}
    seconds["partition"], t = time.perf_counter() - t, time.perf_counter()
    results = _search_all(model, blocks, units, caps, schemes, config, done)
    seconds["search"] = time.perf_counter() - t
    fq = swap_in_fake_quant(model, [r.name for b in results for r in b.linears])
    for b in results:
        apply_linear_results(fq, b.linears, config.activations)
    return model, QuantizeResult(tuple(units), tuple(stats), precision, schemes, tuple(streams), tuple(deps),
                                 tuple(thresholds), tuple(blocks), tuple(results), seconds, veo)
