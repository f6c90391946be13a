"""cluster.verify: an output folder checked against its qvlm_manifest.json."""

from __future__ import annotations

import hashlib
import json

import pytest

from cluster.verify import MANIFEST_KEY, verify_output
from workers.storage import CHUNK, open_storage

FILES = {"qvlm_plan.json": b'{"job": "t"}', "_qvlm/blocks/block-00000.safetensors": bytes(range(256)) * 9000}


@pytest.fixture()
def output(tmp_path):
    out = open_storage(str(tmp_path))
    files = {key: {"sha256": out.put_bytes(key, data), "size": len(data)} for key, data in FILES.items()}
    out.put_bytes(MANIFEST_KEY, json.dumps({"job": "t", "spec_hash": "h" * 64, "files": files}).encode())
    return out, tmp_path


def test_intact_output_has_no_problems(output):
    out, _ = output
    assert verify_output(out) == []
    shard = "_qvlm/blocks/block-00000.safetensors"
    assert len(FILES[shard]) > CHUNK  # the shard is read in several ranged chunks
    assert sum(1 for key, _, _ in out.reads if key == shard) > 1


def test_flipped_byte_is_a_sha_mismatch(output):
    out, root = output
    path = root / "_qvlm/blocks/block-00000.safetensors"
    data = bytearray(path.read_bytes())
    data[CHUNK + 7] ^= 0x01
    path.write_bytes(bytes(data))
    problems = verify_output(out)
    assert len(problems) == 1
    assert "_qvlm/blocks/block-00000.safetensors" in problems[0] and "sha256" in problems[0]


def test_missing_and_resized_files(output):
    out, root = output
    (root / "_qvlm/blocks/block-00000.safetensors").unlink()
    (root / "qvlm_plan.json").write_bytes(b'{"job": "t", "x": 1}')
    problems = verify_output(out)
    assert len(problems) == 2
    assert any("block-00000.safetensors" in p and "missing" in p for p in problems)
    assert any("qvlm_plan.json" in p and "size" in p for p in problems)


def test_missing_manifest_means_unfinished(output):
    out, root = output
    (root / MANIFEST_KEY).unlink()
    [problem] = verify_output(out)
    assert MANIFEST_KEY in problem and "did not finish" in problem


def test_manifest_sha_is_checked_not_just_present(tmp_path):
    out = open_storage(str(tmp_path))
    out.put_bytes("a.bin", b"abc")
    wrong = hashlib.sha256(b"abd").hexdigest()
    out.put_bytes(MANIFEST_KEY, json.dumps({"job": "t", "spec_hash": "x", "files": {"a.bin": {"sha256": wrong, "size": 3}}}).encode())
    assert ["a.bin" in p for p in verify_output(out)] == [True]
