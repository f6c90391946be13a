"""The job driver: plan, start stage actors, capture, plan blocks, fan out block searches, commit.

Phases (written to the state file as they change): planning -> capturing -> statistics -> searching ->
committing -> finished (or failed; or stopped, by SIGINT or SIGTERM: see cluster/stopping.py). A finished job
submitted again is checked against its manifest and repaired (cluster/repair.py). The driver moves only small
records and object references; tensors move between workers through Ray's object store, weights come straight
from storage into each worker.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qvlm.driver import plan_blocks, plan_precision, unit_bits, vision_streams
from qvlm.dependency import DependencySeries
from cluster import stopping
from cluster.commit import MANIFEST_KEY, JobResult, commit_output, load_finished_blocks
from cluster.export import export_checkpoint
from cluster.lock import LockError, OutputLock
from cluster.output import OutputRefused, claim_output, clear_output
from cluster.plan import JobPlan, make_plan
from cluster.repair import export_repairs, reexport
from cluster.settings import JobSettings
from cluster.state import JobState, StateFile
from cluster.verify import check_output
from cluster.veo import record_vision_block, tune_vision_encoder
from workers.block_task import BlockSpec
from workers.safetensors_reader import CheckpointIndex
from workers.stage import fetch_small_files
from workers.storage import open_model, open_output, redact


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
    """Connect to ``address``, or start an embedded local Ray sized for the job; reuse one already running.
    The process keeps its own SIGINT/SIGTERM handlers (cluster/stopping.py): ray.init would replace them."""
    import os

    import ray

    if ray.is_initialized():
        yield ray
        return
    try:
        with stopping.keep_handlers():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                cpus = max(os.cpu_count() or 1, int(settings.workers * settings.cpus_per_worker) + 1)
                ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                         num_gpus=int(settings.workers * settings.gpus_per_worker) or None,
                         object_store_memory=512 * 2**20)
        _say_where_ray_logs(ray)
        yield ray
    finally:
        ray.shutdown()


def _say_where_ray_logs(ray) -> None:
    """Ray's own logs (raylet, GCS, every worker's output) stay in its session folder; name it on stderr, which
    qvlm-submit sends to the job's log file."""
    import sys

    node = getattr(ray._private.worker, "_global_node", None)
    if node is not None:
        print(f"Ray's logs for this run (raylet, workers): {node.get_logs_dir_path()}", file=sys.stderr, flush=True)


def _claim_output(out, settings: JobSettings) -> JobState | None:
    """Refuse an output holding files qvlm did not write, or another job's files unless ``overwrite`` (the rule
    of cluster/output.py, which qvlm-submit also checks before starting); return the state to resume."""
    try:
        claim = claim_output(out, settings.output_uri, settings.spec_hash, settings.overwrite)
    except OutputRefused as exc:
        raise JobError(str(exc), exit_code=2) from None
    if claim.clear:
        _clear_output(out)
        return None
    return claim.previous


def _clear_output(out) -> None:
    """Delete what an earlier qvlm run wrote (only what its ledgers, manifest and records list), the manifest
    first so that nothing looks complete halfway; keep our lock."""
    clear_output(out)


def inspect_model(settings: JobSettings) -> tuple[JobPlan, Path]:
    model_store = open_model(settings.model_uri, settings.model_endpoint)
    config_dir = fetch_small_files(model_store)
    index = CheckpointIndex.open(model_store)
    return make_plan(str(config_dir), index, settings.quant, settings.workers), config_dir


def run_job(settings: JobSettings, address: str | None = None, echo=print) -> JobOutcome:
    """Run the job under the output's lock (see cluster/lock.py); resume what a previous run finished."""
    out = open_output(settings.output_uri, settings.output_endpoint)
    lock = OutputLock(out, settings.name, settings.spec_hash, echo)
    try:
        lock.acquire()
    except LockError as exc:
        raise JobError(str(exc), exit_code=2) from None
    try:
        return _run_locked(settings, address, echo, out, lock)
    finally:
        lock.release()


def _run_locked(settings: JobSettings, address: str | None, echo, out, lock: OutputLock) -> JobOutcome:
    previous = _claim_output(out, settings)
    if previous is not None and previous.phase == "finished" and out.exists(MANIFEST_KEY):
        outcome = _finished_again(settings, address, echo, out, lock, previous)
        if outcome is not None:
            return outcome
    out.delete(MANIFEST_KEY)  # a manifest left by an interrupted commit must not vouch for files rewritten now
    state = StateFile(out, JobState(settings.name, settings.spec_hash), echo, guard=lock.check)
    state.update(phase="planning")
    with _recorded(state, lock):
        plan, _ = inspect_model(settings)
        with ray_session(address, settings) as ray:
            return _run_phases(ray, settings, plan, out, state)


@contextmanager
def _recorded(state: StateFile, lock: OutputLock):
    """Record in the state file how a run that did not finish ended: stopped by a signal, or failed and why.
    A run that lost its lock no longer owns the state file and records nothing."""
    try:
        yield
    except KeyboardInterrupt:
        if lock.lost is None:
            state.update(phase="stopped", error=f"stopped by {stopping.received()}; re-submit to resume")
        raise
    except Exception as exc:
        if lock.lost is None:
            cause = exc  # what a worker raised: Ray's wrapper repeats the remote traceback in its message
            while type(cause).__name__.startswith("RayTaskError") and isinstance(getattr(cause, "cause", None), Exception):
                cause = cause.cause
            state.update(phase="failed", error=redact(f"{type(cause).__name__}: {cause}")[:500])
        raise


def _finished_again(settings: JobSettings, address: str | None, echo, out, lock: OutputLock,
                    previous: JobState) -> JobOutcome | None:
    """A finished job submitted again: check its output against the manifest and re-export the checkpoint
    files that fail (cluster/repair.py); None when only running the job again can repair it."""
    manifest, failed = check_output(out)
    done = JobOutcome(settings.output_uri, previous.blocks_total, previous.blocks_total, previous.seconds)
    if not failed:
        echo(f"[{settings.name}] already finished at {settings.output_uri}: its {len(manifest['files'])} files match "
             "the manifest; nothing to do", flush=True)
        return done
    for problem in failed.values():
        echo(f"[{settings.name}] finished, but {problem}", flush=True)
    if not export_repairs(failed):
        echo(f"[{settings.name}] running the job again to repair it; finished blocks whose shards verify are not "
             "searched again", flush=True)
        return None
    echo(f"[{settings.name}] re-exporting the checkpoint from the block shards", flush=True)
    state = StateFile(out, previous, echo, guard=lock.check)
    with _recorded(state, lock):
        state.update(phase="committing", error=None)
        with ray_session(address, settings) as ray:
            reexport(ray, settings, out, manifest, state)
        still = check_output(out)[1]
        if still:
            raise JobError(f"the output still fails its manifest after the re-export: {'; '.join(still.values())}")
        state.update(phase="finished")
    return done


def _run_phases(ray, settings: JobSettings, plan: JobPlan, out, state: StateFile) -> JobOutcome:
    from cluster.fanout import search_blocks

    t0 = time.perf_counter()
    seconds: dict = {}
    for attempt in range(1, settings.max_retries + 2):
        try:
            stage_info, stage_rss, planned, inputs = _stage_phase(ray, settings, plan, out, state, seconds, t0)
            break
        except ray.exceptions.RayActorError as exc:
            _stage_died(exc, attempt, settings, state)
    schemes, precision, deps, blocks, thresholds, stats, veo = planned
    specs = [BlockSpec(b.index, tuple(plan.units[i].name for i in b.units), tuple(plan.units[i].linears for i in b.units),
                       {plan.units[i].linear_name(n): schemes[plan.units[i].linear_name(n)] for i in b.units for n in plan.units[i].linears})
             for b in blocks]
    if veo is not None:
        for b in blocks:
            if plan.units[b.units[0]].segment == "vision":
                record_vision_block(out, b, veo.record)
    finished = load_finished_blocks(out, specs, state.echo)
    state.update(phase="searching", blocks_total=len(blocks), blocks_done=len(finished), blocks_resumed=len(finished),
                 seconds=dict(seconds))
    t_search = time.perf_counter()
    records = search_blocks(ray, settings, blocks, specs, inputs, finished, state, t_search)
    seconds["search"] = time.perf_counter() - t_search
    state.update(phase="committing", seconds=dict(seconds))
    stages_info = [{**info, "peak_rss_bytes": rss, "weight_bytes": plan.stage_bytes(i)}
                   for i, (info, rss) in enumerate(zip(stage_info, stage_rss))]
    shards = tuple((records[b.index].shard_key, records[b.index].sha256) for b in blocks)
    checkpoint = export_checkpoint(ray, settings, shards, schemes, state)
    seconds["export"] = time.perf_counter() - t_search - seconds["search"]
    t_eval = time.perf_counter()
    evaluation = _evaluate(ray, settings, plan)
    seconds["evaluate"] = time.perf_counter() - t_eval
    seconds["total"] = time.perf_counter() - t0  # up to the commit, which writes these figures
    result = JobResult(settings, plan, schemes, precision, deps, thresholds, blocks, records, seconds, stages_info, stats,
                       veo.document() if veo is not None else None)
    state.check()  # never commit into an output whose lock another run has taken
    commit_output(out, result, checkpoint, evaluation)
    state.update(phase="finished", blocks_done=len(blocks), seconds=dict(seconds))
    return JobOutcome(settings.output_uri, len(blocks), len(finished), seconds, evaluation)


def _stage_phase(ray, settings: JobSettings, plan: JobPlan, out, state: StateFile, seconds: dict, t0: float):
    """Start the stage actors, capture, plan the blocks and take their inputs; the stages stop at the end."""
    from cluster.placement import start_stages, stop_stages

    stages, pg, stage_info = start_stages(ray, settings, plan)
    seconds["load"] = time.perf_counter() - t0  # stage actors started, each holding its weights
    try:
        state.update(phase="capturing")
        _capture(ray, stages, settings, state)
        seconds["capture"] = time.perf_counter() - t0 - seconds["load"]
        state.update(phase="statistics", seconds=dict(seconds))
        t_stats = time.perf_counter()
        schemes, precision, deps, blocks, thresholds, stats, veo = _plan_blocks(ray, stages, plan, settings, out)
        inputs = _block_inputs(ray, stages, plan, blocks)
        seconds["statistics"] = time.perf_counter() - t_stats
        if veo is not None:  # a barrier inside the statistics phase, counted apart
            seconds["veo"] = veo.seconds
            seconds["statistics"] -= veo.seconds
        stage_rss = ray.get([s.peak_rss_bytes.remote() for s in stages])
        return stage_info, stage_rss, (schemes, precision, deps, blocks, thresholds, stats, veo), inputs
    finally:
        stop_stages(ray, stages, pg)


def _stage_died(exc: Exception, attempt: int, settings: JobSettings, state: StateFile) -> None:
    """A stage actor died (its captures are lost with it): start a fresh set of stages and capture again, up
    to ``resources.max_retries`` times; a capture costs minutes where the block searches cost hours."""
    attempts = settings.max_retries + 1
    inner = getattr(exc, "cause", None) or exc  # a RayTaskError(ActorDiedError) carries the actor's error
    cause = f"{type(inner).__name__}: {(str(inner).strip().splitlines() or [''])[0][:300]}"
    if attempt >= attempts:
        raise JobError(f"a stage worker died during {state.state.phase} in each of {attempts} attempts (last: {cause}); "
                       "the job stopped before any block search and committed nothing; re-submit it to try again "
                       "or raise resources.max_retries") from exc
    state.echo(f"[{settings.name}] a stage worker died during {state.state.phase} ({cause}); starting the stages again "
               f"and redoing the capture (attempt {attempt + 1} of {attempts})", flush=True)


def _evaluate(ray, settings: JobSettings, plan: JobPlan) -> dict:
    """Held-out comparison with full precision, in one worker, for models small enough to load whole."""
    from workers.eval_task import EVAL_MAX_BYTES, evaluate_checkpoint

    if plan.total_bytes > EVAL_MAX_BYTES:
        return {"skipped": f"the model has {plan.total_bytes / 2**30:.1f} GiB of tensors; evaluating models over "
                           f"{EVAL_MAX_BYTES / 2**30:.0f} GiB across stages is not implemented yet"}
    task = ray.remote(evaluate_checkpoint).options(num_cpus=settings.cpus_per_worker, num_gpus=settings.gpus_per_worker or 0)
    return ray.get(task.remote(settings.model_uri, settings.model_endpoint, settings.output_uri, settings.output_endpoint,
                               settings.calibration))


def _capture(ray, stages, settings: JobSettings, state: StateFile | None = None) -> None:
    """Pipeline every calibration batch through the stages; Ray overlaps stages on different batches. With a
    state, each batch out of the last stage counts as a step of the capturing phase."""
    batches = ray.get(stages[0].calibration_batches.remote(settings.calibration))
    if not batches:
        raise JobError("calibration produced no batches (calibration.samples is 0?)", exit_code=2)
    tails = []
    for batch in batches:
        ref = stages[0].capture.remote(batch)
        for stage in stages[1:]:
            ref = stage.capture.remote(ref)
        tails.append(ref)
    if state is None:
        ray.get(tails)
        return
    t0, pending = time.perf_counter(), list(tails)
    state.update(steps_done=0, steps_total=len(tails))
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)  # a stage's error, raised here
        state.update(steps_done=len(tails) - len(pending), steps_seconds=time.perf_counter() - t0)


def _plan_blocks(ray, stages, plan: JobPlan, settings: JobSettings, out):
    quant = settings.quant
    stats = [s for part in ray.get([st.statistics.remote(quant.weights) for st in stages]) for s in part]
    units = list(plan.units)
    schemes, precision = plan_precision(plan.linear_shapes, units, stats, quant)
    bits = {u.index: unit_bits(u, schemes, quant) for u in units}
    deps = _dependencies(ray, stages, plan, bits)
    veo, whole = None, []
    if quant.veo.enabled:
        veo = tune_vision_encoder(ray, stages, plan, settings, out, schemes, bits, deps,
                                  recapture=lambda: _capture(ray, stages, settings))
        deps = _dependencies(ray, stages, plan, bits)
        whole = vision_streams(plan.streams, units)
    blocks, thresholds = plan_blocks(plan.streams, deps, quant, whole)
    return schemes, precision, deps, blocks, thresholds, stats, veo


def _dependencies(ray, stages, plan: JobPlan, bits: dict) -> list[DependencySeries]:
    previous = {i: (s[p - 1] if p > 0 else None) for s in plan.streams for p, i in enumerate(s)}
    entropy, dep = {}, {}
    for e, d in ray.get([st.dependencies.remote(bits, previous) for st in stages]):
        entropy.update(e)
        dep.update(d)
    return [DependencySeries(tuple(entropy[i] for i in s), tuple(dep[i] for i in s[1:])) for s in plan.streams]


def _block_inputs(ray, stages, plan: JobPlan, blocks) -> list[tuple]:
    """Object refs of (first-unit calls, last-unit FP outputs) per block, owned by the driver so they
    outlive the stage actors."""
    owner = {i: stages[s] for s, stage in enumerate(plan.stages) for i in stage}
    refs = [(owner[b.units[0]].unit_calls.remote(b.units[0]), owner[b.units[-1]].unit_outputs.remote(b.units[-1])) for b in blocks]
    flat = [r for pair in refs for r in pair]
    ray.wait(flat, num_returns=len(flat), fetch_local=False)
    return refs
