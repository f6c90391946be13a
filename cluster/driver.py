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

from qvlm.method import Hooks, run_method
from cluster.commit import MANIFEST_KEY, JobResult, commit_output, load_finished_blocks
from cluster.lock import LOCK_KEY, LockError, OutputLock
from cluster.pipeline import RayPipeline
from cluster.plan import JobPlan, make_plan
from cluster.settings import JobSettings
from cluster.state import JobState, StateFile, read_state
from cluster.veo import VeoOutcome, tune_vision_encoder
from workers.model_shard import fetch_small_files
from workers.safetensors_reader import CheckpointIndex
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
        _clear_output(out)
        return None
    if previous is None and [k for k in out.list("") if k != LOCK_KEY] and not settings.overwrite:
        raise JobError(f"output {settings.output_uri} is not empty and holds no qvlm job; "
                       "set output.overwrite: true or choose an empty output.uri", exit_code=2)
    return previous


def _clear_output(out) -> None:
    """Delete another job's files, its manifest first so that nothing looks complete halfway; keep our lock."""
    keys = [k for k in out.list("") if k != LOCK_KEY]
    for key in sorted(keys, key=lambda k: k != MANIFEST_KEY):
        out.delete(key)


def inspect_model(settings: JobSettings) -> tuple[JobPlan, Path]:
    model_store = open_storage(settings.model_uri, settings.model_endpoint)
    config_dir = fetch_small_files(model_store)
    index = CheckpointIndex.open(model_store)
    return make_plan(str(config_dir), index, settings.quant, settings.workers), config_dir


def run_job(settings: JobSettings, address: str | None = None, echo=print) -> JobOutcome:
    """Run the job under the output's lock (see cluster/lock.py); resume what a previous run finished."""
    out = open_storage(settings.output_uri, settings.output_endpoint)
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
        echo(f"[{settings.name}] already finished at {settings.output_uri}; nothing to do", flush=True)
        return JobOutcome(settings.output_uri, previous.blocks_total, previous.blocks_total, previous.seconds)
    out.delete(MANIFEST_KEY)  # a manifest left by an interrupted commit must not vouch for files rewritten now
    state = StateFile(out, JobState(settings.name, settings.spec_hash), echo, guard=lock.check)
    state.update(phase="planning")
    try:
        plan, _ = inspect_model(settings)
        with ray_session(address, settings) as ray:
            return _run_phases(ray, settings, plan, out, state)
    except Exception as exc:
        if lock.lost is None:  # a run that lost its lock no longer owns the state file
            cause = exc  # what a worker raised: Ray's wrapper repeats the remote traceback in its message
            while type(cause).__name__.startswith("RayTaskError") and isinstance(getattr(cause, "cause", None), Exception):
                cause = cause.cause
            state.update(phase="failed", error=f"{type(cause).__name__}: {cause}"[:500])
        raise


def _run_phases(ray, settings: JobSettings, plan: JobPlan, out, state: StateFile) -> JobOutcome:
    t0 = time.perf_counter()
    method, stages_info, load_seconds = _quantize_on_stages(ray, settings, plan, out, state)
    records = load_finished_blocks(out, method.blocks, plan.units, state.echo)
    missing = [b.index for b in method.blocks if b.index not in records]
    if missing:
        raise JobError(f"blocks {missing[:5]} have no verified record after the search; re-submit the job to search them")
    seconds = {"load": load_seconds, **vars(method.seconds)}
    state.update(phase="committing", seconds=dict(seconds))
    t_export = time.perf_counter()
    checkpoint = _export_checkpoint(ray, settings, plan, method, records)
    seconds["export"] = time.perf_counter() - t_export
    t_eval = time.perf_counter()
    evaluation = _evaluate(ray, settings, plan)
    seconds["evaluate"] = time.perf_counter() - t_eval
    seconds["total"] = time.perf_counter() - t0  # up to the commit, which writes these figures
    result = JobResult(settings, plan, method, records, seconds, stages_info)
    state.check()  # never commit into an output whose lock another run has taken
    commit_output(out, result, checkpoint, evaluation)
    state.update(phase="finished", blocks_done=len(method.blocks), seconds=dict(seconds))
    resumed = len(method.done)
    return JobOutcome(settings.output_uri, len(method.blocks), resumed, seconds, evaluation)


def _quantize_on_stages(ray, settings: JobSettings, plan: JobPlan, out, state: StateFile):
    """Run the method on a fresh set of stage actors; when one dies (its captures are lost with it), start the
    stages again and capture again, up to ``resources.max_retries`` times. Finished blocks are in the output's
    ledger, so a new attempt searches only what is missing."""
    for attempt in range(1, settings.max_retries + 2):
        try:
            return _attempt(ray, settings, plan, out, state)
        except ray.exceptions.RayActorError as exc:
            _stage_died(exc, attempt, settings, state)


def _attempt(ray, settings: JobSettings, plan: JobPlan, out, state: StateFile):
    from cluster.placement import start_stages, stop_stages

    t0 = time.perf_counter()
    stages, pg, stage_info = start_stages(ray, settings, plan)
    load_seconds = time.perf_counter() - t0  # stage actors started, each holding its weights
    try:
        pipe = RayPipeline(ray, stages)
        n_batches = ray.get(stages[0].load_batches.remote(settings.calibration))
        if not n_batches:
            raise JobError("calibration produced no batches (calibration.samples is 0?)", exit_code=2)
        method = run_method(pipe, plan.layout, plan.linear_shapes, range(n_batches), settings.quant,
                            JobHooks(ray, pipe, plan, settings, out, state).hooks())
        rss = ray.get([s.peak_rss_bytes.remote() for s in stages])
        sent = ray.get([s.transfer_bytes.remote() for s in stages])
    finally:
        stop_stages(ray, stages, pg)
    info = [{**i, "peak_rss_bytes": r, "weight_bytes": plan.stage_bytes(k), "transfer_bytes": b}
            for k, (i, r, b) in enumerate(zip(stage_info, rss, sent))]
    return method, info, load_seconds


class JobHooks:
    """What a job adds to the method: progress in the state file, the resume ledger, VEO in the first stage."""

    def __init__(self, ray, pipe: RayPipeline, plan: JobPlan, settings: JobSettings, out, state: StateFile):
        self.ray, self.pipe, self.plan, self.settings, self.out, self.state = ray, pipe, plan, settings, out, state
        self.veo: VeoOutcome | None = None

    def hooks(self) -> Hooks:
        return Hooks(tune_vision=self.tune_vision, finished=self.finished, progress=self.progress)

    def tune_vision(self, schemes: dict, bits: dict, deps: list) -> VeoOutcome:
        self.veo = tune_vision_encoder(self.ray, self.pipe, self.plan, self.settings, self.out, schemes, bits, deps)
        return self.veo

    def finished(self, blocks) -> set[int]:
        """Once the blocks are known: tell the stages how the checkpoint's files are numbered, put the VEO-tuned
        tower in place as its block, and name the blocks an earlier run finished (their records verify)."""
        stages = self.pipe.actors
        self.ray.get([s.set_files.remote(self.plan.n_files(len(blocks))) for s in stages])
        if self.veo is not None:
            for b in blocks:
                if self.plan.units[b.units[0]].segment == "vision":
                    self.ray.get(stages[0].adopt_block.remote(self.veo.record.block, b.index))
        return set(load_finished_blocks(self.out, blocks, self.plan.units, self.state.echo))

    def progress(self, phase: str, done: int, total: int) -> None:
        state = self.state
        if phase == "searching":
            state.update(phase=phase, blocks_done=done, blocks_total=max(total, state.state.blocks_total))
        elif phase != state.state.phase:
            state.update(phase=phase)


def _stage_died(exc: Exception, attempt: int, settings: JobSettings, state: StateFile) -> None:
    """A stage actor died: say so and try again, or give up after ``resources.max_retries`` new attempts."""
    attempts = settings.max_retries + 1
    inner = getattr(exc, "cause", None) or exc  # a RayTaskError(ActorDiedError) carries the actor's error
    cause = f"{type(inner).__name__}: {(str(inner).strip().splitlines() or [''])[0][:300]}"
    if attempt >= attempts:
        raise JobError(f"a stage worker died during {state.state.phase} in each of {attempts} attempts (last: {cause}); "
                       "the blocks it finished are kept in the output; re-submit the job to go on, "
                       "or raise resources.max_retries") from exc
    state.echo(f"[{settings.name}] a stage worker died during {state.state.phase} ({cause}); starting the stages again "
               f"(attempt {attempt + 1} of {attempts}); finished blocks are kept", flush=True)


def _export_checkpoint(ray, settings: JobSettings, plan: JobPlan, method, records: dict) -> dict:
    """One worker task writes the rest of the checkpoint around the blocks' files."""
    from workers.export_task import ExportRequest, write_checkpoint

    request = ExportRequest(settings.locations, tuple(records[b.index] for b in method.blocks), plan.rest_chunks,
                            dict(method.schemes), settings.quant.activations)
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
