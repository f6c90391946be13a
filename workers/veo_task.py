"""Visual-encoder optimisation in one worker, as a barrier between the statistics and the partition.

The worker loads the whole model the way the stages load their parts (skeleton on meta, ranged reads of the
safetensors), because the loss runs through the frozen language model. It writes the tuned vision tower in
the block file format (``_qvlm/veo.safetensors``) and then a record with its sha256 (``_qvlm/veo.json``), so a
resumed job reuses it; once the partition numbers the tower's block, the block's checkpoint file is a copy of
it. Models over ``VEO_MAX_BYTES`` are refused at submission: VEO across stage workers is not implemented.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

from qvlm.config import CalibrationSettings, QuantConfig
from qvlm.batches import calibration_answer_masks, calibration_batches
from qvlm.structure import Unit
from qvlm.veo import optimize_vision_encoder
from workers.locations import Locations
from workers.model_shard import ModelShard
from workers.shard import BlockRecord, CorruptRecord, write_block_files
from workers.storage import StorageError

VEO_MAX_BYTES = 4 * 2**30
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


def run_veo(where: Locations, units: Sequence[Unit], schemes: dict, bits: dict[int, int], config: QuantConfig,
            calibration: CalibrationSettings) -> VeoRecord:
    names = [u.name for u in units]
    shard = ModelShard(where.model(), names, glue=True, all_unit_modules=names)
    batches = calibration_batches(shard.local_dir, calibration)
    answers = calibration_answer_masks(shard.local_dir, calibration)
    result = optimize_vision_encoder(shard.model, batches, units, schemes, config, bits, answers)
    prefixes = {r.name: shard.prefix(r.name) for r in result.block.linears}
    out = where.output()
    block = write_block_files(out, VEO_INDEX, VEO_SHARD_KEY, result.block, prefixes, config.activations,
                              shard.dense_linears(), extra_key=VEO_EXTRA_KEY)
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
