"""Check a job's output against its manifest: every file present, with the recorded size and sha256."""

from __future__ import annotations

import hashlib
import json

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


def verify_output(storage: Storage) -> list[str]:
    """Problems with the output in ``storage`` (each names the file key); empty when complete and intact."""
    manifest, problem = _load_manifest(storage)
    if manifest is None:
        return [problem]
    problems = [_check_file(storage, key, entry) for key, entry in sorted(manifest["files"].items())]
    return [p for p in problems if p is not None]
