"""Command line: ``qvlm-submit JOB.yaml`` and ``qvlm plan|status|logs|cancel|list|submit``.

Commands parse, then call library functions. Exit codes: 0 done, 1 job failed, 2 invalid job file or
input, 3 cluster unreachable, 4 storage error, 130 stopped by SIGINT, 143 by SIGTERM. Tracebacks only with
``--debug``.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Callable, List, Optional

import typer

from qvlm.errors import InputError, exit_code
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

        from cluster.failures import root_cause

        cause = root_cause(exc)
        _fail(redact(str(cause) or type(cause).__name__), exit_code(cause))  # no secret reaches the terminal


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
        from cluster.validate import validate

        spec = load_job(job, set_ or [])
        warn_remote_code(spec)
        compiled = spec.compile()
        job_plan = validate(compiled)
        cal = compiled.calibration
        for line in describe(job_plan, compiled.quant, compiled.resources.placement, cal.samples, cal.max_length,
                             cal.batch_size):
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
        from cluster.validate import validate
        from jobs.remote import is_jobs_api, submit_remote

        line_by_line()
        spec = load_job(job, set_ or [])
        warn_remote_code(spec)
        compiled = spec.compile()
        job_plan = validate(compiled, local_run=not address)
        with stop_on_signals():
            if address and is_jobs_api(address):
                return submit_remote(address, spec, compiled, wait=not no_wait)
            run_here(compiled, job_plan, address or None)

    guarded(body, debug)


def run_here(job, plan, address: str | None) -> None:
    """This process is the driver: of an embedded local Ray (no address), or connected to the cluster at a Ray
    address (auto, HOST:6379; what RAY_ADDRESS holds inside a KubeRay RayJob or `ray job submit`). Ray's own
    output goes to the job's log file, named first."""
    from cluster.driver import run_job
    from qvlm.evaluate import evaluation_line

    echo = progress_printer(sys.stdout.isatty())
    log = job_log_path(job.name)
    echo(f"[{job.name}] log of this run (Ray's own messages): {log}")
    with stderr_to(log):
        outcome = run_job(job, plan, address=address, echo=echo)
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


@app.command()
def verify(target: str, endpoint_url: Optional[str] = EndpointOption,
           layers: bool = typer.Option(False, "--layers", help="Also print each quantized layer's provenance."),
           debug: bool = DebugOption):
    """Check an output against its manifest (every file's size and sha256, and the provenance) and print the
    provenance; exit 1 on any problem."""

    def body():
        from cluster.provenance import provenance_lines
        from cluster.verify import verify_report
        from workers.storage import open_storage

        manifest, problems = verify_report(open_storage(target, endpoint_url))
        for p in problems:
            typer.echo(p)
        if problems:
            raise typer.Exit(1)
        typer.echo(f"{target}: every file matches its manifest")
        for line in provenance_lines(manifest, layers):
            typer.echo(line)

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
