"""Check a job's output against its manifest: every file present, with the recorded size and sha256."""

from __future__ import annotations

import hashlib
import json
import reprlib

from cluster.provenance import PLAN_KEY, check_provenance
from workers.storage import CHUNK, NotFound, Storage, StorageError

MANIFEST_KEY = "qvlm_manifest.json"  # the same key cluster.commit writes last


def _sha256(storage: Storage, key: str, size: int) -> str:
    """The sha256 of ``key``, read in ranged chunks so a multi-gigabyte shard never sits in memory."""
    digest = hashlib.sha256()
    for start in range(0, size, CHUNK):
        digest.update(storage.get_range(key, start, min(start + CHUNK, size)))
    return digest.hexdigest()


def _check_file(storage: Storage, key: str, entry: dict) -> str | None:
    where = f"{storage.uri.rstrip('/')}/{key}"
    if not isinstance(entry, dict):
        return f"{key}: the manifest's entry for it is {reprlib.repr(entry)}, not an object with size and sha256"
    try:
        if not storage.exists(key):
            return f"{key}: missing ({where} does not exist)"
        size = storage.size(key)
        if size != entry.get("size"):
            return f"{key}: size {size} bytes, the manifest says {entry.get('size')}"
        if _sha256(storage, key, size) != str(entry.get("sha256", "")).lower():
            return f"{key}: sha256 mismatch (the file is corrupt or was changed after the job)"
    except StorageError as exc:
        return f"{key}: cannot read it ({exc})"
    except ValueError as exc:  # a key no qvlm output holds (absolute, '..')
        return f"{key}: not a file of this output ({exc})"
    return None


def _load_manifest(storage: Storage) -> tuple[dict | None, str | None]:
    try:
        manifest = json.loads(storage.get_bytes(MANIFEST_KEY))
    except NotFound:
        return None, (f"{storage.uri} has no {MANIFEST_KEY}: the job did not finish (incomplete checkpoint)")
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"{MANIFEST_KEY}: not valid JSON ({exc})"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None, f"{MANIFEST_KEY}: has no \"files\" table"
    return manifest, None


def check_output(storage: Storage) -> tuple[dict | None, dict[str, str]]:
    """The manifest (None when it is missing or unreadable) and, for each file that fails, its problem (keyed
    by the file's key; the manifest's own problem is keyed by MANIFEST_KEY)."""
    manifest, problem = _load_manifest(storage)
    if manifest is None:
        return None, {MANIFEST_KEY: problem}
    return manifest, check_files(storage, manifest["files"])


def check_files(storage: Storage, files: dict) -> dict[str, str]:
    """For each of ``files`` (key -> {size, sha256}) that fails, its problem."""
    problems = {key: _check_file(storage, key, entry) for key, entry in sorted(files.items())}
    return {key: p for key, p in problems.items() if p is not None}


def verify_report(storage: Storage) -> tuple[dict | None, list[str]]:
    """The manifest and the problems with the output in ``storage``: its files (each problem names the file
    key), then its provenance (cluster/provenance.py), checked against the plan document once that verifies."""
    manifest, failed = check_output(storage)
    if manifest is None:
        return None, list(failed.values())
    plan = None
    if PLAN_KEY in manifest["files"] and PLAN_KEY not in failed:
        plan = json.loads(storage.get_bytes(PLAN_KEY, manifest["files"][PLAN_KEY]["sha256"]))
    return manifest, list(failed.values()) + check_provenance(manifest, plan)


def verify_output(storage: Storage) -> list[str]:
    """Problems with the output in ``storage``; empty when complete and intact."""
    return verify_report(storage)[1]
