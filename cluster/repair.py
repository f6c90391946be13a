"""A finished job submitted again: its output is checked against its manifest and what fails is repaired.

The files the export writes (the unquantized tensors' ``model-*.safetensors``, the index, ``config.json``, the
processor files, the activation sidecar) are written again by the export, around the blocks' files as their
records describe them; the export is deterministic, so the files that were intact are rewritten with the same
bytes. The manifest is deleted first and written again last, so the output never looks complete halfway. A
block's own file (or its record), the plan document, the report or the manifest cannot be exported again: then
the job runs again as a resume (blocks whose files verify are not searched again; the failing ones are).
"""

from __future__ import annotations

import json

from cluster.commit import HTML_KEY, MANIFEST_KEY, PLAN_KEY, REPORT_KEY
from cluster.export import export_checkpoint
from cluster.job import Job
from workers.shard import BLOCKS_PREFIX, read_record

NOT_EXPORTED = (MANIFEST_KEY, PLAN_KEY, REPORT_KEY, HTML_KEY)


def export_repairs(failed: dict[str, str], block_files: set[str]) -> bool:
    """Whether exporting again repairs every failing file (none is a block's file or record, or a document)."""
    return all(key not in NOT_EXPORTED and key not in block_files and not key.startswith(f"{BLOCKS_PREFIX}/")
               for key in failed)


def block_files(out, manifest: dict) -> set[str]:
    """The blocks' checkpoint files, as the plan document recorded them."""
    plan = json.loads(out.get_bytes(PLAN_KEY, manifest["files"][PLAN_KEY]["sha256"]))
    return {b["shard"] for b in plan["blocks"]}


def reexport(ray, job: Job, plan, out, manifest: dict, state) -> None:
    """Export again around the blocks' files, then write the manifest with the new files' sha256, last."""
    from qvlm.quant import WeightScheme

    document = json.loads(out.get_bytes(PLAN_KEY, manifest["files"][PLAN_KEY]["sha256"]))
    schemes = {name: WeightScheme(**scheme) for name, scheme in document["schemes"].items()}
    records = tuple(read_record(out, b["index"]) for b in document["blocks"])
    out.delete(MANIFEST_KEY)
    written = export_checkpoint(ray, job, plan.rest_chunks, records, schemes, state)
    state.check()  # never commit into an output whose lock another run has taken
    files = {**manifest["files"], **written}
    out.put_bytes(MANIFEST_KEY, json.dumps({**manifest, "files": files}, indent=1, sort_keys=True).encode())
