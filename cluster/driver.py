"""The job driver: plan, start the stage actors, run the method on them, evaluate through them, export, commit.

Phases (written to the state file as they change): planning -> capturing -> statistics -> searching ->
evaluating -> committing -> finished (or failed; or stopped, by SIGINT or SIGTERM: see cluster/stopping.py).
The method's sequence is qvlm.method.run_method, the one the one-process quantize runs; here its stages are Ray
actors that load their own weights from storage, search their own blocks and write each finished block's
checkpoint file; the held-out evaluation runs through the same actors (cluster/evaluation.py).
The driver moves only small records and object references. A finished job submitted again is checked against
its manifest and repaired (cluster/repair.py).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qvlm.method import Hooks, MethodResult, run_method
from cluster import stopping
from cluster.commit import MANIFEST_KEY, JobResult, load_finished_blocks, publish, write_documents
from cluster.gate import HELD_KEY, GateHeld, gate_verdict, held_message, read_held, write_held
from cluster.provenance import build_provenance
from cluster.evaluation import evaluate_on_stages
from cluster.export import export_checkpoint
from qvlm.errors import InputError, JobFailed
from qvlm.evaluate import Evaluation
from cluster.failures import one_line, root_cause
from cluster.lock import OutputLock
from cluster.memory import check_memory
from cluster.output import claim_output, clear_output
from cluster.pipeline import RayPipeline
from cluster.plan import JobPlan, inspect_model
from cluster.repair import block_files, export_repairs, reexport
from cluster.job import Job
from cluster.state import JobState, StateFile
from cluster.verify import check_files, check_output
from cluster.veo import VeoOutcome, tune_vision_encoder
from workers.shard import file_name
from workers.storage import redact


@dataclass(frozen=True)
class JobOutcome:
    output_uri: str
    blocks: int
    blocks_resumed: int
    seconds: dict
    evaluation: Evaluation | None = None


@contextmanager
def ray_session(address: str | None, job: Job):
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
                cpus = max(os.cpu_count() or 1, int(job.resources.workers * job.resources.cpus_per_worker) + 1)
                ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                         num_gpus=int(job.resources.workers * job.resources.gpus_per_worker) or None,
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


def _claim_output(out, job: Job) -> JobState | None:
    """Refuse an output holding files qvlm did not write, or another job's files unless ``overwrite`` (the rule
    of cluster/output.py, which qvlm-submit also checks before starting); return the state to resume."""
    claim = claim_output(out, job.where.output_uri, job.spec_hash, job.overwrite)
    if claim.clear:
        _clear_output(out)
        return None
    return claim.previous


def _clear_output(out) -> None:
    """Delete what an earlier qvlm run wrote (only what its ledgers, manifest and records list), the manifest
    first so that nothing looks complete halfway; keep our lock."""
    clear_output(out)


def run_job(job: Job, plan: JobPlan | None = None, address: str | None = None, echo=print) -> JobOutcome:
    """Run the job under the output's lock (see cluster/lock.py); resume what a previous run finished. ``plan``
    is what ``cluster.validate.validate`` gave for this job; without one (a library call), the model is planned
    here from its config and headers."""
    out = job.where.output()
    lock = OutputLock(out, job.name, job.spec_hash, echo)
    lock.acquire()
    try:
        return _run_locked(job, plan, address, echo, out, lock)
    finally:
        lock.release()


def _run_locked(job: Job, plan: JobPlan | None, address: str | None, echo, out, lock: OutputLock) -> JobOutcome:
    previous = _claim_output(out, job)
    if previous is not None and previous.phase == "finished" and out.exists(MANIFEST_KEY):
        outcome = _finished_again(job, address, echo, out, lock, previous)
        if outcome is not None:
            return outcome
    if previous is not None and previous.phase == "held":
        outcome = _held_again(job, echo, out, lock, previous)
        if outcome is not None:
            return outcome
    out.delete(MANIFEST_KEY)  # a manifest left by an interrupted commit must not vouch for files rewritten now
    state = StateFile(out, JobState(job.name, job.spec_hash), echo, guard=lock.check)
    state.update(phase="planning")
    with _recorded(state, lock):
        plan = plan or inspect_model(job)[0]
        with ray_session(address, job) as ray:
            return _run_phases(ray, job, plan, out, state)


@contextmanager
def _recorded(state: StateFile, lock: OutputLock):
    """Record in the state file how a run that did not finish ended: stopped by a signal, or failed and why.
    A run that lost its lock no longer owns the state file and records nothing."""
    try:
        yield
    except GateHeld:
        raise  # the state already says "held" and why
    except KeyboardInterrupt:
        if lock.lost is None:
            state.update(phase="stopped", error=f"stopped by {stopping.received()}; re-submit to resume")
        raise
    except Exception as exc:
        if lock.lost is None:
            cause = root_cause(exc)
            state.update(phase="failed", error=redact(f"{type(cause).__name__}: {cause}")[:500])
        raise


def _finished_again(job: Job, address: str | None, echo, out, lock: OutputLock,
                    previous: JobState) -> JobOutcome | None:
    """A finished job submitted again: check its output against the manifest and re-export the checkpoint
    files that fail (cluster/repair.py); None when only running the job again can repair it."""
    manifest, failed = check_output(out)
    done = JobOutcome(job.where.output_uri, previous.blocks_total, previous.blocks_total, previous.seconds)
    if not failed:
        echo(f"[{job.name}] already finished at {job.where.output_uri}: its {len(manifest['files'])} files match "
             "the manifest; nothing to do", flush=True)
        return done
    for problem in failed.values():
        echo(f"[{job.name}] finished, but {problem}", flush=True)
    if not export_repairs(failed, block_files(out, manifest)):
        echo(f"[{job.name}] running the job again to repair it; finished blocks whose shards verify are not "
             "searched again", flush=True)
        return None
    echo(f"[{job.name}] exporting the checkpoint again around the blocks' files", flush=True)
    state = StateFile(out, previous, echo, guard=lock.check)
    with _recorded(state, lock):
        state.update(phase="committing", error=None)
        plan, _ = inspect_model(job)
        with ray_session(address, job) as ray:
            reexport(ray, job, plan, out, manifest, state)
        still = check_output(out)[1]
        if still:
            raise JobFailed(f"the output still fails its manifest after the re-export: {'; '.join(still.values())}")
        state.update(phase="finished")
    return done


def _held_again(job: Job, echo, out, lock: OutputLock, previous: JobState) -> JobOutcome | None:
    """A job the gate held, submitted again (with another gate): when every file it held still matches, the
    gate is checked again on the figures it was held on and the output published, searching and evaluating
    nothing; None when the job must run again (as a resume: finished blocks are not searched again)."""
    held = read_held(out)
    failed = check_files(out, held[0]) if held is not None else {HELD_KEY: "it cannot be read"}
    if failed:
        echo(f"[{job.name}] held by the gate, but {next(iter(failed.values()))}; running the job again "
             "(finished blocks whose files verify are not searched again)", flush=True)
        return None
    files, evaluation, provenance = held
    if job.job_file is not None:
        provenance = {**provenance, "job_file": json.loads(job.job_file)}  # the job file that passed the gate
    state = StateFile(out, previous, echo, guard=lock.check)
    with _recorded(state, lock):
        state.update(phase="committing", error=None)
        _publish_or_hold(job, out, state, files, provenance, evaluation)
        total = previous.blocks_total
        state.update(phase="finished", blocks_done=total, blocks_resumed=total)
    return JobOutcome(job.where.output_uri, previous.blocks_total, previous.blocks_total, previous.seconds, evaluation)


def _publish_or_hold(job: Job, out, state: StateFile, files: dict, provenance: dict, evaluation) -> None:
    """Publish (the manifest, written last) when the evaluation passes the job's gate; otherwise keep what is
    there, record it as held, and fail with the figures against the thresholds (exit 1)."""
    passed, verdict = gate_verdict(job.gate, evaluation)
    if not passed:
        write_held(out, files, evaluation, provenance, verdict)
        state.update(phase="held", error=f"held by the gate: {verdict}")
        raise GateHeld(held_message(job.name, job.where.output_uri, verdict))
    if job.gate.is_set():
        state.echo(f"[{job.name}] the gate passed: {verdict}", flush=True)
    state.check()
    publish(out, job, files, {**provenance, "gate": verdict})
    out.delete(HELD_KEY)


def _calibration_sha256(job: Job) -> str:
    """The digest of the calibration and held-out records the job drew (provenance)."""
    from qvlm.batches import records_for
    from qvlm.records import records_sha256

    calibration, held_out = records_for(job.calibration)
    return records_sha256([*calibration, *held_out])


@dataclass(frozen=True)
class StagesRun:
    """What the stage actors did before they were stopped: the method, the verified block records, the
    held-out evaluation, the checkpoint's files, what each stage used, and the seconds of each phase."""

    method: MethodResult
    records: dict  # block index -> BlockRecord
    evaluation: Evaluation
    checkpoint: dict  # checkpoint file -> {"sha256", "size"}
    stages_info: list[dict]
    seconds: dict


def _run_phases(ray, job: Job, plan: JobPlan, out, state: StateFile) -> JobOutcome:
    t0 = time.perf_counter()
    run = _quantize_on_stages(ray, job, plan, out, state)
    method, seconds = run.method, {**run.seconds, "total": time.perf_counter() - t0}  # total: up to the commit
    result = JobResult(job, plan, method, run.records, seconds, run.stages_info)
    state.check()  # never commit into an output whose lock another run has taken
    files, plan_doc = write_documents(out, result, run.checkpoint, run.evaluation)
    _publish_or_hold(job, out, state, files, build_provenance(job, plan_doc, _calibration_sha256(job)), run.evaluation)
    state.update(phase="finished", blocks_done=len(method.blocks), seconds=dict(seconds))
    return JobOutcome(job.where.output_uri, len(method.blocks), len(method.done), seconds, run.evaluation)


def _verified_records(out, method: MethodResult, plan: JobPlan, state: StateFile) -> dict:
    records = load_finished_blocks(out, method.blocks, plan.units, _files(plan, method.blocks), state.echo)
    missing = [b.index for b in method.blocks if b.index not in records]
    if missing:
        raise JobFailed(f"blocks {missing[:5]} have no verified record after the search; re-submit the job to search them")
    return records


def _quantize_on_stages(ray, job: Job, plan: JobPlan, out, state: StateFile) -> StagesRun:
    """Run the method on a fresh set of stage actors; when one dies (its captures are lost with it), start the
    stages again and capture again, up to ``resources.max_retries`` times. Finished blocks are in the output's
    ledger, so a new attempt searches only what is missing."""
    for attempt in range(1, job.resources.max_retries + 2):
        try:
            return _attempt(ray, job, plan, out, state)
        except ray.exceptions.RayActorError as exc:
            _stage_died(exc, attempt, job, state)


def _attempt(ray, job: Job, plan: JobPlan, out, state: StateFile) -> StagesRun:
    """Start the stages; run the method on them, evaluate the written blocks through them and export the rest of
    the checkpoint from the first; stop them."""
    from cluster.placement import start_stages, stop_stages

    t0 = time.perf_counter()
    stages, pg, stage_info = start_stages(ray, job, plan)
    load_seconds = time.perf_counter() - t0  # stage actors started, each holding its weights
    try:
        _place_captures(ray, stages, stage_info, plan, job)
        pipe = RayPipeline(ray, stages)
        n_batches = ray.get(stages[0].load_batches.remote(job.calibration))
        if not n_batches:
            raise InputError("calibration.samples: calibration produced no batches; give at least one sample")
        method = run_method(pipe, plan.layout, plan.linear_shapes, range(n_batches), job.quant,
                            JobHooks(ray, pipe, plan, job, out, state).hooks())
        sent = ray.get([s.transfer_bytes.remote() for s in stages])  # the method's hand-overs, not the evaluation's
        records = _verified_records(out, method, plan, state)
        clock = time.perf_counter()
        evaluation = evaluate_on_stages(pipe, plan, job, method.blocks, records, state)
        seconds = {"load": load_seconds, **vars(method.seconds), "evaluate": time.perf_counter() - clock}
        state.update(phase="committing", seconds=dict(seconds))
        clock = time.perf_counter()
        checkpoint = export_checkpoint(ray, job, plan.rest_chunks, tuple(records[b.index] for b in method.blocks),
                                       method.schemes, state, stage=stages[0])
        seconds["export"] = time.perf_counter() - clock
        rss = ray.get([s.peak_rss_bytes.remote() for s in stages])
    finally:
        stop_stages(ray, stages, pg)
    info = [{**i, "peak_rss_bytes": r, "weight_bytes": plan.stage_bytes(k), "transfer_bytes": b}
            for k, (i, r, b) in enumerate(zip(stage_info, rss, sent))]
    return StagesRun(method, records, evaluation, checkpoint, info, seconds)


def _place_captures(ray, stages, info: list[dict], plan: JobPlan, job: Job) -> None:
    """Check the plan against the memory the stages found where they run (exit 2 before any capture when a stage
    does not fit) and tell each whether its captures stay on its GPU or go to host memory."""
    gpu = job.resources.gpus_per_worker > 0
    device = min((i["device_memory"] for i in info if i.get("device_memory")), default=None)
    per_node: dict = {}
    for i in info:
        per_node[i["node_id"]] = per_node.get(i["node_id"], 0) + 1
    host = min(i["host_memory"] // per_node[i["node_id"]] for i in info) * len(info)  # a node's stages share it
    fits = check_memory(plan, job.calibration, job.quant, gpu, device, host)
    ray.get([s.keep_captures_on.remote(f.keep_captures) for s, f in zip(stages, fits)])


class JobHooks:
    """What a job adds to the method: progress in the state file, the resume ledger, VEO in the first stage."""

    def __init__(self, ray, pipe: RayPipeline, plan: JobPlan, job: Job, out, state: StateFile):
        self.ray, self.pipe, self.plan, self.job, self.out, self.state = ray, pipe, plan, job, out, state
        self.veo: VeoOutcome | None = None
        self.phase, self.started, self.n_blocks, self.n_done = "", time.perf_counter(), 0, 0

    def hooks(self) -> Hooks:
        return Hooks(tune_vision=self.tune_vision, finished=self.finished, progress=self.progress)

    def tune_vision(self, schemes: dict, bits: dict, deps: list) -> VeoOutcome:
        self.veo = tune_vision_encoder(self.ray, self.pipe, self.plan, self.job, self.out, schemes, bits, deps,
                                       lambda done, total: self.progress("tuning", done, total))
        return self.veo

    def finished(self, blocks) -> set[int]:
        """Once the blocks are known: tell the stages how the checkpoint's files are numbered, put the VEO-tuned
        tower in place as its block, and name the blocks an earlier run finished (their records verify)."""
        stages = self.pipe.actors
        self.ray.get([s.set_files.remote(self.plan.n_files(len(blocks))) for s in stages])
        if self.veo is not None:
            vision = {b.index: [self.plan.units[i].name for i in b.units] for b in blocks
                      if self.plan.units[b.units[0]].segment == "vision"}
            self.ray.get(stages[0].adopt_tower.remote(self.veo.record.block, vision, self.job.quant.activations))
        self.n_blocks, done = len(blocks), load_finished_blocks(self.out, blocks, self.plan.units,
                                                                 _files(self.plan, blocks), self.state.echo)
        self.n_done = len(done)
        return set(done)

    def progress(self, phase: str, done: int, total: int) -> None:
        """The method's steps as the state file counts them (VEO: statistics until its training steps start)."""
        phase = "statistics" if phase == "veo" else phase
        now, state = time.perf_counter(), self.state
        if phase != self.phase:
            self.phase, self.started = phase, now
        if phase in ("capturing", "tuning"):
            state.update(phase=phase, steps_done=done, steps_total=total, steps_seconds=now - self.started)
        elif phase == "searching":
            state.update(phase=phase, blocks_total=self.n_blocks, blocks_resumed=self.n_done,
                         blocks_done=self.n_done + done, seconds={**state.state.seconds, "search_elapsed": now - self.started})
        elif phase != state.state.phase:
            state.update(phase=phase)


def _files(plan: JobPlan, blocks):
    """The checkpoint file of each block, by block index."""
    return lambda index: file_name(index, plan.n_files(len(blocks)))


def _stage_died(exc: Exception, attempt: int, job: Job, state: StateFile) -> None:
    """A stage actor died: say so and try again, or give up after ``resources.max_retries`` new attempts."""
    attempts = job.resources.max_retries + 1
    cause = one_line(exc)
    if attempt >= attempts:
        raise JobFailed(f"a stage worker died during {state.state.phase} in each of {attempts} attempts (last: {cause}); "
                       "the blocks it finished are kept in the output; re-submit the job to go on, "
                       "or raise resources.max_retries") from exc
    state.echo(f"[{job.name}] a stage worker died during {state.state.phase} ({cause}); starting the stages again "
               f"(attempt {attempt + 1} of {attempts}); finished blocks are kept", flush=True)
