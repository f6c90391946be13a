"""The VEO barrier of a job: tune the vision tower's quantizers in one worker (or reuse a finished run), put them
into the first stage's model, capture again, and record the vision tower as a finished block."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

from qvlm.driver import Block, plan_blocks
from cluster.plan import JobPlan
from cluster.settings import JobSettings
from workers.block_task import BlockRecord, record_key
from workers.veo_task import VeoRecord, load_veo_record


@dataclass(frozen=True)
class VeoOutcome:
    record: VeoRecord
    reused: bool
    seconds: float  # tuning (0 when reused) + applying + capturing again
    dependency_before: list  # DependencySeries per stream with the full-precision tower
    h0_before: list
    blocks_before: list[Block]

    def document(self) -> dict:
        """What the plan document and the report show about VEO."""
        r = self.record
        return {"history": list(r.history), "seconds": self.seconds, "tuning_seconds": r.seconds, "reused": self.reused,
                "error_before": r.error_before, "error_after": r.error_after, "shard": r.shard_key,
                "dependency_before": [{"entropy": list(d.entropy), "dependency": list(d.dependency), "h0": h}
                                      for d, h in zip(self.dependency_before, self.h0_before)],
                "blocks_before": [{"index": b.index, "stream": b.stream, "units": list(b.units)} for b in self.blocks_before]}


def tune_vision_encoder(ray, stages, plan: JobPlan, settings: JobSettings, out, schemes: dict, bits: dict, deps,
                        recapture) -> VeoOutcome:
    t0 = time.perf_counter()
    quant = settings.quant
    vision = [u for u in plan.units if u.segment == "vision"]
    record = load_veo_record(out, [u.name for u in vision])
    reused = record is not None
    # The first stage owns every stream but the last, so the whole vision tower lives there.
    if record is None:
        record = ray.get(stages[0].run_veo.remote(settings.output_uri, settings.output_endpoint, list(plan.units),
                                                  schemes, bits, quant, settings.calibration))
    blocks_before, h0_before = plan_blocks(plan.streams, deps, quant)
    ray.get(stages[0].use_quantized.remote(settings.output_uri, settings.output_endpoint, record.shard_key,
                                           record.sha256, quant.activations))
    ray.get([s.reset_captures.remote() for s in stages])
    recapture()
    return VeoOutcome(record, reused, time.perf_counter() - t0, list(deps), h0_before, blocks_before)


def record_vision_block(out, block: Block, veo: VeoRecord) -> None:
    """The tuned tower is the vision stream's one block; its record points at the VEO shard, so the search
    skips it and the export packs it like any other finished block."""
    record = BlockRecord(block.index, veo.shard_key, veo.sha256, veo.size, veo.unit_names, veo.error_before,
                         veo.error_after, veo.evaluations, veo.seconds)
    out.put_bytes(record_key(block.index), json.dumps(asdict(record), sort_keys=True).encode())
