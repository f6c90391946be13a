"""The ledger of finished blocks, and the final commit of a job's output with its manifest written last."""

from __future__ import annotations

import json
from dataclasses import asdict

from workers.block_task import BlockRecord, BlockSpec, record_key
from workers.storage import StorageError

PLAN_KEY = "qvlm_plan.json"
MANIFEST_KEY = "qvlm_manifest.json"


def load_finished_blocks(out, specs: list[BlockSpec]) -> dict[int, BlockRecord]:
    """Blocks whose record exists, matches the current plan and whose shard's sha256 verifies."""
    finished = {}
    for spec in specs:
        key = record_key(spec.index)
        if not out.exists(key):
            continue
        data = json.loads(out.get_bytes(key))
        record = BlockRecord(**{**data, "unit_names": tuple(data["unit_names"])})
        if record.unit_names != spec.unit_names:
            continue
        try:
            out.get_bytes(record.shard_key, record.sha256)
        except StorageError:
            continue  # a corrupt or missing shard is searched again
        finished[spec.index] = record
    return finished


def _plan_document(settings, plan, schemes, precision, deps, thresholds, blocks, records, seconds, stage_tensors) -> dict:
    return {
        "job": settings.name,
        "spec_hash": settings.spec_hash,
        "model_class": plan.model_class,
        "units": [asdict(u) for u in plan.units],
        "streams": [list(s) for s in plan.streams],
        "stages": [list(s) for s in plan.stages],
        "stage_tensors": stage_tensors,
        "schemes": {n: asdict(s) for n, s in sorted(schemes.items())},
        "boosted": list(precision.boosted) if precision is not None else [],
        "dependency": [{"entropy": list(d.entropy), "dependency": list(d.dependency), "h0": h} for d, h in zip(deps, thresholds)],
        "blocks": [{"index": b.index, "stream": b.stream, "units": list(b.units), **_record_fields(records[b.index])} for b in blocks],
        "seconds": seconds,
    }


def _record_fields(record: BlockRecord) -> dict:
    return {"shard": record.shard_key, "sha256": record.sha256, "error_before": record.error_before,
            "error_after": record.error_after, "evaluations": record.evaluations}


def commit_output(out, settings, plan, schemes, precision, deps, thresholds, blocks, records, seconds, stage_tensors) -> None:
    """Write the plan document, then the manifest (every file with size and sha256) last."""
    doc = json.dumps(_plan_document(settings, plan, schemes, precision, deps, thresholds, blocks, records, seconds, stage_tensors),
                     indent=1, sort_keys=True).encode()
    files = {PLAN_KEY: {"sha256": out.put_bytes(PLAN_KEY, doc), "size": len(doc)}}
    for b in blocks:
        r = records[b.index]
        files[r.shard_key] = {"sha256": r.sha256, "size": r.size}
    manifest = json.dumps({"job": settings.name, "spec_hash": settings.spec_hash, "files": files}, indent=1, sort_keys=True)
    out.put_bytes(MANIFEST_KEY, manifest.encode())
