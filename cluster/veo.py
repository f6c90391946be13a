"""The VEO barrier of a job: tune the vision tower's quantizers through the stage actors (or reuse a finished
run), put them into the first stage's model and capture again behind them; once the partition numbers the tower's
block, the first stage writes it as that block."""

from __future__ import annotations

import time
from dataclasses import dataclass

from qvlm.method import Block, Hooks, capture_phase, plan_blocks
from qvlm.veo import veo_phase
from cluster.pipeline import RayPipeline
from cluster.plan import JobPlan
from cluster.job import Job
from workers.veo_record import VeoRecord, load_veo_record


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
                "error_before": r.block.error_before, "error_after": r.block.error_after, "shard": r.block.shard_key,
                "dependency_before": [{"entropy": list(d.entropy), "dependency": list(d.dependency), "h0": h}
                                      for d, h in zip(self.dependency_before, self.h0_before)],
                "blocks_before": [{"index": b.index, "stream": b.stream, "units": list(b.units)} for b in self.blocks_before]}


def tune_vision_encoder(ray, pipe: RayPipeline, plan: JobPlan, job: Job, out, schemes: dict, bits: dict,
                        deps, progress=None) -> VeoOutcome:
    t0 = time.perf_counter()
    quant = job.quant
    first = pipe.actors[0]  # the first stage owns every stream but the last, so the whole vision tower lives there
    vision = [u for u in plan.units if u.segment == "vision"]
    record = load_veo_record(out, [u.name for u in vision])
    reused = record is not None
    n_batches = ray.get(first.load_batches.remote(job.calibration))
    if record is None:
        record = veo_phase(pipe, range(n_batches), plan.units, schemes, bits, quant, job.calibration, progress)
    blocks_before, h0_before = plan_blocks(plan.streams, deps, quant, layout=plan.layout)
    ray.get(first.use_quantized.remote(record.block, quant.activations))
    ray.get([s.reset_captures.remote() for s in pipe.actors])
    capture_phase(pipe, range(n_batches), Hooks())
    return VeoOutcome(record, reused, time.perf_counter() - t0, list(deps), h0_before, blocks_before)
