"""The report's typed input, built from the plan document (``qvlm_plan.json``), and ``qvlm_report.json``.

``report_document(report)`` is ``qvlm_report.json``: ``dataclasses.asdict(report)`` plus a ``summary``.

  job, spec_hash, model_class, method   as in the plan document
  activations      {bits, granularity, symmetric}; bits 16 means weight-only
  units[]          index, name, segment, stream, position (in its stream), block, entropy, dependency_next
                   (D(k, k+1) to the next unit of its stream; null for the last), kurtosis {linear: value},
                   sensitivity {"a+b" group: value}, mean_bits (weighted by layer size), linears[] {name,
                   scheme {bits, group_size, symmetric} or null when left in full precision, shape [out, in],
                   boosted}
  streams[]        index, units, entropy[], dependency[], h0
  blocks[]         index, stream, units, error_before, error_after, evaluations, seconds, candidates
                   {candidate: block-output error} (search `best`), chosen (the candidate kept), quarantine
                   (why the block was kept at the safe fallback; null when it was not)
  seconds          {phase: wall seconds}
  stage_memory[]   peak_rss_bytes, weight_bytes
  bits             mean_bits and bits_per_weight (with scales and zero points), weighted by layer size;
                   linears, weights (counts)
  servable         servable, format (compressed-tensors), sidecar (activation ranges file), note
  evaluation       next-token KL, top-1 agreement, answer accuracy (null when none ran);
                   evaluation_skipped says why when it was skipped
  veo              null when off; else seconds, tuning_seconds, reused, error_before, error_after,
                   history[] per epoch, streams_before[] and blocks_before[] (the partition without VEO)
  summary          scheme label and counts, for a reader of the JSON alone
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Mapping

from qvlm.evaluate import EvalResult, EvalSkipped, Evaluation
from qvlm.export import Servability, servability
from qvlm.quant import ActScheme, WeightScheme


@dataclass(frozen=True)
class Linear:
    name: str  # relative to its unit
    scheme: WeightScheme | None  # None: left in full precision
    shape: tuple[int, int] | None  # (out_features, in_features)
    boosted: bool  # raised up the (bits, group) ladder by mixed precision


@dataclass(frozen=True)
class UnitRow:
    index: int
    name: str
    segment: str
    stream: int | None
    position: int | None
    block: int | None
    entropy: float | None
    dependency_next: float | None
    kurtosis: Mapping[str, float]  # per linear
    sensitivity: Mapping[str, float]  # per group of linears sharing one input
    linears: tuple[Linear, ...]
    mean_bits: float | None  # over its quantized linears, weighted by size

    @property
    def boosted(self) -> tuple[str, ...]:
        return tuple(f"{self.name}.{x.name}" for x in self.linears if x.boosted)


@dataclass(frozen=True)
class Stream:
    index: int
    units: tuple[int, ...]
    entropy: tuple[float, ...]  # per unit, normalised by log M
    dependency: tuple[float, ...]  # D(k, k+1), one fewer than the units
    h0: float | None  # the cut threshold of Eq. 7


@dataclass(frozen=True)
class BlockRow:
    index: int
    stream: int
    units: tuple[int, ...]
    error_before: float | None = None
    error_after: float | None = None
    evaluations: int | None = None
    seconds: float | None = None
    candidates: Mapping[str, float] = field(default_factory=dict)
    chosen: str | None = None
    quarantine: str | None = None


@dataclass(frozen=True)
class WeightBits:
    mean_bits: float | None  # integer bits per weight
    bits_per_weight: float | None  # with the 16-bit scales and zero points (WeightScheme.storage_bits)
    linears: int
    weights: int


@dataclass(frozen=True)
class StageMemory:
    peak_rss_bytes: int
    weight_bytes: int


@dataclass(frozen=True)
class VeoEpoch:
    epoch: int
    loss: float
    next_token: float
    dependency: float
    error: float


@dataclass(frozen=True)
class VeoSection:
    seconds: float
    tuning_seconds: float
    reused: bool
    error_before: float
    error_after: float
    history: tuple[VeoEpoch, ...]
    streams_before: tuple[Stream, ...]
    blocks_before: tuple[BlockRow, ...]


@dataclass(frozen=True)
class Report:
    job: str
    spec_hash: str | None
    model_class: str | None
    method: str | None
    activations: ActScheme
    units: tuple[UnitRow, ...]
    streams: tuple[Stream, ...]
    blocks: tuple[BlockRow, ...]
    seconds: Mapping[str, float]
    stage_memory: tuple[StageMemory, ...]
    bits: WeightBits
    servable: Servability
    evaluation: EvalResult | None = None
    evaluation_skipped: str | None = None
    veo: VeoSection | None = None
    schemes: Mapping[str, WeightScheme] = field(default_factory=dict)  # full linear name -> scheme

    @property
    def boosted(self) -> tuple[str, ...]:
        return tuple(name for u in self.units for name in u.boosted)


# --- from the plan document ------------------------------------------------------------------------

def report_from_plan(plan: dict, evaluation: Evaluation | None = None) -> Report:
    """The report of a committed job: ``plan`` is the plan document, ``evaluation`` what the evaluation
    gave (figures, why it was skipped, or None when none ran)."""
    schemes = {n: WeightScheme(**s) for n, s in plan["schemes"].items()}
    shapes = {n: tuple(s) for n, s in plan["linear_shapes"].items()}
    acts = ActScheme(**plan.get("activations", {}))
    streams = _streams(plan["streams"], plan["dependency"])
    blocks = tuple(_block(b) for b in plan["blocks"])
    units = _units(plan, streams, blocks, schemes, shapes)
    skipped = evaluation.reason if isinstance(evaluation, EvalSkipped) else None
    return Report(
        job=plan["job"], spec_hash=plan.get("spec_hash"), model_class=plan.get("model_class"),
        method=plan.get("method"), activations=acts, units=units, streams=streams, blocks=blocks,
        seconds=dict(plan.get("seconds", {})),
        stage_memory=tuple(StageMemory(**m) for m in plan.get("stage_memory", [])),
        bits=weight_bits(schemes, shapes), servable=servability(schemes, acts),
        evaluation=evaluation if isinstance(evaluation, EvalResult) else None, evaluation_skipped=skipped,
        veo=_veo(plan["veo"], plan["streams"]) if plan.get("veo") else None, schemes=schemes)


def _streams(streams: list, dependency: list) -> tuple[Stream, ...]:
    return tuple(Stream(i, tuple(units), tuple(d["entropy"]), tuple(d["dependency"]), d.get("h0"))
                 for i, (units, d) in enumerate(zip(streams, dependency)))


def _block(b: dict) -> BlockRow:
    known = {f.name for f in fields(BlockRow)}
    return BlockRow(**{**{k: v for k, v in b.items() if k in known}, "units": tuple(b["units"])})


def _units(plan: dict, streams, blocks, schemes, shapes) -> tuple[UnitRow, ...]:
    where = {u: (s, pos) for s in streams for pos, u in enumerate(s.units)}
    block_of = {u: b.index for b in blocks for u in b.units}
    stats = {st["unit"]: st for st in plan.get("unit_stats", [])}
    boosted = set(plan.get("boosted", []))
    rows = []
    for u in sorted(plan["units"], key=lambda u: u["index"]):
        full = [f"{u['name']}.{x}" for x in u["linears"]]
        linears = tuple(Linear(x, schemes.get(n), shapes.get(n), n in boosted) for x, n in zip(u["linears"], full))
        stream, pos = where.get(u["index"], (None, None))
        entropy, dependency = (_at(stream.entropy, pos), _at(stream.dependency, pos)) if stream else (None, None)
        st = stats.get(u["name"], {})
        rows.append(UnitRow(u["index"], u["name"], u["segment"], stream.index if stream else None, pos,
                            block_of.get(u["index"]), entropy, dependency, dict(st.get("kurtosis", {})),
                            dict(st.get("sensitivity", {})), linears, _mean_bits(linears)))
    return tuple(rows)


def _at(values: tuple, pos: int) -> float | None:
    return values[pos] if pos < len(values) else None


def _mean_bits(linears: tuple[Linear, ...]) -> float | None:
    sized = [(x.scheme.bits, x.shape[0] * x.shape[1]) for x in linears if x.scheme and x.shape]
    total = sum(n for _, n in sized)
    return sum(b * n for b, n in sized) / total if total else None


def weight_bits(schemes: Mapping[str, WeightScheme], shapes: Mapping[str, tuple[int, int]]) -> WeightBits:
    """Bits per weight over the quantized linears, weighted by layer size; the scale and zero-point
    overhead is the checkpoint's own count (``WeightScheme.storage_bits``)."""
    weights = sum(shapes[n][0] * shapes[n][1] for n in schemes)
    if not weights:
        return WeightBits(None, None, len(schemes), 0)
    ints = sum(s.bits * shapes[n][0] * shapes[n][1] for n, s in schemes.items())
    stored = sum(s.storage_bits(*shapes[n]) for n, s in schemes.items())
    return WeightBits(ints / weights, stored / weights, len(schemes), weights)


def _veo(veo: dict, streams: list) -> VeoSection:
    epoch_fields = {f.name for f in fields(VeoEpoch)}
    return VeoSection(
        seconds=veo["seconds"], tuning_seconds=veo["tuning_seconds"], reused=veo["reused"],
        error_before=veo["error_before"], error_after=veo["error_after"],
        history=tuple(VeoEpoch(**{k: h[k] for k in epoch_fields}) for h in veo["history"]),
        streams_before=_streams(streams, veo["dependency_before"]),
        blocks_before=tuple(_block(b) for b in veo["blocks_before"]))


# --- qvlm_report.json ------------------------------------------------------------------------------

def scheme_label(report: Report) -> str:
    """The most used weight scheme and the activation scheme, e.g. ``W4 g128 sym, A16``."""
    common = Counter(report.schemes.values()).most_common(1)
    weights = _weight_label(common[0][0]) if common else "FP"
    a = report.activations
    acts = f"A{a.bits} per-{a.granularity} {'sym' if a.symmetric else 'asym'}" if a.enabled else "A16"
    return f"{weights}, {acts}"


def _weight_label(s: WeightScheme) -> str:
    group = "per-channel" if s.group_size == -1 else f"g{s.group_size}"
    return f"W{s.bits} {group} {'sym' if s.symmetric else 'asym'}"


def report_document(report: Report) -> dict:
    """``qvlm_report.json``: every field of the report, plus a summary."""
    summary = {"scheme": scheme_label(report), "units": len(report.units), "streams": len(report.streams),
               "blocks": len(report.blocks), "boosted": len(report.boosted),
               "quarantined": sum(1 for b in report.blocks if b.quarantine),
               "seconds_total": report.seconds.get("total", sum(report.seconds.values()))}
    return {**asdict(report), "summary": summary}
