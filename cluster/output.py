"""Which files of an output qvlm wrote, and whether a job may write there: one rule for qvlm-submit's
read-only check and for the driver's check under the output's lock.

qvlm's own files are the keys a ledger lists (every writer lists a key under ``_qvlm/written/`` before it
writes it; see ``workers.storage.Storage.keep_ledger``), the files the manifest lists, the shards that block
and VEO records name, and its bookkeeping (those ledgers, records, the state file and the lock). An output
holding any other file is refused, with or without ``output.overwrite``; overwrite deletes only qvlm's files.
Outputs written before the ledgers existed are still recognised by their manifest and records.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Iterable

from qvlm.errors import InputError
from cluster.gate import HELD_KEY
from cluster.lock import LOCK_KEY
from cluster.state import STATE_KEY, JobState, read_state
from cluster.verify import MANIFEST_KEY
from workers.shard import BLOCKS_PREFIX
from workers.storage import LEDGER_PREFIX, PROBE_PREFIX, StorageError
from workers.veo_record import VEO_RECORD_KEY

_RECORD = re.compile(re.escape(BLOCKS_PREFIX) + r"/block-\d+\.json")
SHOWN = 3  # foreign files named in a refusal


class OutputRefused(InputError):
    """The output cannot take this job; the message starts with ``output.uri:`` and says what would fix it."""


@dataclass(frozen=True)
class Claim:
    previous: JobState | None  # the job found in the output: resumed when it is this one
    clear: bool  # the output holds another job's (or an unrecorded run's) files, to delete before starting


def _document(out, key: str) -> dict:
    """A JSON object qvlm wrote, or {} when it is unreadable (then it vouches for nothing)."""
    try:
        doc = json.loads(out.get_bytes(key))
    except (StorageError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _strings(values) -> set[str]:
    return {v for v in values if isinstance(v, str)} if isinstance(values, (list, dict)) else set()


def _record_files(record: dict) -> set[str]:
    """The files a block record vouches for: the block's checkpoint file and its sidecar."""
    return _strings([record.get("shard_key"), record.get("sidecar_key")])


def is_bookkeeping(key: str) -> bool:
    """A key qvlm owns by its place: a ledger, a block or VEO record, the state file, the lock, or a probe of
    the S3 server's conditional writes that a crash left behind."""
    ledger = key.startswith(LEDGER_PREFIX) and key.endswith(".json") and "/" not in key[len(LEDGER_PREFIX):]
    return (ledger or key in (STATE_KEY, LOCK_KEY, VEO_RECORD_KEY, HELD_KEY) or bool(_RECORD.fullmatch(key))
            or key.startswith(PROBE_PREFIX))


def qvlm_keys(out, keys: Iterable[str]) -> set[str]:
    """Which of ``keys`` (a listing of ``out``) qvlm wrote, by its ledgers, manifest and records."""
    keys = list(keys)
    own = {k for k in keys if is_bookkeeping(k)}
    for key in keys:
        if key.startswith(LEDGER_PREFIX) and key in own:
            own |= _strings(_document(out, key).get("keys"))
        elif key == MANIFEST_KEY:
            own |= _strings(_document(out, key).get("files")) | {key}
        elif key in own and key.startswith(BLOCKS_PREFIX + "/"):
            own |= _record_files(_document(out, key))
        elif key == VEO_RECORD_KEY:
            block = _document(out, key).get("block")
            own |= _record_files(block if isinstance(block, dict) else {})
    return own


def foreign_keys(out, keys: Iterable[str]) -> list[str]:
    """The keys of ``out`` qvlm did not write, in listing order."""
    keys = list(keys)
    own = qvlm_keys(out, keys)
    return [k for k in keys if k not in own]


def _foreign_message(uri: str, foreign: list[str]) -> str:
    shown = ", ".join(foreign[:SHOWN]) + (f" and {len(foreign) - SHOWN} more" if len(foreign) > SHOWN else "")
    return (f"output.uri: {uri} holds {len(foreign)} file{'s' if len(foreign) > 1 else ''} qvlm did not write "
            f"({shown}); qvlm never deletes or overwrites them, even with output.overwrite: true: move them away "
            "or choose another output.uri")


def claim_output(out, uri: str, spec_hash: str, overwrite: bool) -> Claim:
    """Whether this job (``spec_hash``) may write into ``out``; reads only. Raises :class:`OutputRefused` when
    the output holds files qvlm did not write, or another job's files without ``overwrite``."""
    keys = [k for k in out.list("") if k != LOCK_KEY]
    foreign = foreign_keys(out, keys)
    if foreign:
        raise OutputRefused(_foreign_message(uri, foreign))
    previous = read_state(out)
    if previous is not None and previous.spec_hash == spec_hash:
        return Claim(previous, clear=False)
    if previous is not None and not overwrite:
        raise OutputRefused(f"output.uri: {uri} already holds job '{previous.name}' (spec {previous.spec_hash[:8]}); "
                            "set output.overwrite: true to replace it, or choose another output.uri")
    leftovers = [k for k in keys if not k.startswith(LEDGER_PREFIX)]  # ledgers alone: runs that wrote nothing else
    if previous is None and leftovers and not overwrite:
        raise OutputRefused(f"output.uri: {uri} holds files of a qvlm run that recorded no job (e.g. {leftovers[0]}); "
                            "set output.overwrite: true to replace them, or choose an empty output.uri")
    return Claim(previous, clear=bool(leftovers) or previous is not None)


def clear_output(out, keep: Iterable[str] = ()) -> None:
    """Delete qvlm's files from ``out`` (never another file), the manifest first so that nothing looks complete
    halfway and the ledgers last so that a crash halfway leaves every remaining file still vouched for."""
    keep = {LOCK_KEY, getattr(out, "ledger", None), *keep}
    keys = [k for k in out.list("") if k not in keep]
    own = qvlm_keys(out, keys)
    order = sorted((k for k in keys if k in own), key=lambda k: (k != MANIFEST_KEY, k.startswith(LEDGER_PREFIX), k))
    for key in order:
        out.delete(key)
