"""Command line: ``qvlm-submit JOB.yaml`` and ``qvlm plan|status|logs|cancel|list|submit``.

Commands parse, then call library functions. Exit codes: 0 done, 1 job failed, 2 invalid job file or
input, 3 cluster unreachable, 4 storage error, 130 stopped by SIGINT, 143 by SIGTERM. Tracebacks only with
``--debug``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, List, Optional

import typer

from jobs.errors import InputError, QvlmError, StorageError
from jobs.progress import job_log_path, line_by_line, progress_printer, stderr_to
from jobs.spec import JobSpec, load_job

app = typer.Typer(add_completion=False, no_args_is_help=True, help="qvlm: quantize vision-language models on Ray.")
SetOption = typer.Option(None, "--set", help="Override a job field: dotted.path=value (repeatable).")
AddressOption = typer.Option(None, "--address", envvar="RAY_ADDRESS", help="Ray dashboard address, e.g. http://head:8265 (submit through the Jobs API); "
                                   "with a Ray address (auto, HOST:6379) qvlm-submit drives the job from this process.")
DebugOption = typer.Option(False, "--debug", help="Print full tracebacks.")
EndpointOption = typer.Option(None, "--endpoint-url", help="S3 endpoint of an s3:// TARGET (default: AWS_ENDPOINT_URL_S3, "
                              "AWS_ENDPOINT_URL, else AWS).")


def _fail(message: str, code: int) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def guarded(fn: Callable, debug: bool):
    """Run a command body, turning the project's errors into one line and a stable exit code."""
    try:
        return fn()
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        from cluster import stopping

        _fail(f"stopped by {stopping.received()}", stopping.exit_code())
    except Exception as exc:  # noqa: BLE001 - every error becomes one line and an exit code
        if debug:
            traceback.print_exc()
        from workers.storage import redact

        cause = _cause(exc)
        _fail(redact(str(cause) or type(cause).__name__), _exit_code(cause))  # no secret reaches the terminal


def _cause(exc: Exception) -> BaseException:
    """The error a Ray worker raised, without the remote traceback Ray's wrapper puts in its message."""
    while type(exc).__name__.startswith("RayTaskError") and isinstance(getattr(exc, "cause", None), Exception):
        exc = exc.cause
    return exc


def _exit_code(exc: BaseException) -> int:
    from cluster.driver import JobError
    from cluster.state import StateError
    from qvlm.calibration import CalibrationError
    from qvlm.loading import ModelError
    from workers.safetensors_reader import CheckpointError
    from workers.storage import StorageError as WorkerStorageError
    from workers.storage import UnsafePath

    if isinstance(exc, (QvlmError, JobError, StateError)):
        return exc.exit_code
    if isinstance(exc, (CalibrationError, ModelError, CheckpointError, UnsafePath)):
        return InputError.exit_code
    if isinstance(exc, WorkerStorageError):
        return StorageError.exit_code
    return 1


def settings_from_spec(spec: JobSpec):
    from cluster.settings import JobSettings
    from qvlm.batches import CalibrationSettings

    cal = spec.calibration
    return JobSettings(
        name=spec.name, spec_hash=spec.spec_hash(), model_uri=str(spec.model.path), output_uri=str(spec.output.uri),
        calibration=CalibrationSettings(cal.data, cal.samples, cal.eval_samples, cal.max_length, cal.batch_size, cal.seed),
        quant=spec.to_quant_config(), model_endpoint=getattr(spec.model, "endpoint_url", None) or spec.output.endpoint_url,
        output_endpoint=spec.output.endpoint_url, overwrite=spec.output.overwrite, workers=spec.resources.workers,
        gpus_per_worker=spec.resources.gpus_per_worker, cpus_per_worker=spec.resources.cpus_per_worker,
        max_retries=spec.resources.max_retries, placement=spec.resources.placement,
    )


def check_inputs(settings, local_run: bool = False):
    """Everything about the inputs that can be checked before any cluster work, without loading weights:
    the model folder, its config and safetensors headers, the output location, the calibration size against
    memory, the calibration records and their batches, and group sizes against the layers. Each problem is
    one line naming the field or file; nothing is written. ``local_run``: the stage workers will run on this
    host (an embedded local Ray), so the captured activations must fit in its memory. Returns the job's plan."""
    from cluster.driver import inspect_model

    _check_model_path(settings.model_uri)
    _check_output_apart_from_images(settings)
    with _storage_problem("output.uri"):
        _check_output(settings)
    with _storage_problem("model.path"):
        plan, config_dir = inspect_model(settings)
    _check_group_sizes(plan, settings.quant)
    _check_calibration_size(plan, settings.calibration, local_run)
    records = _calibration_records(settings)
    _check_records_reach_units(plan, records)
    _check_veo(plan, settings.quant)
    _check_batches(config_dir, records, settings)
    return plan


def _check_group_sizes(plan, quant) -> None:
    for name, (_, in_features) in plan.linear_shapes.items():
        try:
            quant.weights.groups(in_features)
        except ValueError as exc:
            raise InputError(f"quantization.weights.group_size: {exc} (layer {name})") from None


def _check_calibration_size(plan, cal, local_run: bool) -> None:
    """The calibration data must fit in memory before a single record is built: every record and batch is
    built on this host, and in a local run the stage workers capture every unit's activations here too."""
    from cluster.plan import calibration_bytes, host_memory, samples_that_fit

    memory = host_memory()
    need = calibration_bytes(plan, cal.samples, cal.eval_samples, cal.max_length, local_run)
    if need <= memory:
        return
    fit = samples_that_fit(plan, cal.eval_samples, cal.max_length, memory, local_run)
    what = ("the records, their batches and the captured activations of every stage worker (fp32, each unit's "
            "input and output)" if local_run else "the records and their batches")
    raise InputError(f"calibration.samples: {cal.samples} samples of up to {cal.max_length} tokens (plus "
                     f"{cal.eval_samples} held out) need about {need / 2**30:.1f} GiB for {what}, more than this "
                     f"host's {memory / 2**30:.1f} GiB; at most {fit} samples fit: lower calibration.samples "
                     "(or calibration.max_length)")


def _calibration_records(settings):
    from qvlm.batches import records_for
    from qvlm.calibration import CalibrationError

    try:
        return records_for(settings.calibration)
    except CalibrationError as exc:
        raise InputError(f"calibration.data: {exc}") from exc


def _check_records_reach_units(plan, records) -> None:
    """Units of the vision tower and the projector see only images: text-only records leave them uncaptured."""
    from cluster.plan import image_units

    needing = image_units(plan)
    calibration = records[0]
    if needing and not any(r.image is not None for r in calibration):
        segments = sorted({u.segment for u in needing})
        raise InputError(f"calibration.data: none of the {len(calibration)} calibration records has an image, but "
                         f"quantization.targets quantizes the {' and '.join(segments)} units of this "
                         f"{plan.model_class} ({len(needing)} units), which only images reach; give the records "
                         f"an \"image\", or drop {' and '.join(segments)} from quantization.targets")


def _check_output_apart_from_images(settings) -> None:
    """The output must not be, or hold, an image the calibration records use (overwrite could delete it)."""
    from qvlm.calibration import image_files

    from jobs.spec import output_meets

    for image in image_files(settings.calibration.data):
        how = output_meets(settings.output_uri, str(image))
        if how in ("is", "contains"):
            raise InputError(f"output.uri: {settings.output_uri} {how} the image {image} that calibration.data "
                             f"uses; write the output where it holds none of the job's inputs")


def _check_veo(plan, quant) -> None:
    from workers.veo_task import VEO_MAX_BYTES

    if not quant.veo.enabled:
        return
    if not any(u.segment == "vision" for u in plan.units):
        raise InputError(f"quantization.qvlm.veo.enabled: the model ({plan.model_class}) has no vision tower "
                         "among its quantized units; turn veo off")
    if plan.total_bytes > VEO_MAX_BYTES:
        raise InputError(f"quantization.qvlm.veo.enabled: VEO runs in one worker that holds the whole model, and this "
                         f"model has {plan.total_bytes / 2**30:.1f} GiB of tensors (limit {VEO_MAX_BYTES / 2**30:.0f} GiB); "
                         "turn veo off for this model")


@contextmanager
def _storage_problem(field: str):
    """Storage errors met while checking a job's inputs are input errors about ``field`` (a missing bucket,
    no credentials, a corrupt checkpoint)."""
    from workers.storage import StorageError as WorkerStorageError

    try:
        yield
    except WorkerStorageError as exc:
        raise InputError(f"{field}: {exc}") from exc


def _check_model_path(uri: str) -> None:
    if uri.startswith("s3://"):
        return
    path = Path(uri)
    if "/" in uri and not uri.startswith(("/", ".")) and not path.exists():
        raise InputError(f"model.path: {uri} is not a local directory or s3:// prefix; "
                         "download hub models first (huggingface-cli download NAME --local-dir DIR)")
    if not path.exists():
        raise InputError(f"model.path: directory {uri} does not exist; fix the path (relative paths resolve "
                         "against the job file's folder)")
    if not path.is_dir():
        raise InputError(f"model.path: {uri} is a file, not a model folder; point it at the folder that holds "
                         "config.json and the safetensors files")


def _check_output(settings) -> None:
    """The output is a folder or S3 prefix we can read (a missing bucket or credentials fail here) and write,
    holding no file qvlm did not write, and empty or holding this job unless ``output.overwrite`` (the rule of
    cluster/output.py, which the driver checks again under its lock). Read-only."""
    from cluster.output import OutputRefused, claim_output
    from workers.storage import open_storage

    uri = settings.output_uri
    if not uri.startswith("s3://"):
        _check_local_output(Path(uri))
    try:
        claim_output(open_storage(uri, settings.output_endpoint), uri, settings.spec_hash, settings.overwrite)
    except OutputRefused as exc:
        raise InputError(str(exc)) from None


def _check_local_output(path: Path) -> None:
    """A local output is a folder, or can be made one: its nearest existing folder above is writable."""
    if path.is_symlink() and not path.exists():
        raise InputError(f"output.uri: {path} is a symbolic link to nothing; remove it or choose another output.uri")
    if path.exists() and not path.is_dir():
        raise InputError(f"output.uri: {path} is a file; give a folder (it is created if missing)")
    existing = next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())
    if not existing.is_dir():
        raise InputError(f"output.uri: {existing} is a file, so {path} cannot be created below it; give a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "a read-only file system" if os.statvfs(existing).f_flag & os.ST_RDONLY else "this user may not write there"
        raise InputError(f"output.uri: cannot write in {existing} ({why}); choose an output.uri where this user can "
                         "write")


def _check_batches(config_dir: Path, records, settings) -> None:
    """Build the calibration and held-out batches as the stages will (image tokens against max_length,
    records with and without images in one batch, a vision encoder given text-only records)."""
    from qvlm.batches import load_preprocessor, make_batches_of

    try:
        kind, preprocessor = load_preprocessor(config_dir)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"model.path: cannot load the tokenizer or processor of {settings.model_uri} ({first}); "
                         "copy the tokenizer and processor files saved with the model into that folder") from None
    for part in records:
        if part:
            make_batches_of(kind, preprocessor, part, settings.calibration)


def warn_remote_code(spec: JobSpec) -> None:
    """Say loudly, before anything else, that the job file turned trust_remote_code on."""
    if spec.model.trust_remote_code:
        typer.secho("WARNING: trust_remote_code is ON (model.trust_remote_code: true in the job file). Code shipped "
                    "with a model can do anything your account can; qvlm still builds only model classes that ship "
                    "with transformers and never runs a model's own code. Turn it off unless you need it.",
                    fg="yellow", bold=True, err=True)


@app.command()
def plan(job: Path, set_: Optional[List[str]] = SetOption, debug: bool = DebugOption):
    """Print the plan of a job without running it: units, stages, memory per worker, bytes."""

    def body():
        from cluster.plan import describe

        spec = load_job(job, set_ or [])
        warn_remote_code(spec)
        settings = settings_from_spec(spec)
        job_plan = check_inputs(settings)
        cal = settings.calibration
        for line in describe(job_plan, settings.quant, settings.placement, cal.samples, cal.max_length):
            typer.echo(line)

    guarded(body, debug)


@app.command()
def submit(job: Path, address: Optional[str] = AddressOption, dry_run: bool = typer.Option(False, "--dry-run"),
           no_wait: bool = typer.Option(False, "--no-wait"), set_: Optional[List[str]] = SetOption,
           debug: bool = DebugOption):
    """Run a job: on the cluster at --address / RAY_ADDRESS, else on an embedded local Ray."""
    if dry_run:
        plan(job, set_, debug)
        typer.echo("dry run: nothing was submitted")
        return

    def body():
        from cluster.stopping import stop_on_signals
        from jobs.remote import is_jobs_api, submit_remote

        line_by_line()
        spec = load_job(job, set_ or [])
        warn_remote_code(spec)
        settings = settings_from_spec(spec)
        check_inputs(settings, local_run=not address)
        with stop_on_signals():
            if address and is_jobs_api(address):
                return submit_remote(address, spec, settings, wait=not no_wait)
            run_here(settings, address or None)

    guarded(body, debug)


def run_here(settings, address: str | None) -> None:
    """This process is the driver: of an embedded local Ray (no address), or connected to the cluster at a Ray
    address (auto, HOST:6379; what RAY_ADDRESS holds inside a KubeRay RayJob or `ray job submit`). Ray's own
    output goes to the job's log file, named first."""
    from cluster.driver import run_job

    echo = progress_printer(sys.stdout.isatty())
    log = job_log_path(settings.name)
    echo(f"[{settings.name}] log of this run (Ray's own messages): {log}")
    with stderr_to(log):
        outcome = run_job(settings, address=address, echo=echo)
    typer.echo(f"done: {outcome.blocks} blocks ({outcome.blocks_resumed} resumed) -> {outcome.output_uri}")
    typer.echo(evaluation_line(outcome.evaluation))


def _is_output(target: str) -> bool:
    return "://" in target or Path(target).exists() or target.startswith(("/", "."))


@app.command()
def status(target: str, address: Optional[str] = AddressOption, endpoint_url: Optional[str] = EndpointOption,
           debug: bool = DebugOption):
    """Where a job stands: TARGET is an output URI (works with no cluster) or a Ray job id. Exits 1 when the
    job failed or stopped (a run killed or cancelled)."""

    def body():
        if _is_output(target):
            from cluster.status import output_status
            from workers.storage import open_storage

            found = output_status(open_storage(target, endpoint_url))
            if found is None:
                raise InputError(f"{target} holds no qvlm job state (_qvlm/state.json)")
            lines, code = [found.line], found.exit_code
        else:
            from jobs.remote import remote_status

            lines, code = remote_status(address, target, endpoint_url)
        for line in lines:
            typer.echo(line)
        if code:
            raise typer.Exit(code)

    guarded(body, debug)


@app.command()
def logs(job_id: str, address: Optional[str] = AddressOption,
         follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing the log as it grows until the job "
                                     "ends; exit 1 unless it succeeded."),
         debug: bool = DebugOption):
    """Print a submitted job's driver log."""

    def body():
        from jobs.remote import remote_logs

        text = remote_logs(address, job_id, follow_job=follow)
        if text:
            typer.echo(text)

    guarded(body, debug)


@app.command()
def cancel(job_id: str, address: Optional[str] = AddressOption, debug: bool = DebugOption):
    """Stop a submitted job."""

    def body():
        from jobs.remote import remote_cancel

        typer.echo(remote_cancel(address, job_id))

    guarded(body, debug)


@app.command("list")
def list_jobs(address: Optional[str] = AddressOption, debug: bool = DebugOption):
    """List the qvlm jobs the cluster knows."""

    def body():
        from jobs.remote import remote_list

        for line in remote_list(address):
            typer.echo(line)

    guarded(body, debug)


def evaluation_line(evaluation: dict | None) -> str:
    if not evaluation:
        return "evaluation: none"
    if "skipped" in evaluation:
        return f"evaluation: skipped ({evaluation['skipped']})"
    line = (f"evaluation on {evaluation['tokens']} held-out positions: mean KL {evaluation['kl_mean']:.4g} nats, "
            f"top-1 agreement {evaluation['top1_agreement']:.1%}")
    if evaluation.get("questions"):
        line += f", answer accuracy FP {evaluation['fp_accuracy']:.1%} vs quantized {evaluation['q_accuracy']:.1%}"
    return line


@app.command()
def verify(target: str, endpoint_url: Optional[str] = EndpointOption, debug: bool = DebugOption):
    """Check an output against its manifest (every file's size and sha256); exit 1 on any problem."""

    def body():
        from cluster.verify import verify_output
        from workers.storage import open_storage

        problems = verify_output(open_storage(target, endpoint_url))
        for p in problems:
            typer.echo(p)
        if problems:
            raise typer.Exit(1)
        typer.echo(f"{target}: every file matches its manifest")

    guarded(body, debug)


@app.command("schema", hidden=False)
def schema():
    """Print the job file's JSON schema (for editors)."""
    from jobs.spec import job_json_schema

    typer.echo(json.dumps(job_json_schema(), indent=1))


def main() -> None:
    app()


def submit_main() -> None:
    """``qvlm-submit`` is ``qvlm submit``."""
    sys.argv = [sys.argv[0], "submit", *sys.argv[1:]]
    app()


if __name__ == "__main__":
    main()
