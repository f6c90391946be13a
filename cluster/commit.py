"""The ledger of finished blocks, and the final commit of a job's output with its manifest written last."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from qvlm.evaluate import Evaluation
from qvlm.method import MethodResult
from cluster.job import Job
from cluster.provenance import seal
from workers.shard import BlockRecord, CorruptRecord, read_record, record_key
from workers.storage import StorageError

PLAN_KEY = "qvlm_plan.json"
MANIFEST_KEY = "qvlm_manifest.json"
REPORT_KEY = "qvlm_report.json"
HTML_KEY = "report.html"


def load_finished_blocks(out, blocks, units, file_of, echo=None) -> dict[int, BlockRecord]:
    """Blocks whose record exists, names the units the current plan gives the block and the block's file
    (``file_of(index)``), and whose files verify (sha256). A record that cannot be read or a file that fails its
    check means the block is searched again; ``echo`` hears why."""
    finished = {}
    for block in blocks:
        record, problem = _finished_record(out, block, tuple(units[i].name for i in block.units), file_of(block.index))
        if problem is not None and echo is not None:
            echo(f"block {block.index} is searched again: {problem}", flush=True)
        if record is not None:
            finished[block.index] = record
    return finished


def _finished_record(out, block, unit_names: tuple, file_key: str) -> tuple[BlockRecord | None, str | None]:
    key = record_key(block.index)
    if not out.exists(key):
        return None, None
    try:
        record = read_record(out, block.index)
    except CorruptRecord as exc:
        return None, f"its record {key} is unreadable ({exc})"
    if record.unit_names != unit_names:
        return None, None  # a record of another plan's block
    if (record.index, record.shard_key) != (block.index, file_key):
        return None, f"its record {key} names block {record.index} at {record.shard_key}"
    try:
        out.get_bytes(record.shard_key, record.sha256)
        if record.sidecar_key:
            out.get_bytes(record.sidecar_key, record.sidecar_sha256)
    except StorageError as exc:
        return None, str(exc)
    return record, None


@dataclass(frozen=True)
class JobResult:
    """Everything the commit writes about a finished job."""

    job: Job
    plan: object
    method: MethodResult
    records: dict[int, BlockRecord]
    seconds: dict
    stages: list  # per stage: tensors it loaded, where it ran, its peak RSS, weight bytes and bytes sent


def _plan_document(r: JobResult) -> dict:
    m = r.method
    return {
        "job": r.job.name,
        "spec_hash": r.job.spec_hash,
        "model_class": r.plan.model_class,
        "units": [asdict(u) for u in r.plan.units],
        "streams": [list(s) for s in r.plan.streams],
        "stages": [list(s) for s in r.plan.stages],
        "stage_tensors": [s["tensors"] for s in r.stages],
        "stage_memory": [{k: s[k] for k in ("peak_rss_bytes", "weight_bytes")} for s in r.stages],
        "stage_nodes": [s["node_id"] for s in r.stages],
        "stage_devices": [s["device"] for s in r.stages],
        "stage_reads": [s["reads"] for s in r.stages],
        "transfer_bytes": [s["transfer_bytes"] for s in r.stages],
        "schemes": {n: asdict(s) for n, s in sorted(m.schemes.items())},
        "linear_shapes": {n: list(shape) for n, shape in sorted(r.plan.linear_shapes.items())},
        "activations": asdict(r.job.quant.activations),
        "weights": asdict(r.job.quant.weights),
        "method": _method_label(r.job.quant),
        "boosted": list(m.precision.boosted) if m.precision is not None else [],
        "unit_stats": [{"unit": st.unit, "kurtosis": st.kurtosis, "sensitivity": st.sensitivity,
                        "groups": [list(g) for g in st.groups]} for st in m.stats],
        "dependency": [{"entropy": list(d.entropy), "dependency": list(d.dependency), "h0": h} for d, h in zip(m.dependency, m.h0)],
        "blocks": [{"index": b.index, "stream": b.stream, "units": list(b.units), **_record_fields(r.records[b.index])}
                   for b in m.blocks],
        "seconds": r.seconds,
        "veo": m.veo.document() if m.veo is not None else None,
    }


def _method_label(quant) -> str:
    if quant.method != "qvlm":
        return quant.method
    return f"qvlm ({quant.search} search, propagation {quant.propagation}, depth <= {quant.max_block_depth})"


def _record_fields(record: BlockRecord) -> dict:
    return {"shard": record.shard_key, "sha256": record.sha256, "error_before": record.error_before,
            "error_after": record.error_after, "evaluations": record.evaluations, "seconds": record.seconds,
            "candidates": dict(record.candidates), "chosen": record.chosen, "quarantine": record.quarantine}


def write_documents(out, result: JobResult, checkpoint_files: dict, evaluation: Evaluation | None) -> tuple[dict, dict]:
    """Write the plan document and the report; return every file of the output (with size and sha256) and the
    plan document. Nothing vouches for them until :func:`publish` writes the manifest."""
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
    return files, plan_doc


def publish(out, job: Job, files: dict, provenance: dict) -> None:
    """The manifest, written last: every file with size and sha256, and the provenance with its seal."""
    manifest = {"job": job.name, "spec_hash": job.spec_hash, "files": files, "provenance": provenance,
                "provenance_sha256": seal(provenance)}
    out.put_bytes(MANIFEST_KEY, json.dumps(manifest, indent=1, sort_keys=True).encode())
