"""A finished job submitted again: its output is checked against its manifest and what fails is repaired.

Checkpoint files (``model-*.safetensors``, the index, ``config.json``, the processor files, the activation
sidecar) are written again by the export from the block shards under ``_qvlm/blocks`` (which the manifest
also lists and which are checked first), with the schemes and block order the plan document recorded; the
export is deterministic, so the files that were intact are rewritten with the same bytes. The manifest is
deleted first and written again last, so the output never looks complete halfway. When a block shard, the
plan document, the report or the manifest itself fails, an export cannot repair it: the job runs again as a
resume (blocks whose shards verify are not searched again; the failing ones are).
"""

from __future__ import annotations

import json

from cluster.commit import HTML_KEY, MANIFEST_KEY, PLAN_KEY, REPORT_KEY
from cluster.export import export_checkpoint
from cluster.settings import JobSettings
from workers.block_task import BLOCKS_PREFIX

NOT_EXPORTED = (MANIFEST_KEY, PLAN_KEY, REPORT_KEY, HTML_KEY)


def export_repairs(failed: dict[str, str]) -> bool:
    """Whether re-exporting the checkpoint repairs every failing file (none is a block shard or a document)."""
    return all(key not in NOT_EXPORTED and not key.startswith(f"{BLOCKS_PREFIX}/") for key in failed)


def reexport(ray, settings: JobSettings, out, manifest: dict, state) -> None:
    """Write the checkpoint again from the block shards, then the manifest with the new files' sha256, last."""
    from qvlm.quant import WeightScheme

    plan = json.loads(out.get_bytes(PLAN_KEY, manifest["files"][PLAN_KEY]["sha256"]))
    schemes = {name: WeightScheme(**scheme) for name, scheme in plan["schemes"].items()}
    shards = tuple((b["shard"], b["sha256"]) for b in plan["blocks"])
    out.delete(MANIFEST_KEY)
    written = export_checkpoint(ray, settings, shards, schemes, state)
    state.check()  # never commit into an output whose lock another run has taken
    files = {**manifest["files"], **written}
    out.put_bytes(MANIFEST_KEY, json.dumps({**manifest, "files": files}, indent=1, sort_keys=True).encode())
