"""Soak: the bundled example job N times in a row on one local Ray, with faults injected at random.

    .venv/bin/python bench/soak.py [--runs 20] [--seed 0]

One Ray head (``ray start --head``, its own temp folder and process group), one moto S3 server and one
fault proxy in front of it (tests/fault_proxy.py), all on 127.0.0.1. Each run submits
examples/tiny-llava.yaml with ``qvlm-submit --address`` into its own S3 output through the proxy. A seeded
random draw per run picks: the share of S3 requests the proxy fails (500, 503, reset, lost response,
truncated body), block workers to kill mid-search and stage actors to kill during capture (through the test
hook in workers/fault_hooks.py), and sometimes a driver kill (SIGKILL while the last block is searched)
followed by a re-submission that resumes. An unfaulted run first gives the reference checkpoint.

A run counts as corrupted when its output does not verify against its manifest (read without the proxy)
or any checkpoint file's sha256 differs from the reference. Exits 1 if any run is corrupted or incomplete.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/fault_proxy.py and tests/s3_server.py: stdlib / moto tools, no pytest use

from _common import CACHE, table  # noqa: E402
from cluster.verify import verify_output  # noqa: E402
from tests.fault_proxy import FaultProxy  # noqa: E402
from tests.s3_server import FAKE_ENV  # noqa: E402
from workers.storage import S3Storage  # noqa: E402

BIN = Path(sys.executable).parent
BUCKET = "qvlm-soak"
DOCUMENTS = {"qvlm_plan.json", "qvlm_report.json", "report.html"}  # timings inside: not checkpoint bytes
RUN_TIMEOUT_S = 600
S3_RATES = (0.0, 0.05, 0.1, 0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_members(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and int(fields[3]) == sid:
            pids.append(int(entry.name))
    return pids


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL a process we started in its own session, and everything left in that session."""
    for pid in [proc.pid, *session_members(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(30)


def pid_alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


class Soak:
    def __init__(self, workdir: Path, model_dir: Path, faults: Path, proxy: FaultProxy, s3_endpoint: str, address: str,
                 env: dict):
        self.workdir, self.model_dir, self.faults, self.proxy = workdir, model_dir, faults, proxy
        self.s3_endpoint, self.address, self.env = s3_endpoint, address, env
        self.example = yaml.safe_load((ROOT / "examples/tiny-llava.yaml").read_text())

    def job(self, name: str) -> Path:
        job = json.loads(json.dumps(self.example))
        job["model"]["path"] = str(self.model_dir)
        job["output"] = {"uri": f"s3://{BUCKET}/{name}", "endpoint_url": self.proxy.endpoint}
        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(job))
        return path

    def start(self, job: Path) -> subprocess.Popen:
        return subprocess.Popen([str(BIN / "qvlm-submit"), str(job), "--address", self.address], cwd=ROOT, env=self.env,
                                text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)

    def submit(self, job: Path) -> tuple[int, str]:
        proc = self.start(job)
        try:
            output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
        finally:
            kill_session(proc)
        return proc.returncode, output

    def direct(self, name: str) -> S3Storage:
        return S3Storage(f"s3://{BUCKET}/{name}", self.s3_endpoint)

    def checkpoint(self, name: str) -> dict[str, str]:
        manifest = json.loads(self.direct(name).get_bytes("qvlm_manifest.json"))
        return {k: v["sha256"] for k, v in manifest["files"].items() if k not in DOCUMENTS}

    def kill_driver_at_last_block(self, job: Path, last: int) -> bool:
        """Start the job, SIGKILL its driver while the last block is searched, wait for Ray to clean up; True
        if Ray left the held block worker alive (the soak then kills it)."""
        hold = self.faults / f"hold-block-{last}"
        hold.touch()
        proc = self.start(job)
        held = Path(f"{hold}.held")
        try:
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while not held.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the job ended or stalled before its last block:\n{proc.stdout.read()[-2000:]}")
                time.sleep(0.2)
        finally:
            kill_session(proc)
        worker = int(held.read_text() or 0)
        deadline = time.monotonic() + 120
        while worker and pid_alive(worker) and time.monotonic() < deadline:
            time.sleep(0.5)  # Ray kills a dead driver's workers; the held one must be gone before it is released
        orphan = bool(worker) and pid_alive(worker)
        if orphan:
            os.kill(worker, signal.SIGKILL)
        hold.unlink()
        held.unlink()
        return orphan

    def fired(self) -> Counter:
        """Kill triggers that fired since the last call, by kind (kill-block, kill-capture); clears them."""
        folder = self.faults / "fired"
        counts = Counter()
        for p in folder.iterdir() if folder.exists() else []:
            counts["kill-block" if p.name.startswith("kill-block") else "kill-capture"] += 1
            p.unlink()
        return counts

    def run(self, index: int, rng: random.Random, blocks: int, reference: dict) -> dict:
        name = f"run-{index:02d}"
        job = self.job(name)
        rate = rng.choice(S3_RATES)
        kills = rng.sample(range(blocks), k=rng.choice((0, 1, 1, 2)))
        stage_kill = rng.random() < 0.2
        driver_kill = rng.random() < 0.3
        for b in kills:
            (self.faults / f"kill-block-{b}.{name}").touch()
        if stage_kill:
            (self.faults / f"kill-capture.{name}").touch()
        before = self.proxy.injected
        self.proxy.set_rate(rate)
        t = time.perf_counter()
        submissions, resumed, code, output, orphan = 0, 0, None, "", False
        if driver_kill:
            orphan = self.kill_driver_at_last_block(job, blocks - 1)
            submissions += 1
        while submissions < 4 and code != 0:  # a failed run is re-submitted, as a user would
            code, output = self.submit(job)
            submissions += 1
            done = re.search(r"done: (\d+) blocks \((\d+) resumed\)", output)
            resumed = int(done[2]) if done else resumed
        seconds = time.perf_counter() - t
        self.proxy.set_rate(0.0)
        fired = self.fired()
        leftover = [p.name for p in self.faults.iterdir() if p.is_file()]
        for p in leftover:
            os.unlink(self.faults / p)
        problems = verify_output(self.direct(name)) if code == 0 else ["did not complete"]
        same = code == 0 and not problems and self.checkpoint(name) == reference
        return {"run": name, "s3 rate": rate, "s3 faults": self.proxy.injected - before,
                "worker kills": fired["kill-block"], "stage kills": fired["kill-capture"],
                "driver kill": "yes" if driver_kill else "-", "submits": submissions, "resumed": resumed,
                "exit": code, "verify": "ok" if not problems else f"{len(problems)} bad", "same bytes": "yes" if same else "NO",
                "seconds": f"{seconds:.0f}", "completed": code == 0, "corrupted": code == 0 and not same,
                "unfired": len(leftover), "orphans": int(orphan), "tail": "" if code == 0 else output[-1500:]}


def build_model(model_dir: Path) -> None:
    if not (model_dir / "model.safetensors.index.json").exists():
        subprocess.run([sys.executable, "-m", "qvlm.tiny", "llava", str(model_dir)], check=True, cwd=ROOT)


def start_ray(env: dict, temp_dir: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=3", "--object-store-memory=300000000", "--include-dashboard=false",
                             f"--temp-dir={temp_dir}", "--block"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while subprocess.run([str(BIN / "ray"), "status", f"--address={address}"], env=env, capture_output=True).returncode:
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_session(proc)
            raise RuntimeError("ray start --head did not come up")
        time.sleep(1)
    return proc, address


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from moto.server import ThreadedMotoServer
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request otherwise

    model_dir = CACHE / "tiny-llava-example"
    build_model(model_dir)
    os.environ.update(FAKE_ENV)
    workdir = Path(tempfile.mkdtemp(prefix="qvlm-soak-"))
    faults = workdir / "faults"
    faults.mkdir()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    s3_endpoint = "http://{}:{}".format(*moto.get_host_and_port())
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "QVLM_TEST_"))}
    env.update(FAKE_ENV, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", QVLM_TEST_FAULTS=str(faults))
    ray_head, address = start_ray(env, tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    rows = []
    try:
        with FaultProxy(s3_endpoint, rate=0.0, seed=args.seed) as proxy:
            soak = Soak(workdir, model_dir, faults, proxy, s3_endpoint, address, env)
            code, output = soak.submit(soak.job("reference"))
            if code != 0:
                raise RuntimeError(f"the unfaulted reference run failed:\n{output[-3000:]}")
            reference = soak.checkpoint("reference")
            blocks = len(json.loads(soak.direct("reference").get_bytes("qvlm_plan.json"))["blocks"])
            print(f"model {model_dir}; examples/tiny-llava.yaml ({blocks} blocks), output in S3 (moto) through the "
                  f"fault proxy; one local Ray ({address}, 3 CPUs); seed {args.seed}", flush=True)
            for i in range(args.runs):
                row = soak.run(i, random.Random(args.seed * 1000 + i), blocks, reference)
                rows.append(row)
                print(" ".join(f"{k}={v}" for k, v in row.items() if k != "tail"), flush=True)
                if row["tail"]:
                    print(row["tail"], flush=True)
            kinds = dict(sorted(proxy.counts.items()))
            requests = proxy.requests
    finally:
        kill_session(ray_head)
        moto.stop()
    columns = ["run", "s3 rate", "s3 faults", "worker kills", "stage kills", "driver kill", "submits", "resumed", "exit",
               "verify", "same bytes", "seconds"]
    print()
    print(table(columns, [[r[c] for c in columns] for r in rows]))
    completed = sum(r["completed"] for r in rows)
    corrupted = sum(r["corrupted"] for r in rows)
    print()
    print(f"completions {completed}/{len(rows)}; task retries (block workers killed mid-search) "
          f"{sum(r['worker kills'] for r in rows)}; stage restarts (actors killed in capture) "
          f"{sum(r['stage kills'] for r in rows)}; driver kills {sum(r['driver kill'] == 'yes' for r in rows)}, "
          f"resumes {sum(r['resumed'] > 0 for r in rows)} ({sum(r['resumed'] for r in rows)} blocks not searched again); "
          f"extra submissions {sum(r['submits'] - 1 - (r['driver kill'] == 'yes') for r in rows)}")
    print(f"S3 requests through the proxy {requests}, faults injected {sum(kinds.values())} {kinds}; "
          f"kill triggers never reached {sum(r['unfired'] for r in rows)}; block workers of killed drivers that Ray "
          f"left alive {sum(r['orphans'] for r in rows)}")
    print(f"corrupted outputs {corrupted}")
    return 0 if corrupted == 0 and completed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
