"""Visual-encoder optimisation in one worker, as a barrier between the statistics and the partition.

The worker loads the whole model the way the stages load their parts (skeleton on meta, ranged reads of the
safetensors), because the loss runs through the frozen language model. It writes the tuned vision tower as a
block shard, ``_qvlm/veo.safetensors``, and then a record with its sha256, so a resumed job reuses it. Models
over ``VEO_MAX_BYTES`` are refused at submission: data-parallel VEO across stage workers is not implemented.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Sequence

from qvlm.batches import CalibrationSettings, calibration_answer_masks, calibration_batches
from qvlm.config import QuantConfig
from qvlm.structure import Unit
from qvlm.veo import optimize_vision_encoder
from workers.block_task import encode_shard
from workers.stage import ModelShard
from workers.storage import StorageError, open_output

VEO_MAX_BYTES = 4 * 2**30
VEO_SHARD_KEY = "_qvlm/veo.safetensors"
VEO_RECORD_KEY = "_qvlm/veo.json"


@dataclass(frozen=True)
class VeoRecord:
    shard_key: str
    sha256: str
    size: int
    unit_names: tuple[str, ...]
    error_before: float  # vision-output MSE with round-to-nearest quantizers
    error_after: float
    evaluations: int
    seconds: float
    history: tuple[dict, ...]


def run_veo(model_uri: str, model_endpoint: str | None, output_uri: str, output_endpoint: str | None,
            units: Sequence[Unit], schemes: dict, bits: dict[int, int], config: QuantConfig,
            calibration: CalibrationSettings) -> VeoRecord:
    names = [u.name for u in units]
    shard = ModelShard(model_uri, model_endpoint, names, glue=True, all_unit_modules=names)
    batches = calibration_batches(shard.local_dir, calibration)
    answers = calibration_answer_masks(shard.local_dir, calibration)
    result = optimize_vision_encoder(shard.model, batches, units, schemes, config, bits, answers)
    blob = encode_shard(result.block)
    storage = open_output(output_uri, output_endpoint)
    sha = storage.put_bytes(VEO_SHARD_KEY, blob)
    block = result.block
    record = VeoRecord(VEO_SHARD_KEY, sha, len(blob), block.unit_names, block.error_before, block.error_after,
                       block.evaluations, result.seconds, result.history)
    storage.put_bytes(VEO_RECORD_KEY, json.dumps(asdict(record), sort_keys=True).encode())
    return record


def load_veo_record(out, unit_names: Sequence[str]) -> VeoRecord | None:
    """The finished VEO of this output, if its record names these units and its shard verifies."""
    if not out.exists(VEO_RECORD_KEY):
        return None
    data = json.loads(out.get_bytes(VEO_RECORD_KEY))
    record = VeoRecord(**{**data, "unit_names": tuple(data["unit_names"]), "history": tuple(data["history"])})
    if record.unit_names != tuple(unit_names):
        return None
    try:
        out.get_bytes(record.shard_key, record.sha256)
    except StorageError:
        return None  # corrupt or missing: trained again
    return record
