"""The method as one sequence of phases, run the same way in one process and as a distributed job.

capture -> statistics -> mixed-precision plan -> dependency series -> (visual-encoder optimisation) ->
partition -> block searches. Each phase is a small function with typed input and output. The stages that
hold the units and their captures are reached through a :class:`Pipeline`: in one process it calls
:class:`qvlm.stage.Stage` objects directly (``qvlm.driver``); in a job it calls Ray actors (``cluster.pipeline``)
and its results are futures. Because both run this one sequence, the job gives the one-process result bit for
bit when the stages are cut the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence

from torch import nn

from qvlm.config import QuantConfig
from qvlm.dependency import DependencySeries
from qvlm.mixed_precision import LinearInfo, MixedPrecisionPlan, allocate
from qvlm.partition import partition
from qvlm.stage import BlockJob, BlockSummary
from qvlm.stats import UnitStats
from qvlm.structure import Unit, find_units

_DETECTOR = {"sensitivity": "divide", "kurtosis": "subtract"}


class Pipeline(Protocol):
    """The stages of a run. ``call`` invokes a stage method and returns its result or a future of it; a
    future may be passed as an argument to a later call; ``get`` resolves futures (lists of them too);
    ``completed`` yields (future, value) as results become ready."""

    n_stages: int

    def call(self, stage: int, method: str, *args: Any, returns: int = 1) -> Any: ...

    def get(self, futures: Any) -> Any: ...

    def completed(self, futures: Sequence[Any]) -> Iterable[tuple[Any, Any]]: ...


@dataclass(frozen=True)
class Block:
    index: int
    stream: int
    units: tuple[int, ...]  # global unit indices, consecutive within one stream and one stage


@dataclass(frozen=True)
class Layout:
    """Where the units are: their order, the streams (runs of one layer list) and the stage owning each."""

    units: tuple[Unit, ...]
    streams: tuple[tuple[int, ...], ...]
    stages: tuple[tuple[int, ...], ...]

    def stage_of(self, unit_index: int) -> int:
        return next(s for s, stage in enumerate(self.stages) if unit_index in stage)

    def previous_in_stream(self) -> dict[int, int | None]:
        return {i: (s[p - 1] if p > 0 else None) for s in self.streams for p, i in enumerate(s)}


@dataclass(frozen=True)
class PhaseSeconds:
    capture: float = 0.0
    statistics: float = 0.0
    veo: float = 0.0
    partition: float = 0.0
    search: float = 0.0


@dataclass(frozen=True)
class MethodResult:
    stats: tuple[UnitStats, ...]
    schemes: dict  # full linear name -> WeightScheme
    precision: MixedPrecisionPlan | None
    dependency: tuple[DependencySeries, ...]  # one per stream
    h0: tuple[float, ...]  # threshold used per stream
    blocks: tuple[Block, ...]
    summaries: dict[int, BlockSummary]  # block index -> what its search found (searched blocks only)
    done: frozenset[int]  # blocks finished before the search phase (resumed, or the VEO-tuned tower)
    seconds: PhaseSeconds
    veo: Any = None  # what the visual-encoder optimisation hook returned


@dataclass
class Hooks:
    """What a run adds to the sequence. ``tune_vision(schemes, bits, deps)`` tunes the vision tower and
    captures again behind it (returns a summary kept in the result); ``finished(blocks)`` names the blocks an
    earlier run finished; ``progress(phase, done, total)`` hears of each step."""

    tune_vision: Callable[[dict, dict, list], Any] | None = None
    finished: Callable[[Sequence[Block]], set[int]] = field(default=lambda blocks: set())
    progress: Callable[[str, int, int], None] = field(default=lambda phase, done, total: None)


# --- planning (pure) -------------------------------------------------------------------------------------

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


def plan_precision(shapes: dict[str, tuple[int, int]], units: Sequence[Unit], stats: Sequence[UnitStats],
                   config: QuantConfig) -> tuple[dict, MixedPrecisionPlan | None]:
    """Weight scheme per linear: the base everywhere, boosted where the mixed-precision plan says so."""
    mp = config.mixed_precision
    if mp.metric == "none":
        for _, in_features in shapes.values():
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


def _stage_runs(stream: Sequence[int], layout: Layout | None) -> list[tuple[int, int]]:
    """[start, end) positions of the runs of a stream that lie in one stage."""
    if layout is None:
        return [(0, len(stream))]
    owners = [layout.stage_of(i) for i in stream]
    cuts = [p for p in range(1, len(stream)) if owners[p] != owners[p - 1]]
    edges = [0, *cuts, len(stream)]
    return list(zip(edges[:-1], edges[1:]))


def plan_blocks(streams: Sequence[Sequence[int]], deps: Sequence[DependencySeries], config: QuantConfig,
                whole_streams: Sequence[int] = (), layout: Layout | None = None) -> tuple[list[Block], list[float]]:
    """Entropy-guided partition per stream for `qvlm`, one unit per block for the baselines; never across a
    stage boundary of ``layout`` (each run of a stream inside one stage is partitioned with the stream's h0).

    Streams listed in ``whole_streams`` (the vision tower once VEO has tuned it) become a single block.
    """
    blocks, thresholds = [], []
    depth = config.max_block_depth if config.method == "qvlm" else 1
    for s, (stream, dep) in enumerate(zip(streams, deps)):
        h0 = partition(dep.dependency, len(stream), depth, config.h0).h0
        thresholds.append(h0)
        spans = [tuple(range(len(stream)))] if s in whole_streams else [
            tuple(start + p for p in span)
            for start, end in _stage_runs(stream, layout)
            for span in partition(dep.dependency[start:end - 1], end - start, depth, h0).blocks
        ]
        blocks += [Block(len(blocks) + i, s, tuple(stream[j] for j in b)) for i, b in enumerate(spans)]
    return blocks, thresholds


def vision_streams(streams: Sequence[Sequence[int]], units: Sequence[Unit]) -> list[int]:
    return [s for s, stream in enumerate(streams) if units[stream[0]].segment == "vision"]


def block_jobs(blocks: Sequence[Block], layout: Layout, schemes: dict) -> list[BlockJob]:
    return [BlockJob(b.index, b.stream, b.units, {layout.units[i].linear_name(n): schemes[layout.units[i].linear_name(n)]
                                                   for i in b.units for n in layout.units[i].linears})
            for b in blocks]


# --- phases ----------------------------------------------------------------------------------------------

def capture_phase(pipe: Pipeline, batches: Sequence[Any], hooks: Hooks) -> None:
    """Every calibration batch through the stages; a distributed pipeline overlaps stages on different batches."""
    tails = []
    last = pipe.n_stages - 1
    for item in batches:
        ref = pipe.call(0, "capture", item, last > 0)
        for s in range(1, pipe.n_stages):
            ref = pipe.call(s, "capture", ref, s < last)
        tails.append(ref)
    for done, _ in enumerate(pipe.completed(tails), start=1):
        hooks.progress("capturing", done, len(tails))


def statistics_phase(pipe: Pipeline, config: QuantConfig) -> list[UnitStats]:
    parts = pipe.get([pipe.call(s, "statistics", config.weights) for s in range(pipe.n_stages)])
    return [st for part in parts for st in part]


def dependency_phase(pipe: Pipeline, layout: Layout, bits: dict[int, int]) -> list[DependencySeries]:
    previous = layout.previous_in_stream()
    entropy, dep = {}, {}
    for e, d in pipe.get([pipe.call(s, "dependencies", bits, previous) for s in range(pipe.n_stages)]):
        entropy.update(e)
        dep.update(d)
    return [DependencySeries(tuple(entropy[i] for i in s), tuple(dep[i] for i in s[1:])) for s in layout.streams]


def search_phase(pipe: Pipeline, layout: Layout, jobs: Sequence[BlockJob], config: QuantConfig, done: set[int],
                 hooks: Hooks) -> dict[int, BlockSummary]:
    """Each stage searches its own blocks, in order. ``propagation: fp``: every stage starts at once.
    ``quantized`` (Eq. 3): a block takes the quantized output of the block before it in its stream; across a
    stage boundary that output travels from one stage to the next, so the chain moves down the pipeline.
    ``stage``: the chain breaks at stage boundaries (a stage's first block takes its captured inputs), so every
    stage starts at once."""

    def chained(before: BlockJob | None, block: BlockJob) -> bool:
        """Whether ``block`` is calibrated on the quantized output of ``before``."""
        if before is None or before.stream != block.stream or config.propagation == "fp":
            return False
        return config.propagation == "quantized" or layout.stage_of(before.units[0]) == layout.stage_of(block.units[0])

    pending = {}
    for k, job in enumerate(jobs):
        s = layout.stage_of(job.units[0])
        prev = jobs[k - 1] if k > 0 else None
        source, upstream = "captured", None
        if chained(prev, job):
            prev_stage = layout.stage_of(prev.units[0])
            source = "carried" if prev_stage == s else "upstream"
            if prev_stage != s:
                upstream = pipe.call(prev_stage, "carried")
        needs_out = k + 1 < len(jobs) and chained(job, jobs[k + 1])
        if job.index in done and not needs_out:  # nothing to search: its captures go (a VEO-tuned tower's)
            pending[pipe.call(s, "release_captures", job)] = job.index
            continue
        future = pipe.call(s, "search_block", job, config, source, upstream, needs_out, job.index in done, True)
        pending[future] = job.index
    summaries = {}
    total = len([j for j in jobs if j.index not in done])
    for future, summary in pipe.completed(list(pending)):
        if summary is not None:
            summaries[pending[future]] = summary
            hooks.progress("searching", len(summaries), total)
    return summaries


def run_method(pipe: Pipeline, layout: Layout, shapes: dict, batches: Sequence[Any], config: QuantConfig,
               hooks: Hooks | None = None) -> MethodResult:
    """The whole method over a pipeline of stages that already hold their units' weights."""
    hooks = hooks or Hooks()
    clock = _Clock()
    hooks.progress("capturing", 0, len(batches))
    capture_phase(pipe, batches, hooks)
    seconds = {"capture": clock.lap()}
    hooks.progress("statistics", 0, 1)
    stats = statistics_phase(pipe, config)
    schemes, precision = plan_precision(shapes, layout.units, stats, config)
    bits = {u.index: unit_bits(u, schemes, config) for u in layout.units}
    deps = dependency_phase(pipe, layout, bits)
    seconds["statistics"] = clock.lap()
    veo, whole = None, []
    if hooks.tune_vision is not None and config.veo.enabled:
        hooks.progress("veo", 0, 1)
        veo = hooks.tune_vision(schemes, bits, deps)
        deps = dependency_phase(pipe, layout, bits)  # the language model now sees the tuned quantized tower
        whole = vision_streams(layout.streams, layout.units)
        seconds["veo"] = clock.lap()
    blocks, thresholds = plan_blocks(layout.streams, deps, config, whole, layout)
    done = hooks.finished(blocks)
    seconds["partition"] = clock.lap()
    hooks.progress("searching", 0, len([b for b in blocks if b.index not in done]))
    summaries = search_phase(pipe, layout, block_jobs(blocks, layout, schemes), config, done, hooks)
    seconds["search"] = clock.lap()
    return MethodResult(tuple(stats), schemes, precision, tuple(deps), tuple(thresholds), tuple(blocks), summaries,
                        frozenset(done), PhaseSeconds(**seconds), veo)


class _Clock:
    def __init__(self):
        self.last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed
