"""Submitting to, and asking about, a Ray cluster through its Jobs API (``--address http://head:8265``)."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

from jobs.errors import ClusterError, JobFailed

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


def submit_remote(address: str, spec, settings, wait: bool = True) -> None:
    client = _client(address)
    runtime_env = {"working_dir": str(PROJECT_ROOT), "excludes": ["/.venv", "/out", "/models", "/.git"]}
    try:
        job_id = client.submit_job(entrypoint=entrypoint_for(spec), runtime_env=runtime_env,
                                   submission_id=settings.submission_id, metadata={"qvlm": settings.name})
    except RuntimeError as exc:
        if "already exists" not in str(exc):
            raise ClusterError(f"submission to {address} failed: {exc}") from None
        job_id = settings.submission_id
        print(f"{job_id} was already submitted; following it", flush=True)
    print(f"submitted {job_id} to {address}", flush=True)
    if not wait:
        print(f"follow it with `qvlm logs {job_id}`, stop it with `qvlm cancel {job_id}`", flush=True)
        return
    try:
        follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; {job_id} keeps running on the cluster (`qvlm cancel {job_id}` stops it)",
              flush=True)
        raise


def follow(client, job_id: str, poll_s: float = 2.0) -> None:
    """Stream the driver's progress lines until the job ends; a failed job exits 1."""
    seen = 0
    while True:
        logs = client.get_job_logs(job_id)
        for line in logs.splitlines()[seen:]:
            print(line, flush=True)
        seen = len(logs.splitlines())
        status = str(client.get_job_status(job_id)).split(".")[-1]
        if status in TERMINAL:
            if status != "SUCCEEDED":
                last = (client.get_job_info(job_id).message or "").strip().splitlines()[-1:]
                raise JobFailed(f"job {job_id} ended {status}" + (f" ({last[0]})" if last else "")
                                + f"; see `qvlm logs {job_id}`")
            return
        time.sleep(poll_s)


def remote_status(address: str | None, job_id: str) -> str:
    info = _client(address).get_job_info(job_id)
    return f"{job_id}: {str(info.status).split('.')[-1]}" + (f" - {info.message}" if info.message else "")


def remote_logs(address: str | None, job_id: str) -> str:
    return _client(address).get_job_logs(job_id)


def remote_cancel(address: str | None, job_id: str) -> str:
    stopped = _client(address).stop_job(job_id)
    return f"{job_id}: {'stop requested' if stopped else 'not running'}"


def remote_list(address: str | None) -> list[str]:
    jobs = _client(address).list_jobs()
    return [f"{j.submission_id}\t{str(j.status).split('.')[-1]}\t{(j.metadata or {}).get('qvlm', '')}"
            for j in jobs if (j.submission_id or "").startswith("qvlm-")]
