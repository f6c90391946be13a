"""Faults a long job must survive: stage actors killed in capture and in search, a killed driver, SIGINT and
SIGTERM, an object store that fails transiently, a corrupted block file, a corrupt block record, a corrupt, future
or unreadable lock, a corrupt file in a finished output, and a second job on the same output.

Everything is real: each job is ``qvlm-submit`` in its own process (and session) on an embedded local Ray,
S3 is moto over HTTP on 127.0.0.1, and S3 faults come from a fault-injecting proxy on the wire
(tests/fault_proxy.py). Worker and actor deaths come from the test hook in workers/fault_hooks.py, which the
jobs see through ``QVLM_TEST_FAULTS``. A faulted run must end byte-identical to an unfaulted one: every
checkpoint file and block shard listed in the manifest has the same sha256.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cluster.lock import HEARTBEAT_S, LOCK_KEY, LockError, OutputLock, read_lock
from cluster.verify import verify_output
from tests.fault_proxy import KINDS, FaultProxy
from tests.job_files import write_job
from tests.s3_server import FAKE_ENV
from workers.shard import record_key
from workers.storage import AlreadyExists, LocalStorage, S3Storage

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 300
# the plan document and the report carry timings and the job's name: not part of the checkpoint's bytes
DOCUMENTS = {"qvlm_plan.json", "qvlm_report.json", "report.html"}


# --- jobs in their own processes ---------------------------------------------------------------------

def _job(tmp_path: Path, model: str, out: str, name: str = "faults", **changes) -> Path:
    return write_job(tmp_path / f"{name}.yaml", name, model, out, **changes)


def _env(faults: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "QVLM_TEST_"))}
    env.update(FAKE_ENV, RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    if faults is not None:
        env["QVLM_TEST_FAULTS"] = str(faults)
    return env


def _start(job: Path, faults: Path | None = None) -> subprocess.Popen:
    """qvlm-submit in its own session, so that it and the Ray it starts can be killed together."""
    return subprocess.Popen([str(BIN / "qvlm-submit"), str(job)], cwd=ROOT, env=_env(faults), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the driver's process group, then whatever else of its session is left (Ray's workers have
    process groups of their own)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)
    for pid in _session_members(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _session_members(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if entry.name.isdigit() and int(fields[3]) == sid:  # fields after "pid (comm)": state ppid pgrp session
            pids.append(int(entry.name))
    return pids


def _finish(proc: subprocess.Popen, timeout: float = JOB_TIMEOUT_S) -> tuple[int, str]:
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        _kill_session(proc)
    return proc.returncode, output


def _submit(job: Path, faults: Path | None = None) -> tuple[int, str]:
    return _finish(_start(job, faults))


def _wait_until(predicate, proc: subprocess.Popen, what: str, timeout: float = JOB_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the job ended (exit {proc.returncode}) before {what}:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _checkpoint(storage) -> dict[str, str]:
    """sha256 of every checkpoint file and block shard the manifest lists."""
    manifest = json.loads(storage.get_bytes("qvlm_manifest.json"))
    return {k: v["sha256"] for k, v in manifest["files"].items() if k not in DOCUMENTS}


def _state(out: Path) -> dict:
    return json.loads((out / "_qvlm/state.json").read_text())


@pytest.fixture(scope="module")
def reference(tiny_llava_dir, tmp_path_factory):
    """An unfaulted run: its checkpoint's sha256 per file, its number of blocks, its job file and output."""
    tmp = tmp_path_factory.mktemp("reference")
    job = _job(tmp, str(tiny_llava_dir), str(tmp / "out"), name="reference")
    code, output = _submit(job)
    assert code == 0, output[-3000:]
    plan = json.loads((tmp / "out/qvlm_plan.json").read_text())
    return {"files": _checkpoint(LocalStorage(tmp / "out")), "blocks": len(plan["blocks"]), "job": job,
            "out": tmp / "out"}


@pytest.fixture
def faults(tmp_path) -> Path:
    folder = tmp_path / "faults"
    folder.mkdir()
    return folder


def _fired(faults: Path) -> list[str]:
    return sorted(p.name for p in (faults / "fired").glob("*")) if (faults / "fired").exists() else []


# --- the fault proxy and storage under faults (no Ray) -------------------------------------------------

def test_every_object_reads_back_intact_through_transient_faults(s3_server, s3_bucket):
    with FaultProxy(s3_server, rate=0.3, seed=7) as proxy:
        store = S3Storage(f"s3://{s3_bucket}/p", proxy.endpoint)
        blobs = {f"d/k{i:02d}": os.urandom(1000 + 7919 * i) for i in range(10)}
        shas = {k: store.put_bytes(k, b, if_absent=(i % 2 == 0)) for i, (k, b) in enumerate(blobs.items())}
        for key, blob in blobs.items():
            assert store.get_bytes(key, shas[key]) == blob
            assert store.get_range(key, 100, 900) == blob[100:900]
            assert store.exists(key) and store.size(key) == len(blob)
        assert store.list("d/") == sorted(blobs)
        for key in blobs:
            store.delete(key)
        assert store.list("d/") == []
    assert set(proxy.counts) == set(KINDS), proxy.counts  # one client in order: the seed fixes the faults


def test_conditional_create_is_safe_when_its_response_is_lost(s3_server, s3_bucket):
    """A conditional put applied by the server whose response is lost is retried by botocore and answered
    412; the write must still count as done, and a real second writer must still be refused."""
    lost_conditional = lambda r: r.method == "PUT" and "if-none-match" in r.headers  # noqa: E731
    with FaultProxy(s3_server, rate=1.0, kinds=("lost",), match=lost_conditional, max_faults=2) as proxy:
        store = S3Storage(f"s3://{s3_bucket}/c", proxy.endpoint)
        sha = store.put_bytes("lock.json", b"mine", if_absent=True)  # the probe's put and this one are lost
        assert proxy.counts["lost"] == 2
        assert store.get_bytes("lock.json", sha) == b"mine"
        with pytest.raises(AlreadyExists):
            S3Storage(f"s3://{s3_bucket}/c", proxy.endpoint).put_bytes("lock.json", b"theirs", if_absent=True)


def test_multipart_upload_is_safe_when_its_complete_response_is_lost(s3_server, s3_bucket, tmp_path):
    """The server applies the multipart complete but every answer to it is lost: the client's retries run
    out, yet the object is whole and carries our sha256, so the upload has succeeded."""
    lost_complete = lambda r: r.method == "POST" and "uploadId=" in r.path  # noqa: E731
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(6 << 20))
    with FaultProxy(s3_server, rate=1.0, kinds=("lost",), match=lost_complete) as proxy:
        store = S3Storage(f"s3://{s3_bucket}/m", proxy.endpoint, multipart_threshold=5 << 20, max_attempts=3)
        sha = store.put_file("big.bin", big)
        assert proxy.counts["lost"] >= 3  # every attempt the client made
        assert store.get_bytes("big.bin", sha) == big.read_bytes()


def test_a_block_file_that_fails_its_checksum_is_never_vouched_for(tmp_path):
    """A block counts as finished (resumed, exported, listed in the manifest) only while its file verifies."""
    from cluster.commit import load_finished_blocks
    from qvlm.method import Block
    from qvlm.structure import Unit
    from workers.shard import BlockRecord

    out = LocalStorage(tmp_path / "out")
    recorded = out.put_bytes("model-00001-of-00002.safetensors", b"the file as the search wrote it")
    record = BlockRecord(0, "model-00001-of-00002.safetensors", recorded, 31, ("layers.0",), (), (), 0.0, 0.0, 1, 0.1)
    file_of = lambda i: "model-00001-of-00002.safetensors"  # noqa: E731
    out.put_bytes(record_key(0), record.to_json())
    blocks, units = [Block(0, 0, (0,))], [Unit(0, "layers.0", "language", ("q",))]
    assert load_finished_blocks(out, blocks, units, file_of) == {0: record}
    out.put_bytes("model-00001-of-00002.safetensors", b"the file after a flipped byte!!")
    heard = []
    assert load_finished_blocks(out, blocks, units, file_of, lambda line, flush=True: heard.append(line)) == {}
    assert heard and "block 0 is searched again" in heard[0] and "checksum mismatch" in heard[0]
    out.put_bytes(record_key(0), b'{"index": 0, "shard_key": ')  # a half-written record: searched again too
    assert load_finished_blocks(out, blocks, units, file_of, lambda line, flush=True: heard.append(line)) == {}
    assert "is unreadable (not valid JSON" in heard[-1]


# --- the output lock (no Ray) ----------------------------------------------------------------------

def _settings(model_dir, out, **kw):
    from cluster.job import Job
    from workers.locations import Locations
    from qvlm.config import CalibrationSettings
    from qvlm.config import QuantConfig

    return Job("second", "2" * 64, Locations(str(model_dir), str(out)), CalibrationSettings(samples=8, eval_samples=0),
               QuantConfig(), **kw)


def test_a_live_lock_refuses_any_second_run_even_with_overwrite(tiny_llava_dir, tmp_path):
    from cluster.driver import run_job

    out = LocalStorage(tmp_path / "out")
    first = OutputLock(out, "first", "1" * 64, echo=lambda *a, **k: None)
    first.acquire()
    try:
        for settings in (_settings(tiny_llava_dir, out.root, overwrite=True),
                         replace(_settings(tiny_llava_dir, out.root), name="first", spec_hash="1" * 64)):
            with pytest.raises(LockError, match="locked by job 'first'") as err:
                run_job(settings)
            assert err.value.exit_code == 2 and "overwrite: true does not break a live lock" in str(err.value)
        assert out.list("") == [LOCK_KEY]  # the refused runs wrote nothing
    finally:
        first.release()
    assert out.list("") == []


def _write_lock(out: LocalStorage, data: bytes, written_ago: float = 0.0) -> None:
    """A lock file as another run left it, last modified ``written_ago`` seconds ago (by the file's mtime)."""
    out.put_bytes(LOCK_KEY, data)
    then = time.time() - written_ago
    os.utime(out.root / LOCK_KEY, (then, then))


def _lock_doc(host: str, pid: int, beat: float) -> bytes:
    return json.dumps({"job": "old", "spec_hash": "0" * 64, "run_id": "r" * 32, "host": host, "pid": pid,
                       "created_at": beat, "heartbeat_at": beat}).encode()


def _recorder(lines: list):
    return lambda line, **k: lines.append(line)


def test_a_stale_or_dead_lock_is_taken_over(tmp_path):
    out = LocalStorage(tmp_path / "out")
    lines = []
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = [("far-away-host", 12345, time.time() - 3600, 3600, "no heartbeat for over 10 minutes"),
             (socket.gethostname(), int(dead.stdout), time.time(), 0, "its process is gone")]
    for host, pid, beat, written_ago, reason in stale:
        _write_lock(out, _lock_doc(host, pid, beat), written_ago)
        lock = OutputLock(out, "new", "1" * 64, echo=_recorder(lines))
        lock.acquire()
        assert read_lock(out).run_id == lock.info.run_id
        assert reason in lines[-1] and "job 'old'" in lines[-1]
        lock.release()
    alive = OutputLock(out, "other", "0" * 64)
    alive.acquire()
    try:
        with pytest.raises(LockError, match="locked by job 'other'"):
            OutputLock(out, "new", "1" * 64).acquire()
    finally:
        alive.release()


@pytest.mark.parametrize("data, problem", [
    (b'{"job": "old", "spec_hash": "00', "not valid JSON"),  # half-written
    (b"\x00\xff garbage", "not valid JSON"),
    (b'["job", "old"]', "a JSON list, not an object"),
    (_lock_doc("far-away-host", 1, 0.0).replace(b'"pid": 1', b'"pid": "1"'), "pid is '1', not an integer"),
    (_lock_doc("far-away-host", 1, 0.0).replace(b'"heartbeat_at": 0.0', b'"heartbeat_at": null'),
     "heartbeat_at is None, not a finite number"),
    (b'{"job": "old"}', "missing spec_hash"),
])
def test_a_malformed_lock_is_taken_over_once_the_heartbeat_interval_has_passed(tmp_path, data, problem):
    """Last written over a heartbeat interval ago: taken over at once, naming the file and what is wrong."""
    out, where, lines = LocalStorage(tmp_path / "out"), str(tmp_path / "out" / LOCK_KEY), []
    _write_lock(out, data, written_ago=60.0)
    lock = OutputLock(out, "new", "1" * 64, echo=_recorder(lines))
    lock.acquire()
    try:
        assert read_lock(out).run_id == lock.info.run_id
        assert len(lines) == 1 and f"taking over the lock {where}" in lines[0] and problem in lines[0], lines
        assert re.search(r"was last written 6\d+s ago, over the heartbeat interval \(30s\)", lines[0]), lines
    finally:
        lock.release()
    assert not out.exists(LOCK_KEY)


def test_a_malformed_lock_written_just_now_is_waited_out_first(tmp_path):
    """A half-written lock may be a lock being written: the run waits out the heartbeat interval, then takes
    it over."""
    out, lines = LocalStorage(tmp_path / "out"), []
    _write_lock(out, b'{"job": "old", "spec_hash": "00')
    lock = OutputLock(out, "new", "1" * 64, echo=_recorder(lines), heartbeat_s=5.0)
    lock.acquire()
    lock.release()
    assert len(lines) == 2 and "is not a valid lock (not valid JSON" in lines[0] and "waiting" in lines[0], lines
    assert "taking over the lock" in lines[1] and "over the heartbeat interval (5s)" in lines[1], lines


def test_a_heartbeat_in_the_future_is_stale_once_the_file_is_old_by_this_hosts_clock(tmp_path):
    """A holder whose clock runs a day ahead: its lock protects it while the file keeps being rewritten, and is
    taken over once the file is over 10 minutes old by this host's clock. A holder whose clock runs behind (its
    heartbeat looks an hour old) is protected by the file's fresh last-modified time."""
    out = LocalStorage(tmp_path / "out")
    ahead = _lock_doc("far-away-host", 12345, time.time() + 86400)
    behind = _lock_doc("far-away-host", 12345, time.time() - 3600)
    for data in (ahead, behind):
        _write_lock(out, data, written_ago=5)
        with pytest.raises(LockError, match="locked by job 'old'.*still running"):
            OutputLock(out, "new", "1" * 64).acquire()
    lines = []
    _write_lock(out, ahead, written_ago=11 * 60)
    lock = OutputLock(out, "new", "1" * 64, echo=_recorder(lines))
    lock.acquire()
    lock.release()
    assert "its heartbeat is 86" in lines[-1] and "in the future (the holder's clock is ahead)" in lines[-1], lines
    assert "the lock was last written 66" in lines[-1], lines  # 660 or 661 s


def test_a_lock_that_is_a_folder_exits_2_saying_what_to_remove(tmp_path, tiny_llava_dir):
    from typer.testing import CliRunner

    from jobs.cli import app

    (tmp_path / "out" / LOCK_KEY).mkdir(parents=True)
    result = CliRunner().invoke(app, ["submit", str(_job(tmp_path, str(tiny_llava_dir), str(tmp_path / "out")))])
    assert result.exit_code == 2, result.output
    where = tmp_path / "out" / LOCK_KEY
    assert f"{where} exists but cannot be read as a lock file (is it a folder?)" in result.output
    assert f"remove it (rm -r '{where}')" in result.output and "Traceback" not in result.output
    assert where.is_dir() and not (tmp_path / "out/_qvlm/state.json").exists()  # nothing removed, nothing written


def test_a_malformed_lock_on_s3_is_judged_by_its_last_modified_time(s3_server, s3_bucket):
    from cluster.lock import find_lock

    out = S3Storage(f"s3://{s3_bucket}/out", s3_server)
    out.put_bytes(LOCK_KEY, b'{"job": "old", "spec_ha')
    found, now = find_lock(out), time.time()
    assert found.holder is None and "not valid JSON" in found.problem
    assert abs(found.modified_at - now) < 60  # S3's LastModified, by the server's clock
    assert found.stale_reason(now, heartbeat_s=120) is None  # young: a writer may be at work
    assert "over the heartbeat interval (120s)" in found.stale_reason(now + 240, heartbeat_s=120)
    lines = []
    lock = OutputLock(out, "new", "1" * 64, echo=_recorder(lines), heartbeat_s=0.5)
    lock.acquire()
    lock.release()
    assert f"taking over the lock s3://{s3_bucket}/out/{LOCK_KEY} of an invalid lock" in lines[-1], lines
    assert not out.exists(LOCK_KEY)


def test_a_run_that_lost_its_lock_stops_writing(tmp_path):
    out = LocalStorage(tmp_path / "out")
    lock = OutputLock(out, "slow", "1" * 64, echo=lambda *a, **k: None, heartbeat_s=0.05)
    lock.acquire()
    taker = {**json.loads(out.get_bytes(LOCK_KEY)), "run_id": "t" * 32, "job": "taker"}
    out.put_bytes(LOCK_KEY, json.dumps(taker).encode())
    deadline = time.monotonic() + 30
    while lock.lost is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(LockError, match="taken over by job 'taker'"):
        lock.check()
    lock.release()
    assert read_lock(out).run_id == "t" * 32  # the other run's lock is left alone


# --- resume from the ledger (no Ray) -----------------------------------------------------------------

def test_a_corrupt_block_record_means_that_block_is_searched_again(tmp_path):
    from cluster.commit import load_finished_blocks
    from qvlm.method import Block
    from qvlm.structure import Unit
    from workers.shard import BlockRecord, file_name

    out = LocalStorage(tmp_path / "out")
    blocks = [Block(i, 0, (i,)) for i in range(4)]
    units = [Unit(i, f"unit{i}", "language", ("q",)) for i in range(4)]
    for b in blocks:
        blob = f"block file {b.index}".encode()
        sha = out.put_bytes(file_name(b.index, 5), blob)
        record = BlockRecord(b.index, file_name(b.index, 5), sha, len(blob), (f"unit{b.index}",), (), (), 1.0, 0.5, 3, 0.1)
        out.put_bytes(record_key(b.index), record.to_json())
    out.put_bytes(record_key(1), b'{"index": 1, "shard_key": "model-0')  # cut off mid-write
    out.put_bytes(record_key(2), out.get_bytes(record_key(2)).replace(b'"size": 12', b'"size": "12"'))
    lines = []
    finished = load_finished_blocks(out, blocks, units, lambda i: file_name(i, 5), _recorder(lines))
    assert sorted(finished) == [0, 3] and finished[3].unit_names == ("unit3",)
    assert len(lines) == 2
    assert lines[0].startswith(f"block 1 is searched again: its record {record_key(1)} is unreadable (not valid JSON")
    assert lines[1] == f"block 2 is searched again: its record {record_key(2)} is unreadable (size is '12', not an integer)"


# --- real jobs under faults (local Ray in subprocesses) ------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(2 * JOB_TIMEOUT_S)
def test_stage_killed_mid_search_is_restarted_and_bytes_match(reference, tiny_llava_dir, tmp_path, faults):
    (faults / "kill-block-1").touch()
    code, output = _submit(_job(tmp_path, str(tiny_llava_dir), str(tmp_path / "out")), faults)
    assert code == 0, output[-3000:]
    assert _fired(faults) == ["kill-block-1"]  # the stage did die mid-search; new stages captured again
    assert "a stage worker died during searching" in output and "(attempt 2 of 4); finished blocks are kept" in output
    assert f"done: {reference['blocks']} blocks" in output
    assert _checkpoint(LocalStorage(tmp_path / "out")) == reference["files"]


@pytest.mark.slow
@pytest.mark.timeout(2 * JOB_TIMEOUT_S)
def test_stages_restarted_after_veo_reuse_the_tuned_tower(tiny_llava_dir, tmp_path, faults):
    """VEO's tower is written (file, then record) before the searches: stages that die in a search restart without
    tuning it again, and the checkpoint is still the one the one-process run gives (up to VEO's float sums)."""
    from qvlm.batches import calibration_answer_masks, calibration_batches
    from qvlm.driver import quantize
    from jobs.spec import load_job
    from tests.conftest import load_llava
    from tests.outputs import assert_same_up_to_summation_order, block_tensors, veo_tower

    out = tmp_path / "out"
    job = _job(tmp_path, str(tiny_llava_dir), str(out), **{"quantization.qvlm.veo.enabled": True,
                                                            "quantization.qvlm.veo.epochs": 1})
    (faults / "kill-block-1").touch()
    code, output = _submit(job, faults)
    assert code == 0, output[-3000:]
    assert _fired(faults) == ["kill-block-1"] and "a stage worker died during searching" in output
    plan, tensors = block_tensors(out)
    assert plan["veo"]["reused"] is True  # the restarted run found the record and its verified file
    assert all(torch.equal(tensors[k], v) for k, v in veo_tower(out).items())  # the vision block is the tuned tower
    compiled = load_job(job).compile()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the stage workers run
    try:
        _, result = quantize(load_llava(tiny_llava_dir)[0], calibration_batches(tiny_llava_dir, compiled.calibration),
                             compiled.quant, calibration_answer_masks(tiny_llava_dir, compiled.calibration),
                             stages=plan["stages"])
    finally:
        torch.set_num_threads(threads)
    assert_same_up_to_summation_order(tensors, result.tensors())


@pytest.mark.slow
@pytest.mark.timeout(3 * JOB_TIMEOUT_S)
def test_stage_killed_during_capture_recovers_or_fails_clearly(reference, tiny_llava_dir, tmp_path, faults):
    out = tmp_path / "out"
    job = _job(tmp_path, str(tiny_llava_dir), str(out), **{"resources.max_retries": 1})
    # killed in both attempts: the job fails, says why, and nothing looks complete
    (faults / "kill-capture.1").touch()
    (faults / "kill-capture.2").touch()
    code, output = _submit(job, faults)
    assert code == 1, output[-3000:]
    assert "a stage worker died during capturing in each of 2 attempts" in output and "re-submit" in output
    assert "Traceback" not in output
    state = _state(out)
    assert state["phase"] == "failed" and "stage worker died" in state["error"]
    assert not (out / "qvlm_manifest.json").exists() and not (out / LOCK_KEY).exists()
    verify = subprocess.run([str(BIN / "qvlm"), "verify", str(out)], capture_output=True, text=True, timeout=120)
    assert verify.returncode == 1 and "did not finish" in verify.stdout
    # killed once: the stages are started again, the capture redone, and the job completes unchanged
    (faults / "kill-capture.3").touch()
    code, output = _submit(job, faults)
    assert code == 0, output[-3000:]
    assert "starting the stages again (attempt 2 of 2)" in output
    assert len(_fired(faults)) == 3
    assert _checkpoint(LocalStorage(out)) == reference["files"]


@pytest.mark.slow
@pytest.mark.timeout(3 * JOB_TIMEOUT_S)
def test_killed_driver_resumes_without_redoing_blocks_and_redoes_a_corrupt_shard(reference, tiny_llava_dir, tmp_path,
                                                                                  faults):
    out = tmp_path / "out"
    job = _job(tmp_path, str(tiny_llava_dir), str(out))
    last = reference["blocks"] - 1
    (faults / f"hold-block-{last}").touch()  # the last block waits, so the kill lands with the rest done
    proc = _start(job, faults)
    try:
        _wait_until(lambda: (out / "_qvlm/state.json").exists() and _state(out)["blocks_done"] == last, proc,
                    f"{last} finished blocks")
    finally:
        _kill_session(proc)
    assert _state(out)["phase"] == "searching" and (out / LOCK_KEY).exists()  # the killed run left its lock
    done = {i: os.stat(out / record_key(i)) for i in range(last)}
    shard = out / json.loads((out / record_key(0)).read_text())["shard_key"]
    flipped = bytearray(shard.read_bytes())
    flipped[len(flipped) // 2] ^= 0x01
    shard.write_bytes(bytes(flipped))
    (faults / f"hold-block-{last}").unlink()

    code, output = _submit(job)
    assert code == 0, output[-3000:]
    assert f"taking over the lock {out / LOCK_KEY} of job 'faults'" in output and "its process is gone" in output
    assert "block 0 is searched again: checksum mismatch" in output
    assert f"done: {reference['blocks']} blocks ({last - 1} resumed)" in output
    for i in range(1, last):  # finished and intact: not searched again, their records untouched
        again = os.stat(out / record_key(i))
        assert (again.st_ino, again.st_mtime_ns) == (done[i].st_ino, done[i].st_mtime_ns), i
    assert _checkpoint(LocalStorage(out)) == reference["files"]
    assert verify_output(LocalStorage(out)) == []


@pytest.mark.slow
@pytest.mark.timeout(2 * JOB_TIMEOUT_S)
def test_s3_transient_faults_leave_every_object_intact(reference, tiny_llava_dir, tmp_path, s3_server, s3_bucket):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    for f in Path(tiny_llava_dir).iterdir():
        s3.upload_file(str(f), s3_bucket, f"model/{f.name}")
    with FaultProxy(s3_server, rate=0.2, seed=3) as proxy:
        job = _job(tmp_path, f"s3://{s3_bucket}/model", f"s3://{s3_bucket}/out",
                   **{"output.endpoint_url": proxy.endpoint})
        code, output = _submit(job)
    assert code == 0, output[-3000:]
    assert proxy.injected > 0 and proxy.requests > proxy.injected, (proxy.requests, proxy.counts)
    direct = S3Storage(f"s3://{s3_bucket}/out", s3_server)  # checked without the proxy in the way
    assert verify_output(direct) == []
    assert _checkpoint(direct) == reference["files"]
    assert not direct.exists(LOCK_KEY)


@pytest.mark.slow
@pytest.mark.timeout(2 * JOB_TIMEOUT_S)
def test_second_job_on_the_same_output_is_refused_while_the_first_runs(reference, tiny_llava_dir, tmp_path, faults):
    out = tmp_path / "out"
    last = reference["blocks"] - 1
    (faults / f"hold-block-{last}").touch()
    first = _start(_job(tmp_path, str(tiny_llava_dir), str(out), name="first"), faults)
    try:
        _wait_until(lambda: (faults / f"hold-block-{last}.held").exists(), first, "the first job's last block")
        second = _job(tmp_path, str(tiny_llava_dir), str(out), name="second", **{"output.overwrite": True})
        code, output = _submit(second)
        assert code == 2, output[-3000:]
        assert "is locked by job 'first'" in output and "still running" in output
        (faults / f"hold-block-{last}").unlink()
        code, output = _finish(first)
    finally:
        _kill_session(first)
    assert code == 0, output[-3000:]
    assert verify_output(LocalStorage(out)) == []
    assert json.loads((out / "qvlm_manifest.json").read_text())["job"] == "first" and _state(out)["name"] == "first"
    assert _checkpoint(LocalStorage(out)) == reference["files"]
    assert not (out / LOCK_KEY).exists()


# --- stopped by signals, resumed, repaired (local Ray in subprocesses) -----------------------------------

class _Run:
    """qvlm-submit in its own session, its stdout read line by line as it arrives. PYTHONUNBUFFERED is not set:
    the command itself must flush every line when its output is not a terminal."""

    def __init__(self, job: Path, faults: Path | None = None):
        env = {k: v for k, v in _env(faults).items() if k != "PYTHONUNBUFFERED"}
        self.proc = subprocess.Popen([str(BIN / "qvlm-submit"), str(job)], cwd=ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, predicate, what: str) -> None:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not predicate():
            if self.proc.poll() is not None:
                raise AssertionError(f"the job ended (exit {self.proc.returncode}) before {what}:\n" + "\n".join(self.lines))
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.2)

    def stop(self, sig: int) -> tuple[int, str]:
        """Send ``sig`` to qvlm-submit alone (as ``kill`` or a supervisor would); its exit code and output, once it
        and every process it started are gone."""
        os.kill(self.proc.pid, sig)
        try:
            code = self.proc.wait(120)
            self._reader.join(30)
            deadline = time.monotonic() + 60
            while _session_members(self.proc.pid) and time.monotonic() < deadline:
                time.sleep(0.5)
            left = _session_members(self.proc.pid)
        finally:
            _kill_session(self.proc)
        assert not left, f"processes of the stopped run are left: {left}"
        return code, "\n".join(self.lines)


def _assert_stopped(out: Path, name: str, output: str) -> None:
    assert f"stopped by {name}; re-submit to resume" in output and f"error: stopped by {name}" in output, output[-3000:]
    assert "Traceback" not in output and "SIGABRT" not in output
    state = _state(out)
    assert state["phase"] == "stopped" and name in state["error"]
    assert not (out / LOCK_KEY).exists()  # released on the way out


@pytest.mark.slow
@pytest.mark.timeout(4 * JOB_TIMEOUT_S)
def test_signals_stop_the_run_cleanly_and_a_resubmit_resumes_past_a_corrupt_lock_and_record(
        reference, tiny_llava_dir, tmp_path, faults):
    out = tmp_path / "out"
    job = _job(tmp_path, str(tiny_llava_dir), str(out))
    blocks, last = reference["blocks"], reference["blocks"] - 1
    # SIGINT while the stage actors capture (one holds at the start of a capture call)
    (faults / "hold-capture").touch()
    run = _Run(job, faults)
    run.wait_for(lambda: (faults / "hold-capture.held").exists() and _state(out)["phase"] == "capturing", "the capture")
    code, output = run.stop(signal.SIGINT)
    assert code == 130, output[-3000:]
    _assert_stopped(out, "SIGINT", output)
    (faults / "hold-capture").unlink()

    # SIGTERM with every block but the last searched, once its progress line has arrived
    (faults / f"hold-block-{last}").touch()
    run = _Run(job, faults)
    run.wait_for(lambda: any(f"searching: blocks {last}/{blocks}" in line for line in run.lines), f"{last} blocks done")
    code, output = run.stop(signal.SIGTERM)
    assert code == 143, output[-3000:]
    _assert_stopped(out, "SIGTERM", output)
    assert _state(out)["blocks_done"] == last
    (faults / f"hold-block-{last}").unlink()

    # re-submit over a half-written lock written over a heartbeat interval ago, with block 0's record cut off
    (out / record_key(0)).write_bytes(b'{"index": 0, "shard_key": "_qvlm/blo')
    _write_lock(LocalStorage(out), b'{"job": "faults", "spec_hash": "0', written_ago=HEARTBEAT_S + 30)
    code, output = _submit(job)
    assert code == 0, output[-3000:]
    assert f"taking over the lock {out / LOCK_KEY} of an invalid lock (not valid JSON" in output
    assert f"block 0 is searched again: its record {record_key(0)} is unreadable (not valid JSON" in output
    assert f"done: {blocks} blocks ({last - 1} resumed)" in output
    assert _checkpoint(LocalStorage(out)) == reference["files"] and verify_output(LocalStorage(out)) == []
    # one progress line per update, each phase counted with an ETA; Ray's own lines are in the job's log file
    for phase in (r"capturing: batches \d+/\d+, ETA \d+s", rf"searching: blocks \d+/{blocks}, ETA \d+s",
                  r"committing: files \d+/\d+, ETA \d+s"):
        assert re.search(phase, output), phase
    log = Path(re.search(r"log of this run \(Ray's own messages\): (\S+)", output.splitlines()[0]).group(1))
    assert "Started a local Ray instance" in log.read_text() and "Ray's logs for this run" in log.read_text()
    assert "Started a local Ray instance" not in output and "Token authentication" not in output
    status = subprocess.run([str(BIN / "qvlm"), "status", str(out)], capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and f"[faults] finished: blocks {blocks}/{blocks}" in status.stdout


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.timeout(3 * JOB_TIMEOUT_S)
def test_a_resubmitted_finished_job_verifies_its_output_and_repairs_what_fails(reference):
    """Repairs the reference output in place: it must end byte-identical to what it was."""
    job, out = reference["job"], reference["out"]
    code, output = _submit(job)
    assert code == 0 and "already finished" in output and "files match the manifest; nothing to do" in output, output
    # a corrupt checkpoint file of unquantized tensors: exported again, manifest rewritten last
    model_file = sorted(out.glob("model-0000*-of-*.safetensors"))[-1]
    _flip_byte(model_file)
    code, output = _submit(job)
    assert code == 0, output[-3000:]
    assert f"finished, but {model_file.name}: sha256 mismatch" in output
    assert "exporting the checkpoint again around the blocks' files" in output and "committing: files" in output
    assert "searching" not in output  # no block searched again
    assert verify_output(LocalStorage(out)) == [] and _checkpoint(LocalStorage(out)) == reference["files"]
    # a corrupt block file as well: the export cannot repair it, so that block is searched again
    shard = json.loads((out / record_key(1)).read_text())["shard_key"]
    _flip_byte(out / shard)
    _flip_byte(model_file)
    code, output = _submit(job)
    assert code == 0, output[-3000:]
    assert f"finished, but {shard}: sha256 mismatch" in output and "running the job again to repair it" in output
    assert "block 1 is searched again: checksum mismatch" in output
    assert f"done: {reference['blocks']} blocks ({reference['blocks'] - 1} resumed)" in output
    assert verify_output(LocalStorage(out)) == [] and _checkpoint(LocalStorage(out)) == reference["files"]
    assert _state(out)["phase"] == "finished" and not (out / LOCK_KEY).exists()
