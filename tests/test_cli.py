"""The command line: bad input exits 2 before any cluster work; the bundled job runs end to end."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jobs.cli import app
from tests.job_files import write_job

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def _job(tmp_path, model_dir, **changes) -> Path:
    return write_job(tmp_path / "job.yaml", "cli-test", str(model_dir), str(tmp_path / "out"), **changes)


@pytest.mark.parametrize("change,expected", [
    ({"quantization.weights.bitz": 4}, "quantization.weights.bitz: unknown field (did you mean bits?)"),
    ({"quantization.weights.bits": 9}, "quantization.weights.bits"),
    ({"output.uri": "http://example.com/out"}, "output.uri"),
    ({"model.path": "/nonexistent/model"}, "model.path: directory /nonexistent/model does not exist"),
    ({"calibration.data": "missing.jsonl"}, "missing.jsonl"),
    ({"quantization.weights.group_size": 256}, "quantization.weights.group_size"),
])
def test_invalid_input_exits_2_and_writes_nothing(tmp_path, tiny_llava_dir, change, expected):
    job = _job(tmp_path, tiny_llava_dir, **change)
    result = runner.invoke(app, ["submit", str(job)])
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_plan_prints_stages_without_running(tmp_path, tiny_llava_dir):
    result = runner.invoke(app, ["plan", str(_job(tmp_path, tiny_llava_dir))])
    assert result.exit_code == 0, result.output
    assert "stage 0:" in result.output and "stage 1:" in result.output
    assert "LlavaForConditionalGeneration" in result.output
    assert "bytes to read:" in result.output and "captured activations per stage worker" in result.output
    assert not (tmp_path / "out").exists()


def test_status_of_an_output_with_no_job_is_an_input_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["status", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "holds no qvlm job state" in result.output


def _submit(job: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "qvlm-submit"
    return subprocess.run([str(exe), str(job)], capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.mark.slow
def test_bundled_example_runs_with_qvlm_submit(tmp_path):
    model = tmp_path / "models/tiny-llava"
    subprocess.run([sys.executable, "-m", "qvlm.tiny", "llava", str(model)], check=True, capture_output=True)
    example = (ROOT / "examples/tiny-llava.yaml").read_text()
    (tmp_path / "job.yaml").write_text(example.replace("../models/tiny-llava", str(model)).replace("../out", str(tmp_path / "out")))
    proc = _submit(tmp_path / "job.yaml")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "finished: blocks" in proc.stdout
    manifest = json.loads((tmp_path / "out/tiny-llava-w4/qvlm_manifest.json").read_text())
    assert len(manifest["files"]) >= 2
    status = runner.invoke(app, ["status", str(tmp_path / "out/tiny-llava-w4")])
    assert status.exit_code == 0 and "finished" in status.output
    again = _submit(tmp_path / "job.yaml")  # re-submitting a finished job does nothing and succeeds
    assert again.returncode == 0 and "already finished" in again.stdout


@pytest.mark.slow
def test_model_and_output_in_s3(tmp_path, tiny_llava_dir, s3_server, s3_bucket):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    for f in Path(tiny_llava_dir).iterdir():
        s3.upload_file(str(f), s3_bucket, f"models/tiny/{f.name}")
    job = _job(tmp_path, f"s3://{s3_bucket}/models/tiny", **{"output.uri": f"s3://{s3_bucket}/out/job",
                                                              "output.endpoint_url": s3_server})
    proc = _submit(job)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="out/job/")["Contents"]]
    assert "out/job/qvlm_manifest.json" in keys
    manifest = json.loads(s3.get_object(Bucket=s3_bucket, Key="out/job/qvlm_manifest.json")["Body"].read())
    for key, entry in manifest["files"].items():
        body = s3.get_object(Bucket=s3_bucket, Key=f"out/job/{key}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == entry["sha256"]
