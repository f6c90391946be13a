"""Submitting to, and asking about, a Ray cluster through its Jobs API (``--address http://head:8265``)."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from urllib.parse import urlparse

from qvlm.errors import ClusterError, JobFailed
from cluster.provenance import COMMIT_ENV, source_commit

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def is_jobs_api(address: str) -> bool:
    """An http(s) dashboard URL (the Jobs API); anything else (auto, HOST:6379) is a Ray address to attach to."""
    return address.startswith(("http://", "https://"))


def _client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    if not address:
        raise ClusterError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - any connection failure means the same thing to the user
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {exc}") from None


def entrypoint_for(spec) -> str:
    """The driver command; the validated spec travels inside it, so no file has to exist on the cluster."""
    blob = base64.b64encode(json.dumps(spec.model_dump(mode="json")).encode()).decode()
    return f"python -m jobs.entry {blob}"


def submission_metadata(job) -> dict[str, str]:
    """What ``qvlm status JOB_ID`` needs to find the job's state: its output (and endpoint, unless it carries
    credentials)."""
    meta = {"qvlm": job.name, "output": job.where.output_uri}
    endpoint = job.where.output_endpoint
    if endpoint and urlparse(endpoint).username is None and urlparse(endpoint).password is None:
        meta["output_endpoint"] = endpoint
    return meta


def submit_remote(address: str, spec, job, wait: bool = True) -> None:
    client = _client(address)
    runtime_env = {"working_dir": str(PROJECT_ROOT), "excludes": ["/.venv", "/out", "/models", "/.git"]}
    commit = source_commit()  # the code travels without .git: its commit goes with it for the provenance
    if commit:
        runtime_env["env_vars"] = {COMMIT_ENV: commit}
    try:
        job_id = client.submit_job(entrypoint=entrypoint_for(spec), runtime_env=runtime_env,
                                   submission_id=job.submission_id, metadata=submission_metadata(job))
    except RuntimeError as exc:
        if "already exists" not in str(exc):
            raise ClusterError(f"submission to {address} failed: {exc}") from None
        job_id = job.submission_id
        print(f"{job_id} was already submitted; following it", flush=True)
    print(f"submitted {job_id} to {address}", flush=True)
    if not wait:
        print(f"follow it with `qvlm logs --follow {job_id}`, stop it with `qvlm cancel {job_id}`", flush=True)
        return
    try:
        follow(client, job_id)
    except KeyboardInterrupt:
        _stop_followed(client, job_id)
        raise


def _stop_followed(client, job_id: str, wait_s: float = 30.0) -> None:
    """qvlm-submit was stopped while following: stop the job too, and wait (a while) until the cluster says so,
    so that the driver has recorded "stopped" and released the output's lock when this command exits."""
    print(f"\nstopping {job_id} on the cluster", flush=True)
    client.stop_job(job_id)
    deadline = time.monotonic() + wait_s
    while _status(client, job_id) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(1)
    print(f"{job_id}: {_status(client, job_id)}", flush=True)


def _status(client, job_id: str) -> str:
    return str(client.get_job_status(job_id)).split(".")[-1]


def follow(client, job_id: str, poll_s: float = 2.0) -> None:
    """Print the driver's log as it grows until the job ends; a job that did not succeed raises JobFailed."""
    seen = 0
    while True:
        status = _status(client, job_id)  # before the logs, so that the last lines are printed before it ends
        lines = client.get_job_logs(job_id).splitlines()
        for line in lines[seen:]:
            print(line, flush=True)
        seen = len(lines)
        if status in TERMINAL:
            if status != "SUCCEEDED":
                last = (client.get_job_info(job_id).message or "").strip().splitlines()[-1:]
                raise JobFailed(f"job {job_id} ended {status}" + (f" ({last[0]})" if last else "")
                                + f"; see `qvlm logs {job_id}`")
            return
        time.sleep(poll_s)


def remote_status(address: str | None, job_id: str, endpoint_url: str | None = None) -> tuple[list[str], int]:
    """Ray's view of the job and the job's own (its phase and progress); exit code 1 for FAILED or STOPPED."""
    client = _client(address)
    info = client.get_job_info(job_id)
    status = str(info.status).split(".")[-1]
    lines = [f"{job_id}: {status}" + (f" - {info.message}" if info.message else "")]
    progress = _output_progress(info.metadata or {}, endpoint_url) or _logged_progress(client, job_id)
    if progress:
        lines.append(progress)
    return lines, 1 if status in ("FAILED", "STOPPED") else 0


def _output_progress(meta: dict, endpoint_url: str | None) -> str | None:
    """The job's state line, read from the output its submission named (None when it cannot be read here)."""
    from cluster.status import output_status
    from workers.storage import StorageError, open_storage

    if not meta.get("output"):
        return None
    try:
        status = output_status(open_storage(meta["output"], endpoint_url or meta.get("output_endpoint")))
    except (StorageError, ValueError):
        return None
    return status.line if status is not None else None


def _logged_progress(client, job_id: str) -> str | None:
    """The last progress line in the driver's log."""
    from jobs.progress import is_state_line

    lines = [line for line in client.get_job_logs(job_id).splitlines() if is_state_line(line)]
    return lines[-1] if lines else None


def remote_logs(address: str | None, job_id: str, follow_job: bool = False) -> str:
    """The driver's log; with ``follow_job``, printed as it grows until the job ends (JobFailed unless it
    succeeded) and nothing is returned."""
    client = _client(address)
    if not follow_job:
        return client.get_job_logs(job_id)
    follow(client, job_id)
    return ""


def remote_cancel(address: str | None, job_id: str) -> str:
    stopped = _client(address).stop_job(job_id)
    return f"{job_id}: {'stop requested' if stopped else 'not running'}"


LIST_HEADER = "JOB ID\tSTATUS\tNAME\tOUTPUT"


def remote_list(address: str | None) -> list[str]:
    jobs = _client(address).list_jobs()
    rows = [f"{j.submission_id}\t{str(j.status).split('.')[-1]}\t{(j.metadata or {}).get('qvlm', '')}\t"
            f"{(j.metadata or {}).get('output', '')}" for j in jobs if (j.submission_id or "").startswith("qvlm-")]
    return [LIST_HEADER, *rows]
