"""The Storage behaviour suite, run against a local folder and against S3 on a real moto server."""

from __future__ import annotations

import hashlib
import os

import boto3
import pytest

from workers.storage import (TMP_MARK, AlreadyExists, BucketNotFound, LocalStorage, NotFound, S3Storage,
                             StorageError, open_storage, redact)

MiB = 1 << 20


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "root")
    endpoint, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
    return S3Storage(f"s3://{bucket}/runs/one", endpoint_url=endpoint, multipart_threshold=5 * MiB)


def _client(endpoint):
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1")


def test_round_trip_with_sha256(store):
    data = b"hello \x00 world" * 100
    sha = store.put_bytes("a/b.bin", data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert store.get_bytes("a/b.bin", sha) == data
    assert store.exists("a/b.bin") and not store.exists("a/c.bin")
    assert store.size("a/b.bin") == len(data)
    assert store.reads == [("a/b.bin", 0, len(data))]
    with pytest.raises(NotFound, match="a/c.bin"):
        store.get_bytes("a/c.bin")


def test_overwrite_replaces(store):
    store.put_bytes("k", b"one")
    store.put_bytes("k", b"two")
    assert store.get_bytes("k") == b"two"


def test_checksum_mismatch_raises(store, tmp_path):
    store.put_bytes("a.bin", b"payload")
    wrong = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(StorageError, match="checksum mismatch for a.bin"):
        store.get_bytes("a.bin", wrong)
    dest = tmp_path / "out" / "a.bin"
    with pytest.raises(StorageError, match="checksum mismatch for a.bin"):
        store.download("a.bin", dest, wrong)
    assert not dest.exists()
    store.download("a.bin", dest, hashlib.sha256(b"payload").hexdigest())
    assert dest.read_bytes() == b"payload"


def test_if_absent_refuses_second_write(store):
    store.put_bytes("manifest.json", b"first", if_absent=True)
    with pytest.raises(AlreadyExists, match="manifest.json"):
        store.put_bytes("manifest.json", b"second", if_absent=True)
    assert store.get_bytes("manifest.json") == b"first"
    if isinstance(store, S3Storage):
        assert store._conditional is True  # moto honours IfNoneMatch="*" (412 PreconditionFailed)
        assert store.list("") == ["manifest.json"]  # the probe object is gone


def test_s3_if_absent_fallback_without_conditional_writes(s3_server, s3_bucket):
    store = S3Storage(f"s3://{s3_bucket}/f", endpoint_url=s3_server)
    store._conditional = False  # as if the server ignored IfNoneMatch
    store.put_bytes("m.json", b"first", if_absent=True)
    with pytest.raises(AlreadyExists):
        store.put_bytes("m.json", b"second", if_absent=True)
    assert store.get_bytes("m.json") == b"first"


def test_ranged_reads(store):
    data = bytes(range(256)) * 4
    store.put_bytes("r.bin", data)
    assert store.get_range("r.bin", 10, 20) == data[10:20]
    assert store.get_range("r.bin", 1000, 1024) == data[1000:]
    assert store.get_range("r.bin", 5, 5) == b""
    assert store.reads == [("r.bin", 10, 20), ("r.bin", 1000, 1024), ("r.bin", 5, 5)]
    with pytest.raises(StorageError, match="beyond the end of .*r.bin"):
        store.get_range("r.bin", 1000, 1100)
    with pytest.raises(StorageError, match="beyond the end of .*r.bin"):
        store.get_range("r.bin", 2000, 2100)


def test_list_sorted_and_delete_prefix(store):
    for key in ["x/1", "x/0", "x/sub/2", "y/3", "xz"]:
        store.put_bytes(key, key.encode())
    assert store.list("x/") == ["x/0", "x/1", "x/sub/2"]
    assert store.list("x") == ["x/0", "x/1", "x/sub/2", "xz"]
    assert store.list() == ["x/0", "x/1", "x/sub/2", "xz", "y/3"]
    assert store.list("nothing/") == []
    store.delete("x/0")
    store.delete("never/was")
    assert store.list("x/") == ["x/1", "x/sub/2"]
    store.delete_prefix("x/")
    assert store.list() == ["xz", "y/3"]
    with pytest.raises(ValueError, match="non-empty prefix"):
        store.delete_prefix("")


def test_put_file_multipart_keeps_sha256(store, tmp_path):
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(6 * MiB + 123))
    sha = store.put_file("shards/big.bin", src)
    assert sha == hashlib.sha256(src.read_bytes()).hexdigest()
    assert store.size("shards/big.bin") == 6 * MiB + 123
    dest = tmp_path / "back.bin"
    store.download("shards/big.bin", dest, sha)
    assert dest.read_bytes() == src.read_bytes()
    if isinstance(store, S3Storage):
        head = store.client.head_object(Bucket=store.bucket, Key="runs/one/shards/big.bin")
        assert head["ETag"].strip('"').endswith("-2")  # two parts: 5 MiB + the rest
        assert head["Metadata"]["sha256"] == sha


BAD_KEYS = ["../x", "/abs", "a\\b", "", "a/../b", "./a", "a//b", "a/", "a\x00b", "a\nb"]


def test_bad_keys_refused(store, tmp_path):
    for key in BAD_KEYS:
        for call in (lambda: store.put_bytes(key, b"x"), lambda: store.get_range(key, 0, 1),
                     lambda: store.exists(key), lambda: store.delete(key)):
            with pytest.raises(ValueError, match="invalid storage key"):
                call()
    assert store.list() == []
    assert not (tmp_path / "x").exists() and not os.path.exists("/abs")


def test_local_writes_leave_no_temp_files(tmp_path):
    store = LocalStorage(tmp_path)
    store.put_bytes("d/a", b"1")
    with pytest.raises(AlreadyExists):
        store.put_bytes("d/a", b"2", if_absent=True)
    (tmp_path / "d" / f"{TMP_MARK}b.123").write_bytes(b"partial")  # a crashed writer's leftover
    assert store.list() == ["d/a"]
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [f"{TMP_MARK}b.123", "a"]


def test_s3_keys_live_under_the_prefix(s3_server, s3_bucket):
    S3Storage(f"s3://{s3_bucket}/p/q", endpoint_url=s3_server).put_bytes("k.json", b"{}")
    listed = _client(s3_server).list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert [o["Key"] for o in listed] == ["p/q/k.json"]
    assert S3Storage(f"s3://{s3_bucket}", endpoint_url=s3_server).list() == ["p/q/k.json"]


def test_missing_bucket_message(s3_server):
    store = S3Storage("s3://no-such-bucket-qvlm/out", endpoint_url=s3_server)
    with pytest.raises(BucketNotFound, match=r"bucket 'no-such-bucket-qvlm' does not exist \(create it"):
        store.put_bytes("a", b"x")
    with pytest.raises(BucketNotFound, match="bucket 'no-such-bucket-qvlm' does not exist"):
        store.exists("a")


def test_missing_credentials_message(s3_server, s3_bucket, monkeypatch, tmp_path):
    for var in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN"]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = S3Storage(f"s3://{s3_bucket}/x", endpoint_url=s3_server, max_attempts=1)
    with pytest.raises(StorageError, match="no AWS credentials found: set AWS_ACCESS_KEY_ID"):
        store.put_bytes("a", b"x")


def test_unreachable_endpoint_message(s3_server):
    store = S3Storage("s3://b/x", endpoint_url="http://127.0.0.1:1", max_attempts=1)
    with pytest.raises(StorageError, match=r"cannot reach the S3 endpoint http://127\.0\.0\.1:1"):
        store.get_bytes("a")


def test_endpoint_from_environment(s3_server, s3_bucket, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    store = open_storage(f"s3://{s3_bucket}/e")
    assert isinstance(store, S3Storage) and store.endpoint == s3_server
    store.put_bytes("k", b"v")
    assert store.get_bytes("k") == b"v"


def test_open_storage_schemes(tmp_path):
    assert isinstance(open_storage(str(tmp_path)), LocalStorage)
    local = open_storage(f"file://{tmp_path}/sub")
    assert isinstance(local, LocalStorage) and local.uri == f"{tmp_path}/sub"
    with pytest.raises(StorageError, match="unsupported storage URI"):
        open_storage("gs://bucket/x")


def test_redact_removes_planted_secrets():
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    token = "FwoGZXIvYXdzE" + "A" * 150
    text = (f"failed with AKIAIOSFODNN7EXAMPLE and {secret}, token={token} at "
            "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAX%2F2024"
            "&X-Amz-Signature=deadbeef00 and aws_secret_access_key = hunter2; sha "
            + "ab" * 32 + " commit " + "0123456789abcdef0123456789abcdef01234567")
    out = redact(text)
    for leaked in ["AKIAIOSFODNN7EXAMPLE", secret, token[:40], "X-Amz-Signature", "deadbeef00", "hunter2",
                   "X-Amz-Credential"]:
        assert leaked not in out
    assert "ab" * 32 in out and "0123456789abcdef0123456789abcdef01234567" in out
    assert "https://b.s3.amazonaws.com/k?[REDACTED]" in out
