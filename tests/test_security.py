"""Security: a model's own code never runs, only safetensors are read (never a pickle), credentials never
reach any output, log or message, and no name can put an object outside the output prefix."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import quote

import pytest
import torch
import yaml
from typer.testing import CliRunner

from jobs.cli import app
from workers.storage import LocalStorage, S3Storage, check_key, redact

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()

FAKE_KEY_ID = "AKIAQVLMFAKEKEY12345"
FAKE_SECRET = "qvlmFakeSecret/abc+XYZ0123456789abcdefgh"  # 40 characters, like a real secret key
FAKE_TOKEN = "qvlmFakeSessionToken" + "IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJHMEUCIQD" * 5
ENDPOINT_PASSWORD = "qvlmEndpointPassw0rd"  # the user:password@ of an endpoint URL
SECRETS = (FAKE_KEY_ID, FAKE_SECRET, FAKE_TOKEN, quote(FAKE_SECRET, safe=""), quote(FAKE_TOKEN, safe=""),
           FAKE_TOKEN[:40], "qvlmFakeSecret", "qvlmFakeSessionToken", ENDPOINT_PASSWORD)


def _with_userinfo(endpoint: str) -> str:
    """``endpoint`` with a user and password in it; botocore sends neither (S3 signs with the credential chain)."""
    scheme, rest = endpoint.split("://", 1)
    return f"{scheme}://qvlm:{ENDPOINT_PASSWORD}@{rest}"


def _job(tmp_path: Path, model_path, output_uri, name: str = "security", **sections) -> Path:
    job = {"name": name, "model": {"path": str(model_path)}, "output": {"uri": str(output_uri)},
           "calibration": {"samples": 4, "eval_samples": 0, "max_length": 64, "batch_size": 4},
           "quantization": {"method": "rtn"}, "resources": {"workers": 2}}
    for section, fields in sections.items():
        job.setdefault(section, {}).update(fields)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def _model_copy(tiny: Path, dest: Path) -> Path:
    shutil.copytree(tiny, dest)
    return dest


# ---- trust_remote_code ----------------------------------------------------------------------------


def _python_files():
    for package in ("jobs", "cluster", "workers", "qvlm"):
        yield from sorted((ROOT / package).rglob("*.py"))


def test_no_code_path_passes_trust_remote_code():
    """transformers' default is off; qvlm never passes the flag on, so no job turns it on behind the user's back."""
    passing = [f"{path.relative_to(ROOT)}:{node.lineno}" for path in _python_files()
               for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.keyword) and node.arg == "trust_remote_code"]
    assert passing == []
    mentions = {str(p.relative_to(ROOT)) for p in _python_files() if "trust_remote_code" in p.read_text()}
    assert mentions == {"jobs/spec.py", "jobs/cli.py"}  # the job field and the warning, nothing else


def _remote_code_model(tiny: Path, dest: Path, marker: Path) -> Path:
    """A model folder whose config asks for code shipped with it; importing that code creates ``marker``."""
    model = _model_copy(tiny, dest)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="qvlm-remote", architectures=["RemoteModel"],
                  auto_map={"AutoConfig": "remote_code.RemoteConfig", "AutoModel": "remote_code.RemoteModel"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "remote_code.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    return model


@pytest.mark.parametrize("trust", [False, True])
def test_a_model_with_its_own_code_is_refused_and_the_code_never_runs(tmp_path, tiny_llava_dir, trust):
    marker = tmp_path / "remote-code-ran"
    model = _remote_code_model(Path(tiny_llava_dir), tmp_path / "model", marker)
    job = _job(tmp_path, model, tmp_path / "out", model={"trust_remote_code": trust})
    result = runner.invoke(app, ["submit", str(job)])
    assert result.exit_code == 2, result.output
    assert f"error: {model}/config.json: model_type 'qvlm-remote' is not a model transformers" in result.output
    assert "qvlm never runs code downloaded with a model" in result.output
    assert ("WARNING: trust_remote_code is ON" in result.output) is trust
    assert not marker.exists() and not (tmp_path / "out").exists()


def _warning_index(output: str) -> int:
    lines = output.splitlines()
    found = [i for i, line in enumerate(lines) if line.startswith("WARNING: trust_remote_code is ON")]
    assert len(found) == 1, output
    return found[0]


def test_plan_says_loudly_when_trust_remote_code_is_on(tmp_path, tiny_llava_dir):
    off = runner.invoke(app, ["plan", str(_job(tmp_path, tiny_llava_dir, tmp_path / "out"))])
    assert off.exit_code == 0 and "trust_remote_code" not in off.output
    on = runner.invoke(app, ["plan", str(_job(tmp_path, tiny_llava_dir, tmp_path / "out",
                                              model={"trust_remote_code": True}))])
    assert on.exit_code == 0, on.output
    lines = on.output.splitlines()
    model_line = next(i for i, line in enumerate(lines) if line.startswith("model: LlavaForConditionalGeneration"))
    assert _warning_index(on.output) < model_line  # before the plan itself
    assert "(model.trust_remote_code: true in the job file)" in on.output


@pytest.mark.parametrize("dry_run", [False, True])
def test_submit_says_loudly_when_trust_remote_code_is_on(tmp_path, tiny_llava_dir, dry_run):
    # A group size that fits no layer stops the job before any cluster work, after the warning.
    job = _job(tmp_path, tiny_llava_dir, tmp_path / "out", model={"trust_remote_code": True},
               quantization={"weights": {"group_size": 512}})
    result = runner.invoke(app, ["submit", str(job), *(["--dry-run"] if dry_run else [])])
    assert result.exit_code == 2, result.output
    error = next(i for i, line in enumerate(result.output.splitlines()) if line.startswith("error:"))
    assert _warning_index(result.output) < error
    assert not (tmp_path / "out").exists()


# ---- only safetensors -----------------------------------------------------------------------------


class _Trap:
    """Unpickling this creates ``marker``: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _trap_checkpoint(path: Path, marker: Path) -> Path:
    """A real ``torch.save`` of a state dict that also carries the trap."""
    torch.save({"model.embed_tokens.weight": torch.zeros(4, 4), "trap": _Trap(marker)}, path)
    return path


def test_the_trap_works(tmp_path):
    marker = tmp_path / "unpickled"
    torch.load(_trap_checkpoint(tmp_path / "trap.bin", marker), weights_only=False)
    assert marker.exists()


def test_a_pickle_only_model_is_refused_without_unpickling(tmp_path, tiny_llava_dir):
    marker = tmp_path / "unpickled"
    model = _model_copy(Path(tiny_llava_dir), tmp_path / "model")
    for path in model.glob("model*.safetensors*"):
        path.unlink()
    _trap_checkpoint(model / "pytorch_model.bin", marker)
    for command in ("plan", "submit"):
        result = runner.invoke(app, [command, str(_job(tmp_path, model, tmp_path / "out"))])
        assert result.exit_code == 2, result.output
        line = result.output.strip().splitlines()[-1]
        assert line.startswith(f"error: model.path: no model.safetensors or model.safetensors.index.json under {model}")
        assert f"only {model}/pytorch_model.bin (a pickle file, never opened" in line
        assert "qvlm reads only safetensors" in line and "Traceback" not in result.output
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_pickle_beside_the_safetensors_is_never_opened(tmp_path, tiny_llava_dir):
    marker = tmp_path / "unpickled"
    model = _model_copy(Path(tiny_llava_dir), tmp_path / "model")
    _trap_checkpoint(model / "pytorch_model.bin", marker)
    result = runner.invoke(app, ["plan", str(_job(tmp_path, model, tmp_path / "out"))])
    assert result.exit_code == 0, result.output
    assert not marker.exists()


# ---- credentials ----------------------------------------------------------------------------------


def _presigned(signature_version: str) -> str:
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(aws_access_key_id=FAKE_KEY_ID, aws_secret_access_key=FAKE_SECRET,
                                    aws_session_token=FAKE_TOKEN, region_name="us-east-1")
    client = session.client("s3", endpoint_url="http://127.0.0.1:9", config=Config(signature_version=signature_version))
    return client.generate_presigned_url("get_object", Params={"Bucket": "models", "Key": "llava/config.json"})


def _leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


@pytest.mark.parametrize("signature_version", ["s3v4", "s3"])
def test_redact_removes_signed_url_queries(signature_version):
    url = _presigned(signature_version)
    assert FAKE_KEY_ID in url or "X-Amz-Credential" in url  # the URL really carries credentials
    for text in (url, f"GET {url} failed", f"'{url}'"):
        cleaned = redact(text)
        assert _leaks(cleaned) == [] and "Signature" not in cleaned, cleaned
        assert "127.0.0.1:9/models/llava/config.json?[REDACTED]" in cleaned


@pytest.mark.parametrize("template", [
    "AWS_ACCESS_KEY_ID={key} AWS_SECRET_ACCESS_KEY={secret} AWS_SESSION_TOKEN={token}",
    "aws_access_key_id = {key}\naws_secret_access_key = {secret}\naws_session_token = {token}",
    "{{'aws_secret_access_key': '{secret}', 'aws_session_token': '{token}'}}",
    "headers {{'X-Amz-Security-Token': '{short}', 'X-Amz-Date': '20260101T000000Z'}}",
    "Authorization: AWS4-HMAC-SHA256 Credential={key}/20260101/us-east-1/s3/aws4_request, "
    "SignedHeaders=host;x-amz-date, Signature=0b0d3c9a1e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b",
    "X-Amz-Credential={key}%2F20260101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Security-Token={qtoken}",
    "the secret is {secret}, the token {token}",
])
def test_redact_removes_secret_values(template):
    text = template.format(key=FAKE_KEY_ID, secret=FAKE_SECRET, token=FAKE_TOKEN, short=FAKE_TOKEN[:60],
                           qtoken=quote(FAKE_TOKEN, safe=""))
    assert _leaks(redact(text)) == [], redact(text)


@pytest.mark.parametrize("text", [
    "cannot reach http://qvlm:{p}@127.0.0.1:9000/bucket",
    "endpoint_url: 'https://admin:{p}@minio.internal:9000'",
    "Could not connect to the endpoint URL: \"http://qvlm:{p}@10.0.0.1/b?list-type=2\"",
    "s3://u:{p}@bucket/key",
])
def test_redact_removes_the_password_of_a_url(text):
    cleaned = redact(text.format(p=ENDPOINT_PASSWORD))
    assert ENDPOINT_PASSWORD not in cleaned and "qvlm:" not in cleaned and "[REDACTED]@" in cleaned, cleaned


def test_redact_keeps_urls_without_userinfo():
    for text in ("http://127.0.0.1:9000/bucket", "s3://bucket/a@b/c", "git@github.com:org/repo"):
        assert redact(text) == text


def test_redact_keeps_checksums():
    sha256, sha1 = "9f" * 32, "0123456789abcdef0123456789abcdef01234567"
    assert redact(f"sha256 {sha256} commit {sha1}") == f"sha256 {sha256} commit {sha1}"


def _fake_credentials_env(endpoint: str, ray_tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=FAKE_KEY_ID, AWS_SECRET_ACCESS_KEY=FAKE_SECRET, AWS_SESSION_TOKEN=FAKE_TOKEN,
               AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true", AWS_ENDPOINT_URL=_with_userinfo(endpoint),
               RAY_TMPDIR=str(ray_tmp))  # Ray writes its session logs here, so the test can read them all
    return env


def _submit(job: Path, env: dict) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "qvlm-submit"
    return subprocess.run([str(exe), str(job)], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


def _everything_under(s3, bucket: str, prefix: str) -> dict[str, bytes]:
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    return {key: s3.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


def _files_under(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file() and not p.is_symlink()}


def _leaks_in(blobs: dict[str, bytes]) -> list[str]:
    return [f"{name}: {s[:24]}..." for name, blob in blobs.items() for s in SECRETS if s.encode() in blob]


def _upload(s3, folder: Path, bucket: str, prefix: str) -> None:
    for path in folder.iterdir():
        s3.upload_file(str(path), bucket, f"{prefix}/{path.name}")


def test_refused_s3_jobs_do_not_echo_credentials(tmp_path, tiny_llava_dir, s3_server, s3_bucket, monkeypatch):
    import boto3

    s3 = boto3.session.Session().client("s3", endpoint_url=s3_server, region_name="us-east-1")
    _upload(s3, Path(tiny_llava_dir), s3_bucket, "models/broken")
    s3.put_object(Bucket=s3_bucket, Key="models/broken/model-00001-of-00004.safetensors", Body=b"\x10" + b"\0" * 7)
    for name, value in _fake_credentials_env(s3_server, tmp_path).items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    model = f"s3://{s3_bucket}/models/broken"
    for output, expected in (("s3://qvlm-no-such-bucket/out", "output.uri: bucket 'qvlm-no-such-bucket' does not exist"),
                             (f"s3://{s3_bucket}/out/broken", f"model.path: corrupt safetensors header in {model}/")):
        result = runner.invoke(app, ["submit", str(_job(tmp_path, model, output)), "--debug"])
        assert result.exit_code == 2 and expected in result.output, result.output
        assert _leaks(result.output) == []  # not even in the --debug traceback
    assert _everything_under(s3, s3_bucket, "out/") == {}


@pytest.mark.slow
def test_credentials_never_reach_outputs_logs_or_messages(tmp_path, tiny_llava_dir, s3_server, s3_bucket):
    import boto3

    s3 = boto3.session.Session().client("s3", endpoint_url=s3_server, region_name="us-east-1")
    model = _model_copy(Path(tiny_llava_dir), tmp_path / "model")
    marker = tmp_path / "unpickled"
    _trap_checkpoint(model / "pytorch_model.bin", marker)  # beside the safetensors: the whole job must ignore it
    _upload(s3, model, s3_bucket, "models/tiny")
    ray_tmp = Path(tempfile.mkdtemp(prefix="qvlm-ray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    try:
        job = _job(tmp_path, f"s3://{s3_bucket}/models/tiny", f"s3://{s3_bucket}/out/ok", calibration={"eval_samples": 2})
        done = _submit(job, _fake_credentials_env(s3_server, ray_tmp))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        outputs = _everything_under(s3, s3_bucket, "out/")
        assert {"out/ok/qvlm_manifest.json", "out/ok/_qvlm/state.json", "out/ok/qvlm_report.json"} <= set(outputs)
        messages = {"stdout": done.stdout.encode(), "stderr": done.stderr.encode()}
        ray_logs = _files_under(ray_tmp)
        assert any("/logs/worker-" in name and b"StageWorker" in blob for name, blob in ray_logs.items())
        assert _leaks_in(outputs) + _leaks_in(messages) + _leaks_in(ray_logs) == []
        assert not marker.exists()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.parametrize("debug", [False, True])
def test_an_endpoint_password_is_never_printed(tmp_path, tiny_llava_dir, monkeypatch, debug):
    flags = ["--debug"] if debug else []
    # in the job file: refused, naming the field, with the password blanked even in what was "got"
    job = _job(tmp_path, tiny_llava_dir, "s3://bucket/out", output={"endpoint_url": _with_userinfo("http://127.0.0.1:1")})
    result = runner.invoke(app, ["submit", str(job), *flags])
    assert result.exit_code == 2 and "output.endpoint_url: must not hold a user or password" in result.output
    assert _leaks(result.output) == [], result.output
    # from the environment (AWS_ENDPOINT_URL): every message about the endpoint shows it redacted
    monkeypatch.setenv("AWS_ENDPOINT_URL", _with_userinfo("http://127.0.0.1:1"))
    for name, value in (("AWS_ACCESS_KEY_ID", FAKE_KEY_ID), ("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)):
        monkeypatch.setenv(name, value)
    job = _job(tmp_path, tiny_llava_dir, "s3://bucket/out")
    result = runner.invoke(app, ["submit", str(job), *flags])
    assert result.exit_code == 2, result.output
    assert "output.uri: cannot reach the S3 endpoint http://[REDACTED]@127.0.0.1:1" in result.output
    assert _leaks(result.output) == [], result.output
    assert not (tmp_path / "out").exists()


# ---- names and keys cannot escape the output prefix ------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "a/../../b", "/abs", "..", "a\x00b", "a\\b", "out/job", "."])
def test_job_names_that_could_escape_are_refused(tmp_path, tiny_llava_dir, name):
    result = runner.invoke(app, ["submit", str(_job(tmp_path, tiny_llava_dir, tmp_path / "out", name=name))])
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert f"{tmp_path}/job.yaml:1: name: must be 1-63 lowercase letters, digits or '-'" in line
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


BAD_KEYS = ["../x", "a/../../x", "a/..", "..", ".", "/etc/passwd", "a//b", "a/./b", "a\\..\\b", "a\x00b", "", "a/"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_check_key_refuses_traversal(key):
    with pytest.raises(ValueError, match="invalid storage key"):
        check_key(key)


def test_check_key_accepts_plain_keys():
    for key in ("config.json", "_qvlm/blocks/00003.safetensors", "a..b/c", "..hidden"):
        assert check_key(key) == key


def test_local_storage_cannot_write_or_read_outside_its_root(tmp_path):
    root, outside = tmp_path / "out", tmp_path / "secret.txt"
    outside.write_text("keep")
    store = LocalStorage(root)
    for key in ("../secret.txt", "a/../../secret.txt", str(outside), "..\\secret.txt"):
        with pytest.raises(ValueError, match="invalid storage key"):
            store.put_bytes(key, b"overwritten")
        with pytest.raises(ValueError, match="invalid storage key"):
            store.get_bytes(key)
        with pytest.raises(ValueError, match="invalid storage key"):
            store.delete(key)
    assert outside.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.txt"]  # not even the root was created


def test_s3_storage_cannot_write_outside_its_prefix(s3_server, s3_bucket):
    store = S3Storage(f"s3://{s3_bucket}/out/job", s3_server)
    store.client.put_object(Bucket=s3_bucket, Key="out/other/secret.txt", Body=b"keep")
    for key in ("../other/secret.txt", "a/../../other/secret.txt", "/out/other/secret.txt", "..", "a\\..\\b"):
        with pytest.raises(ValueError, match="invalid storage key"):
            store.put_bytes(key, b"overwritten")
        with pytest.raises(ValueError, match="invalid storage key"):
            store.delete(key)
    keys = [o["Key"] for o in store.client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == ["out/other/secret.txt"]
    assert store.client.get_object(Bucket=s3_bucket, Key="out/other/secret.txt")["Body"].read() == b"keep"
