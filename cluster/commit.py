"""The ledger of finished blocks, and the final commit of a job's output with its manifest written last."""

from __future__ import annotations

import json
import reprlib
from dataclasses import asdict, dataclass

from workers.block_task import BlockRecord, BlockSpec, record_key, shard_key
from workers.storage import StorageError

PLAN_KEY = "qvlm_plan.json"
MANIFEST_KEY = "qvlm_manifest.json"
REPORT_KEY = "qvlm_report.json"
HTML_KEY = "report.html"


def load_finished_blocks(out, specs: list[BlockSpec], echo=None) -> dict[int, BlockRecord]:
    """Blocks whose record exists, matches the current plan and whose shard's sha256 verifies. A record that
    cannot be read or a shard that fails its check means the block is searched again; ``echo`` hears why."""
    finished = {}
    for spec in specs:
        record, problem = _finished_record(out, spec)
        if problem is not None and echo is not None:
            echo(f"block {spec.index} is searched again: {problem}", flush=True)
        if record is not None:
            finished[spec.index] = record
    return finished


def _finished_record(out, spec: BlockSpec) -> tuple[BlockRecord | None, str | None]:
    key = record_key(spec.index)
    if not out.exists(key):
        return None, None
    try:
        record = parse_record(out.get_bytes(key))
    except ValueError as exc:
        return None, f"its record {key} is unreadable ({exc})"
    if record.unit_names != spec.unit_names:
        return None, None  # a record of another plan's block
    if (record.index, record.shard_key) != (spec.index, shard_key(spec.index)):
        return None, f"its record {key} names block {record.index} at {record.shard_key}"
    try:
        out.get_bytes(record.shard_key, record.sha256)
    except StorageError as exc:
        return None, str(exc)
    return record, None


_NUMBER = (int, float)
_RECORD_FIELDS = {"index": int, "shard_key": str, "sha256": str, "size": int, "unit_names": list,
                  "error_before": _NUMBER, "error_after": _NUMBER, "evaluations": int, "seconds": _NUMBER}
_KINDS = {int: "an integer", str: "a string", list: "a list", _NUMBER: "a number"}


def parse_record(data: bytes) -> BlockRecord:
    """A block's ledger record; ValueError saying what is wrong (not JSON, a field missing or mistyped)."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"a JSON {type(doc).__name__}, not an object")
    for name, kind in _RECORD_FIELDS.items():
        value = doc.get(name)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ValueError(f"{name} is {reprlib.repr(value)}, not {_KINDS[kind]}" if name in doc else f"no {name}")
    if not all(isinstance(n, str) for n in doc["unit_names"]):
        raise ValueError(f"unit_names is {reprlib.repr(doc['unit_names'])}, not a list of names")
    return BlockRecord(**{**{k: doc[k] for k in _RECORD_FIELDS}, "unit_names": tuple(doc["unit_names"])})


@dataclass(frozen=True)
class JobResult:
    """Everything the commit writes about a finished job."""

    settings: object
    plan: object
    schemes: dict
    precision: object
    deps: list
    thresholds: list
    blocks: list
    records: dict
    seconds: dict
    stages: list  # per stage: tensors it loaded, its peak RSS and weight bytes
    stats: list  # UnitStats per unit, in unit order
    veo: dict | None = None  # VeoOutcome.document() when the vision tower was tuned


def _plan_document(r: JobResult) -> dict:
    return {
        "job": r.settings.name,
        "spec_hash": r.settings.spec_hash,
        "model_class": r.plan.model_class,
        "units": [asdict(u) for u in r.plan.units],
        "streams": [list(s) for s in r.plan.streams],
        "stages": [list(s) for s in r.plan.stages],
        "stage_tensors": [s["tensors"] for s in r.stages],
        "stage_memory": [{k: s[k] for k in ("peak_rss_bytes", "weight_bytes")} for s in r.stages],
        "stage_nodes": [s["node_id"] for s in r.stages],
        "stage_reads": [s["reads"] for s in r.stages],
        "schemes": {n: asdict(s) for n, s in sorted(r.schemes.items())},
        "linear_shapes": {n: list(shape) for n, shape in sorted(r.plan.linear_shapes.items())},
        "activations": asdict(r.settings.quant.activations),
        "weights": asdict(r.settings.quant.weights),
        "method": _method_label(r.settings.quant),
        "boosted": list(r.precision.boosted) if r.precision is not None else [],
        "unit_stats": [{"unit": st.unit, "kurtosis": st.kurtosis, "sensitivity": st.sensitivity,
                        "groups": [list(g) for g in st.groups]} for st in r.stats],
        "dependency": [{"entropy": list(d.entropy), "dependency": list(d.dependency), "h0": h} for d, h in zip(r.deps, r.thresholds)],
        "blocks": [{"index": b.index, "stream": b.stream, "units": list(b.units), **_record_fields(r.records[b.index])} for b in r.blocks],
        "seconds": r.seconds,
        "veo": r.veo,
    }


def _method_label(quant) -> str:
    if quant.method != "qvlm":
        return quant.method
    return f"qvlm ({quant.search} search, propagation {quant.propagation}, depth <= {quant.max_block_depth})"


def _record_fields(record: BlockRecord) -> dict:
    return {"shard": record.shard_key, "sha256": record.sha256, "error_before": record.error_before,
            "error_after": record.error_after, "evaluations": record.evaluations, "seconds": record.seconds}


def commit_output(out, result: JobResult, checkpoint_files: dict, evaluation: dict | None) -> None:
    """Write the plan document and the report, then the manifest (every file with size and sha256) last."""
    from cluster.report import render_html, report_document, report_from_plan

    plan_doc = _plan_document(result)
    report = report_from_plan(plan_doc, evaluation)
    documents = {
        PLAN_KEY: json.dumps(plan_doc, indent=1, sort_keys=True).encode(),
        REPORT_KEY: json.dumps(report_document(report), indent=1, sort_keys=True).encode(),
        HTML_KEY: render_html(report).encode(),
    }
    files = dict(checkpoint_files)
    for key, data in documents.items():
        files[key] = {"sha256": out.put_bytes(key, data), "size": len(data)}
    for b in result.blocks:
        rec = result.records[b.index]
        files[rec.shard_key] = {"sha256": rec.sha256, "size": rec.size}
    manifest = {"job": result.settings.name, "spec_hash": result.settings.spec_hash, "files": files}
    out.put_bytes(MANIFEST_KEY, json.dumps(manifest, indent=1, sort_keys=True).encode())
