"""A real two-node Ray cluster on loopback, driven only through the command line a cluster user has:
``qvlm-submit --address http://HEAD:8265``, ``qvlm status|logs|cancel``.

The cluster is two ``ray start --block`` processes (a head and a worker node), each in its own process
group and its own temp folder, so they never touch another Ray on the machine; teardown kills the two
process groups and never runs a broad ``ray stop``. Both nodes share this machine's file system, as nodes
on a cluster share S3: the model is read from S3 (moto on 127.0.0.1) with ranged reads, the output is a
local folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.s3_server import FAKE_ENV

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_env(s3_endpoint: str) -> dict:
    """One auth mode for server and client (disabled: loopback only), the fake AWS credentials the workers
    need, and this venv first on PATH, as the cluster image's Python is on a real node's PATH (the job's
    entrypoint runs ``python -m jobs.entry``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(FAKE_ENV)
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def _kill_group(proc: subprocess.Popen, grace_s: float = 8) -> None:
    """SIGTERM the process group (ray start, raylet, GCS, dashboard, workers), then SIGKILL what is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader, or the group never looks empty
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


class Cluster:
    def __init__(self, dashboard: str, env: dict, procs: list, temp_dirs: list):
        self.dashboard, self.env, self.procs, self.temp_dirs = dashboard, env, procs, temp_dirs

    def qvlm(self, *args: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
        exe = BIN / ("qvlm-submit" if args[0] == "submit" else "qvlm")
        argv = [str(exe), *(args[1:] if args[0] == "submit" else args)]
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT)

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard)

    def status(self, job_id: str) -> str:
        return str(self.client().get_job_status(job_id)).split(".")[-1]


def _wait_ready(dashboard: str, procs: list, nodes: int) -> None:
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_nodes

    deadline, last = time.monotonic() + START_TIMEOUT_S, None
    while time.monotonic() < deadline:
        dead = [p.args for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"ray start exited early: {dead}")
        try:
            JobSubmissionClient(dashboard).list_jobs()
            alive = [n for n in list_nodes(address=dashboard) if n.state == "ALIVE"]
            if len(alive) >= nodes:
                return
            last = f"{len(alive)} of {nodes} nodes alive"
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = repr(exc)
        time.sleep(1)
    raise RuntimeError(f"the loopback cluster did not come up in {START_TIMEOUT_S}s: {last}")


@pytest.fixture(scope="module")
def cluster(s3_server):
    env = _cluster_env(s3_server)
    gcs, dash = _free_port(), _free_port()
    temp_dirs = [tempfile.mkdtemp(prefix="qvlm-ray-", dir="/tmp") for _ in range(2)]  # short: socket paths
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--object-store-memory", str(150 * 2**20),
              "--disable-usage-stats", "--block"]
    head = [str(BIN / "ray"), "start", "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dash), "--ray-client-server-port", str(_free_port()),
            "--dashboard-agent-listen-port", str(_free_port()), "--resources", '{"head_node": 1}',
            "--temp-dir", temp_dirs[0], *common]
    worker = [str(BIN / "ray"), "start", "--address", f"127.0.0.1:{gcs}", "--resources", '{"worker_node": 1}',
              "--dashboard-agent-listen-port", str(_free_port()), "--temp-dir", temp_dirs[1], *common]
    procs, logs = [], []
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    os.environ["RAY_AUTH_MODE"] = "disabled"  # the test's own JobSubmissionClient
    os.environ.pop("RAY_ADDRESS", None)
    try:
        for i, argv in enumerate((head, worker)):
            logs.append(open(Path(temp_dirs[i]) / "ray-start.log", "w"))
            procs.append(subprocess.Popen(argv, env=env, stdout=logs[-1], stderr=subprocess.STDOUT,
                                          start_new_session=True))
            if i == 0:
                time.sleep(3)  # let the GCS come up before the worker joins
        dashboard = f"http://127.0.0.1:{dash}"
        try:
            _wait_ready(dashboard, procs, nodes=2)
        except RuntimeError as exc:
            tails = [Path(d, "ray-start.log").read_text()[-2000:] for d in temp_dirs]
            raise RuntimeError(f"{exc}\n" + "\n---\n".join(tails)) from None
        yield Cluster(dashboard, env, procs, temp_dirs)
    finally:
        for proc in reversed(procs):
            _kill_group(proc)
        for f in logs:
            f.close()
        for d in temp_dirs:
            shutil.rmtree(d, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def s3_model(s3_server, tmp_path_factory):
    """The tiny LLaVA written by the command line, uploaded to s3://BUCKET/models/tiny/."""
    import uuid

    import boto3

    local = tmp_path_factory.mktemp("cluster-model") / "tiny"
    subprocess.run([sys.executable, "-m", "qvlm.tiny", "llava", str(local)], check=True, capture_output=True,
                   timeout=180, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    bucket = f"qvlm-cluster-{uuid.uuid4().hex[:10]}"
    s3 = boto3.session.Session().client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    for path in sorted(local.iterdir()):
        s3.upload_file(str(path), bucket, f"models/tiny/{path.name}")
    return f"s3://{bucket}/models/tiny", local


def _job_file(folder: Path, name: str, model_uri: str, endpoint: str, output: Path, iters: int | None = None) -> Path:
    job = {
        "name": name,
        "model": {"path": model_uri},
        "calibration": {"data": "builtin:shapes", "samples": 8, "eval_samples": 4, "max_length": 64, "batch_size": 4},
        "quantization": {"qvlm": {"epochs": 1, **({"iters": iters} if iters else {})}},
        "output": {"uri": str(output), "endpoint_url": endpoint},
        "resources": {"workers": 2, "placement": "spread"},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _job_id(output: str) -> str:
    match = re.search(r"submitted (qvlm-\S+) to", output)
    assert match, output
    return match.group(1)


@pytest.fixture(scope="module")
def finished_job(cluster, s3_model, s3_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster-job")
    out = folder / "out"
    job = _job_file(folder, "loopback", s3_model[0], s3_server, out)
    t0 = time.monotonic()
    result = cluster.qvlm("submit", "--address", cluster.dashboard, str(job), timeout=JOB_TIMEOUT_S)
    seconds = time.monotonic() - t0
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    print(f"loopback job took {seconds:.0f}s")
    return _job_id(result.stdout), out, result.stdout


@pytest.mark.timeout(900)
def test_job_submitted_with_the_cli_finishes_on_two_nodes(cluster, finished_job):
    job_id, out, stdout = finished_job
    assert "done:" in stdout  # the driver's lines reach the submitting terminal
    status = cluster.qvlm("status", str(out))
    assert status.returncode == 0 and "finished" in status.stdout, status.stdout + status.stderr
    remote = cluster.qvlm("status", job_id, "--address", cluster.dashboard)
    assert remote.returncode == 0, remote.stdout + remote.stderr
    told = remote.stdout.splitlines()
    assert told[0].startswith(f"{job_id}: SUCCEEDED") and re.fullmatch(r"\[loopback\] finished: blocks (\d+)/\1", told[1]), told
    logs = cluster.qvlm("logs", job_id, "--address", cluster.dashboard)
    assert logs.returncode == 0 and "done:" in logs.stdout and "finished" in logs.stdout, logs.stderr
    followed = cluster.qvlm("logs", "--follow", job_id, "--address", cluster.dashboard)
    assert followed.returncode == 0 and "done:" in followed.stdout, followed.stdout + followed.stderr
    listed = cluster.qvlm("list", "--address", cluster.dashboard).stdout.splitlines()
    assert listed[0].split("\t") == ["JOB ID", "STATUS", "NAME", "OUTPUT"]
    assert f"{job_id}\tSUCCEEDED\tloopback\t{out}" in listed[1:], listed
    plan = json.loads((out / "qvlm_plan.json").read_text())
    assert len(plan["stages"]) == 2
    nodes = plan["stage_nodes"]
    assert len(nodes) == 2 and len(set(nodes)) == 2, f"spread placement put both stages on {nodes}"
    assert (out / "qvlm_manifest.json").exists()


@pytest.mark.timeout(900)
def test_each_stage_read_only_its_own_tensors_from_s3(finished_job, s3_model, s3_server):
    """Every ranged read of a stage lies in the safetensors headers or in the bytes of exactly the tensors
    that stage loaded, and together the reads cover those tensors."""
    from transformers import AutoConfig

    from qvlm.loading import build_skeleton, checkpoint_key_map
    from workers.safetensors_reader import CheckpointIndex
    from workers.storage import open_storage

    _, out, _ = finished_job
    uri, local = s3_model
    plan = json.loads((out / "qvlm_plan.json").read_text())
    index = CheckpointIndex.open(open_storage(uri, s3_server))
    keymap = checkpoint_key_map(build_skeleton(AutoConfig.from_pretrained(local)), index.names)
    files = {index.location(n).file for n in index.names}
    data_start = {f: min(index.location(n).start for n in index.names if index.location(n).file == f) for f in files}
    owners = {}
    for s, tensors in enumerate(plan["stage_tensors"]):
        own = {}
        for name in tensors:
            loc = index.location(keymap[name])
            own.setdefault(loc.file, []).append((loc.start, loc.end))
            owners.setdefault(keymap[name], set()).add(s)
        reads = [(k, a, b) for k, a, b in plan["stage_reads"][s] if k in files]
        assert reads, f"stage {s} recorded no ranged reads of the safetensors files"
        covered = {}
        for key, start, end in reads:
            if end <= data_start[key]:
                continue  # the 8-byte length and the JSON header
            assert start >= data_start[key], f"stage {s} read {key}[{start}:{end}] across the header and the data"
            pos = start
            for a, b in sorted(own.get(key, [])):
                if a <= pos < b:
                    pos = b
            assert pos >= end, f"stage {s} read {key}[{start}:{end}], outside its own tensors"
            covered.setdefault(key, []).append((start, end))
        for key, ranges in own.items():
            for a, b in ranges:
                if a == b:
                    continue
                assert any(r0 <= a and b <= r1 for r0, r1 in covered.get(key, [])), \
                    f"stage {s}'s tensor at {key}[{a}:{b}] was not read"
    assert not [k for k, s in owners.items() if len(s) > 1], "a tensor was loaded by two stages"


def _state(out: Path) -> dict:
    path = out / "_qvlm/state.json"
    return json.loads(path.read_text()) if path.exists() else {}


@pytest.mark.timeout(900)
def test_sigterm_to_a_following_submit_stops_the_job_on_the_cluster(cluster, s3_model, s3_server, tmp_path):
    """qvlm-submit follows the job; SIGTERM to it stops the job through the Jobs API (143). The driver on the
    cluster, sent SIGTERM by Ray, records "stopped" and releases the output's lock; a second follower
    (`qvlm logs --follow`) ends with it (1), and `qvlm status JOB_ID` says STOPPED with the job's phase (1)."""
    out = tmp_path / "out"
    # 3000 learned-rounding steps a block: the search lasts long enough that the stop lands in it
    job = _job_file(tmp_path, "loopback-cancel", s3_model[0], s3_server, out, iters=3000)
    submit = subprocess.Popen([str(BIN / "qvlm-submit"), "--address", cluster.dashboard, str(job)], env=cluster.env,
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    follower = None
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while _state(out).get("phase") not in ("capturing", "statistics", "searching"):
            assert submit.poll() is None and time.monotonic() < deadline, "the job did not reach the capture"
            time.sleep(0.5)
        job_id = f"qvlm-loopback-cancel-{_state(out)['spec_hash'][:8]}"
        follower = subprocess.Popen([str(BIN / "qvlm"), "logs", "--follow", job_id, "--address", cluster.dashboard],
                                    env=cluster.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        first = follower.stdout.readline()  # following: it has printed the log so far
        os.kill(submit.pid, signal.SIGTERM)
        output, _ = submit.communicate(timeout=120)
        follower.wait(120)  # its output is small: the pipe cannot fill up
        followed = first + follower.stdout.read()  # communicate() would skip what readline() buffered
    finally:
        for proc in (submit, follower):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert submit.returncode == 143, output
    assert f"stopping {job_id} on the cluster" in output and f"{job_id}: STOPPED" in output
    assert "error: stopped by SIGTERM" in output and "Traceback" not in output
    assert follower.returncode == 1 and "[loopback-cancel] capturing" in followed, followed
    assert f"job {job_id} ended STOPPED" in followed
    remote = cluster.qvlm("status", job_id, "--address", cluster.dashboard)
    assert remote.returncode == 1 and f"{job_id}: STOPPED" in remote.stdout, remote.stdout + remote.stderr
    assert "[loopback-cancel] stopped" in remote.stdout and "stopped by SIGTERM" in remote.stdout, remote.stdout
    assert _state(out)["phase"] == "stopped" and not (out / "_qvlm/lock.json").exists()
    again = cluster.qvlm("cancel", job_id, "--address", cluster.dashboard)
    assert again.returncode == 0 and f"{job_id}: not running" in again.stdout


@pytest.mark.timeout(900)
def test_no_wait_then_a_failed_job_exits_1_in_logs_and_status(cluster, s3_model, s3_server, tmp_path):
    """The driver on the cluster fails at once (the output is locked by a live run here): the submission
    with --no-wait returns 0, `qvlm logs --follow` prints the driver's refusal and exits 1, and `qvlm status
    JOB_ID` exits 1 with FAILED."""
    from cluster.lock import OutputLock
    from workers.storage import LocalStorage

    out = tmp_path / "out"
    job = _job_file(tmp_path, "loopback-failed", s3_model[0], s3_server, out)
    holder = OutputLock(LocalStorage(out), "holder", "h" * 64)
    holder.acquire()
    try:
        result = cluster.qvlm("submit", "--address", cluster.dashboard, "--no-wait", str(job))
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
        job_id = _job_id(result.stdout)
        assert f"qvlm logs --follow {job_id}" in result.stdout
        followed = cluster.qvlm("logs", "--follow", job_id, "--address", cluster.dashboard, timeout=300)
    finally:
        holder.release()
    assert followed.returncode == 1, followed.stdout + followed.stderr
    assert "is locked by job 'holder'" in followed.stdout and f"job {job_id} ended FAILED" in followed.stderr
    remote = cluster.qvlm("status", job_id, "--address", cluster.dashboard)
    assert remote.returncode == 1 and f"{job_id}: FAILED" in remote.stdout, remote.stdout + remote.stderr
