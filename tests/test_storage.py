"""The Storage behaviour suite, run against a local folder and against S3 on a real moto server."""

from __future__ import annotations

import hashlib
import json
import os

import boto3
import pytest

from workers.storage import (LEDGER_PREFIX, TMP_MARK, AlreadyExists, BucketNotFound, LocalStorage, NotFound,
                             S3Storage, StorageError, UnsafePath, open_model, open_storage, redact)

pytestmark = pytest.mark.smoke  # boto3 and moto at both ends of their ranges
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


def test_list_sorted_and_delete(store):
    for key in ["x/1", "x/0", "x/sub/2", "y/3", "xz"]:
        store.put_bytes(key, key.encode())
    assert store.list("x/") == ["x/0", "x/1", "x/sub/2"]
    assert store.list("x") == ["x/0", "x/1", "x/sub/2", "xz"]
    assert store.list() == ["x/0", "x/1", "x/sub/2", "xz", "y/3"]
    assert store.list("nothing/") == []
    store.delete("x/0")
    store.delete("never/was")
    assert store.list("x/") == ["x/1", "x/sub/2"]


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


# ---- the ledger: what a writer wrote, listed before it was written ----------------------------------


def _ledger_keys(store) -> set[str]:
    return {k for ledger in store.list(LEDGER_PREFIX) for k in json.loads(store.get_bytes(ledger))["keys"]}


def _writer(store):
    """Another storage object on the same root or prefix, keeping a ledger (as each qvlm writer does)."""
    twin = LocalStorage(store.root) if isinstance(store, LocalStorage) else S3Storage(store.uri, store.endpoint)
    return twin.keep_ledger()


def test_a_ledgered_writer_lists_each_key_before_writing_it(store):
    writer = _writer(store)
    writer.put_bytes("config.json", b"{}")
    writer.put_bytes("_qvlm/blocks/block-00000.json", b"{}")
    assert store.list(LEDGER_PREFIX) == [writer.ledger]
    assert _ledger_keys(store) == {"config.json", "_qvlm/blocks/block-00000.json"}
    store.put_bytes("lock.json", b"another run's")
    with pytest.raises(AlreadyExists):  # someone else's object: a lost conditional write is not listed
        writer.put_bytes("lock.json", b"ours", if_absent=True)
    assert _ledger_keys(store) == {"config.json", "_qvlm/blocks/block-00000.json"}
    writer.delete("config.json")
    assert _ledger_keys(store) == {"_qvlm/blocks/block-00000.json"}
    writer.delete("_qvlm/blocks/block-00000.json")
    assert store.list(LEDGER_PREFIX) == []  # a ledger that lists nothing is removed
    assert store.list() == ["lock.json"]


def test_a_writer_that_dies_leaves_its_ledger(store, tmp_path):
    writer, other = _writer(store), _writer(store)
    writer.put_bytes("model-00001-of-00002.safetensors", b"x")
    other.put_file("tokenizer.json", _file(tmp_path, b"{}"))
    # no manifest, no cleanup: a crash; what each wrote is still vouched for, each in its own ledger
    assert len(store.list(LEDGER_PREFIX)) == 2
    assert _ledger_keys(store) == {"model-00001-of-00002.safetensors", "tokenizer.json"}


def _file(tmp_path, data: bytes):
    path = tmp_path / "src.bin"
    path.write_bytes(data)
    return path


def test_without_a_ledger_nothing_extra_is_written(store):
    store.put_bytes("a", b"1")
    assert store.list() == ["a"]


# ---- local outputs never follow a symbolic link ------------------------------------------------------


def _everything(folder) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in folder.rglob("*")}


@pytest.fixture()
def planted(tmp_path):
    """An output whose _qvlm folder is a link to a folder elsewhere, and whose config.json links to a file."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "state.json").write_text("theirs")
    (elsewhere / "config.json").write_text("theirs too")
    out = tmp_path / "out"
    out.mkdir()
    (out / "_qvlm").symlink_to(elsewhere)
    (out / "config.json").symlink_to(elsewhere / "config.json")
    return out, elsewhere, _everything(elsewhere)


def test_a_linked_folder_inside_the_root_is_refused_for_every_operation(planted):
    out, elsewhere, before = planted
    store = LocalStorage(out).keep_ledger()
    calls = [lambda: store.put_bytes("_qvlm/state.json", b"ours"), lambda: store.put_bytes("_qvlm/new.json", b"x"),
             lambda: store.get_bytes("_qvlm/state.json"), lambda: store.exists("_qvlm/state.json"),
             lambda: store.size("_qvlm/state.json"), lambda: store.delete("_qvlm/state.json"),
             lambda: store.list("_qvlm/"), lambda: store.download("_qvlm/state.json", out.parent / "copy")]
    for call in calls:
        with pytest.raises(UnsafePath, match=f"{out}/_qvlm is a symbolic link; qvlm never follows links inside {out}"):
            call()
    with pytest.raises(UnsafePath, match=f"{out}/(_qvlm|config.json) is a symbolic link"):
        store.list("")
    assert _everything(elsewhere) == before  # nothing written, changed or deleted there


def test_a_linked_file_is_never_read_through_and_a_write_replaces_the_link_itself(planted):
    out, elsewhere, before = planted
    store = LocalStorage(out)
    with pytest.raises(UnsafePath, match=f"{out}/config.json is a symbolic link"):
        store.get_bytes("config.json")
    with pytest.raises(AlreadyExists):  # a conditional write does not follow the link either
        store.put_bytes("config.json", b"ours", if_absent=True)
    store.put_bytes("config.json", b"ours")
    assert not (out / "config.json").is_symlink() and (out / "config.json").read_bytes() == b"ours"
    store.delete("config.json")
    assert not (out / "config.json").exists() and _everything(elsewhere) == before


def test_the_root_itself_may_be_a_link_and_is_resolved_once(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real)
    store = LocalStorage(tmp_path / "alias")
    store.put_bytes("a/b", b"x")
    assert (real / "a/b").read_bytes() == b"x" and store.uri == str(tmp_path / "alias") and store.root == real


def test_a_root_in_a_symlink_loop_is_refused(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(UnsafePath, match=f"{tmp_path}/loop: cannot resolve the path"):
        LocalStorage(tmp_path / "loop")


def test_a_model_folder_of_links_is_read_through_them(tmp_path):
    # A Hugging Face cache snapshot: every file is a link into the cache's blobs.
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snapshot.mkdir()
    (blobs / "abc").write_bytes(b"{}")
    (snapshot / "config.json").symlink_to(blobs / "abc")
    model = open_model(str(snapshot))
    assert model.list() == ["config.json"] and model.get_bytes("config.json") == b"{}" and model.exists("config.json")
    with pytest.raises(UnsafePath):
        LocalStorage(snapshot).get_bytes("config.json")  # an output's storage would refuse it
