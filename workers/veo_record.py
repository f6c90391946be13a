"""The record of a finished visual-encoder optimisation, so that a resumed job reuses it.

VEO runs through the stage actors (qvlm/veo.py); the first stage, which owns the vision tower, writes the tuned
tower in the block file format (``_qvlm/veo.safetensors``) and then a record with its sha256 (``_qvlm/veo.json``).
Once the partition numbers the tower's blocks (one per layer list), each is written as its part of the tower.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

from qvlm.veo import VeoResult
from workers.shard import BlockRecord, CorruptRecord, write_block_files
from workers.storage import StorageError

VEO_SHARD_KEY = "_qvlm/veo.safetensors"
VEO_RECORD_KEY = "_qvlm/veo.json"
VEO_EXTRA_KEY = "_qvlm/veo.extra.safetensors"
VEO_INDEX = -1  # the tuned tower's record before the partition gives it a block index


@dataclass(frozen=True)
class VeoRecord:
    block: BlockRecord  # the tuned tower as a block (index -1); errors = vision-output MSE
    seconds: float
    history: tuple[dict, ...]

    def to_json(self) -> bytes:
        return json.dumps({"block": json.loads(self.block.to_json()), "seconds": self.seconds,
                           "history": list(self.history)}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "VeoRecord":
        try:
            raw = json.loads(data)
            return cls(BlockRecord.from_json(json.dumps(raw["block"]).encode()), raw["seconds"], tuple(raw["history"]))
        except (ValueError, TypeError, KeyError) as exc:
            raise CorruptRecord(f"not a VEO record ({type(exc).__name__}: {exc})") from None


def write_veo_record(out, result: VeoResult, prefixes: dict[str, str], act, dense: dict) -> VeoRecord:
    """Write the tuned tower's file, then its record (the record last: it is what a resumed job trusts)."""
    block = write_block_files(out, VEO_INDEX, VEO_SHARD_KEY, result.block, prefixes, act, dense, extra_key=VEO_EXTRA_KEY)
    record = VeoRecord(block, result.seconds, result.history)
    out.put_bytes(VEO_RECORD_KEY, record.to_json())
    return record


def load_veo_record(out, unit_names: Sequence[str]) -> VeoRecord | None:
    """The finished VEO of this output, if its record names these units and its file verifies."""
    if not out.exists(VEO_RECORD_KEY):
        return None
    try:
        record = VeoRecord.from_json(out.get_bytes(VEO_RECORD_KEY))
    except CorruptRecord:
        return None  # trained again
    if record.block.unit_names != tuple(unit_names):
        return None
    try:
        out.get_bytes(record.block.shard_key, record.block.sha256)
    except StorageError:
        return None  # corrupt or missing: trained again
    return record
