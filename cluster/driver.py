"""The job driver: plan, start stage actors, capture, plan blocks, fan out block searches, commit.

Phases (written to the state file as they change): planning -> capturing -> statistics -> searching ->
committing -> finished (or failed). The driver moves only small records and object references; tensors
move between workers through Ray's object store, weights come straight from storage into each worker.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qvlm.driver import plan_blocks, plan_precision, unit_bits
from qvlm.dependency import DependencySeries
from cluster.commit import JobResult, commit_output, load_finished_blocks
from cluster.plan import JobPlan, make_plan
from cluster.settings import JobSettings
from cluster.state import JobState, StateFile, read_state
from workers.block_task import BlockSpec
from workers.safetensors_reader import CheckpointIndex
from workers.stage import fetch_small_files
from workers.storage import open_storage


class JobError(Exception):
    """A job that cannot start or did not finish; ``exit_code`` follows the CLI's convention."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class JobOutcome:
    output_uri: str
    blocks: int
    blocks_resumed: int
    seconds: dict
    evaluation: dict | None = None


@contextmanager
def ray_session(address: str | None, settings: JobSettings):
    """Connect to ``address``, or start an embedded local Ray sized for the job; reuse one already running."""
    import os

    import ray

    if ray.is_initialized():
        yield ray
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        cpus = max(os.cpu_count() or 1, int(settings.workers * settings.cpus_per_worker) + 1)
        ray.init(address="local", num_cpus=cpus, num_gpus=int(settings.workers * settings.gpus_per_worker) or None,
                 include_dashboard=False, log_to_driver=False, object_store_memory=512 * 2**20)
    try:
        yield ray
    finally:
        ray.shutdown()


def _claim_output(out, settings: JobSettings) -> JobState | None:
    """Refuse an output that holds another job's files unless ``overwrite``; return the state to resume."""
    previous = read_state(out)
    if previous is not None and previous.spec_hash != settings.spec_hash:
        if not settings.overwrite:
            raise JobError(
                f"output {settings.output_uri} already holds job '{previous.name}' (spec {previous.spec_hash[:8]}); "
                "set output.overwrite: true to replace it, or choose another output.uri", exit_code=2)
        out.delete_prefix("")
        return None
    if previous is None and out.list("") and not settings.overwrite:
        raise JobError(f"output {settings.output_uri} is not empty and holds no qvlm job; "
                       "set output.overwrite: true or choose an empty output.uri", exit_code=2)
    return previous


def inspect_model(settings: JobSettings) -> tuple[JobPlan, Path]:
    model_store = open_storage(settings.model_uri, settings.model_endpoint)
    config_dir = fetch_small_files(model_store)
    index = CheckpointIndex.open(model_store)
    return make_plan(str(config_dir), index, settings.quant, settings.workers), config_dir


def run_job(settings: JobSettings, address: str | None = None, echo=print) -> JobOutcome:
    out = open_storage(settings.output_uri, settings.output_endpoint)
    previous = _claim_output(out, settings)
    if previous is not None and previous.phase == "finished" and out.exists("qvlm_manifest.json"):
        echo(f"[{settings.name}] already finished at {settings.output_uri}; nothing to do", flush=True)
        return JobOutcome(settings.output_uri, previous.blocks_total, previous.blocks_total, previous.seconds)
    state = StateFile(out, JobState(settings.name, settings.spec_hash), echo)
    state.update(phase="planning")
    try:
        plan, _ = inspect_model(settings)
        with ray_session(address, settings) as ray:
            return _run_phases(ray, settings, plan, out, state)
    except Exception as exc:
        state.update(phase="failed", error=f"{type(exc).__name__}: {exc}"[:500])
        raise


def _run_phases(ray, settings: JobSettings, plan: JobPlan, out, state: StateFile) -> JobOutcome:
    from cluster.placement import start_stages, stop_stages
    from cluster.fanout import search_blocks

    t0 = time.perf_counter()
    seconds: dict = {}
    stages, pg, stage_info = start_stages(ray, settings, plan)
    try:
        state.update(phase="capturing")
        _capture(ray, stages, settings)
        seconds["capture"] = time.perf_counter() - t0
        state.update(phase="statistics", seconds=dict(seconds))
        schemes, precision, deps, blocks, thresholds, stats = _plan_blocks(ray, stages, plan, settings)
        inputs = _block_inputs(ray, stages, plan, blocks)
        seconds["statistics"] = time.perf_counter() - t0 - seconds["capture"]
        stage_rss = ray.get([s.peak_rss_bytes.remote() for s in stages])
    finally:
        stop_stages(ray, stages, pg)
    specs = [BlockSpec(b.index, tuple(plan.units[i].name for i in b.units), tuple(plan.units[i].linears for i in b.units),
                       {plan.units[i].linear_name(n): schemes[plan.units[i].linear_name(n)] for i in b.units for n in plan.units[i].linears})
             for b in blocks]
    finished = load_finished_blocks(out, specs)
    state.update(phase="searching", blocks_total=len(blocks), blocks_done=len(finished), blocks_resumed=len(finished),
                 seconds=dict(seconds))
    t_search = time.perf_counter()
    records = search_blocks(ray, settings, blocks, specs, inputs, finished, state, t_search)
    seconds["search"] = time.perf_counter() - t_search
    state.update(phase="committing", seconds=dict(seconds))
    stages_info = [{**info, "peak_rss_bytes": rss, "weight_bytes": plan.stage_bytes(i)}
                   for i, (info, rss) in enumerate(zip(stage_info, stage_rss))]
    checkpoint = _export_checkpoint(ray, settings, blocks, records, schemes)
    seconds["export"] = time.perf_counter() - t_search - seconds["search"]
    t_eval = time.perf_counter()
    evaluation = _evaluate(ray, settings, plan)
    seconds["evaluate"] = time.perf_counter() - t_eval
    seconds["total"] = time.perf_counter() - t0  # up to the commit, which writes these figures
    result = JobResult(settings, plan, schemes, precision, deps, thresholds, blocks, records, seconds, stages_info, stats)
    commit_output(out, result, checkpoint, evaluation)
    state.update(phase="finished", blocks_done=len(blocks), seconds=dict(seconds))
    return JobOutcome(settings.output_uri, len(blocks), len(finished), seconds, evaluation)


def _export_checkpoint(ray, settings: JobSettings, blocks, records, schemes) -> dict:
    """One worker task writes the compressed-tensors checkpoint from the block shards."""
    from workers.export_task import ExportRequest, write_checkpoint

    request = ExportRequest(settings.model_uri, settings.model_endpoint, settings.output_uri, settings.output_endpoint,
                            tuple((records[b.index].shard_key, records[b.index].sha256) for b in blocks), dict(schemes),
                            settings.quant.activations)
    task = ray.remote(write_checkpoint).options(num_cpus=settings.cpus_per_worker, max_retries=settings.max_retries)
    return ray.get(task.remote(request))


def _evaluate(ray, settings: JobSettings, plan: JobPlan) -> dict:
    """Held-out comparison with full precision, in one worker, for models small enough to load whole."""
    from workers.eval_task import EVAL_MAX_BYTES, evaluate_checkpoint

    if plan.total_bytes > EVAL_MAX_BYTES:
        return {"skipped": f"the model has {plan.total_bytes / 2**30:.1f} GiB of tensors; evaluating models over "
                           f"{EVAL_MAX_BYTES / 2**30:.0f} GiB across stages is not implemented yet"}
    task = ray.remote(evaluate_checkpoint).options(num_cpus=settings.cpus_per_worker, num_gpus=settings.gpus_per_worker or 0)
    return ray.get(task.remote(settings.model_uri, settings.model_endpoint, settings.output_uri, settings.output_endpoint,
                               settings.calibration))


def _capture(ray, stages, settings: JobSettings) -> None:
    """Pipeline every calibration batch through the stages; Ray overlaps stages on different batches."""
    batches = ray.get(stages[0].calibration_batches.remote(settings.calibration))
    if not batches:
        raise JobError("calibration produced no batches (calibration.samples is 0?)", exit_code=2)
    tails = []
    for batch in batches:
        ref = stages[0].capture.remote(batch)
        for stage in stages[1:]:
            ref = stage.capture.remote(ref)
        tails.append(ref)
    ray.get(tails)


def _plan_blocks(ray, stages, plan: JobPlan, settings: JobSettings):
    quant = settings.quant
    stats = [s for part in ray.get([st.statistics.remote(quant.weights) for st in stages]) for s in part]
    units = list(plan.units)
    schemes, precision = plan_precision(plan.linear_shapes, units, stats, quant)
    bits = {u.index: unit_bits(u, schemes, quant) for u in units}
    previous = {i: (s[p - 1] if p > 0 else None) for s in plan.streams for p, i in enumerate(s)}
    entropy, dep = {}, {}
    for e, d in ray.get([st.dependencies.remote(bits, previous) for st in stages]):
        entropy.update(e)
        dep.update(d)
    deps = [DependencySeries(tuple(entropy[i] for i in s), tuple(dep[i] for i in s[1:])) for s in plan.streams]
    blocks, thresholds = plan_blocks(plan.streams, deps, quant)
    return schemes, precision, deps, blocks, thresholds, stats


def _block_inputs(ray, stages, plan: JobPlan, blocks) -> list[tuple]:
    """Object refs of (first-unit calls, last-unit FP outputs) per block, owned by the driver so they
    outlive the stage actors."""
    owner = {i: stages[s] for s, stage in enumerate(plan.stages) for i in stage}
    refs = [(owner[b.units[0]].unit_calls.remote(b.units[0]), owner[b.units[-1]].unit_outputs.remote(b.units[-1])) for b in blocks]
    flat = [r for pair in refs for r in pair]
    ray.wait(flat, num_returns=len(flat), fetch_local=False)
    return refs
