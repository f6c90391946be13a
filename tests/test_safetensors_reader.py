"""CheckpointIndex reads headers and exactly the selected tensors' bytes, locally and over S3."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from workers.safetensors_reader import INDEX_FILE, CheckpointError, CheckpointIndex
from workers.storage import LocalStorage, S3Storage

SHARDS = {
    "model-00001-of-00002.safetensors": {
        "a.weight": torch.randn(4, 3),
        "a.bias": torch.randn(5).to(torch.bfloat16),
        "b.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3) - 3,
        "b.mask": torch.tensor([True, False, True]),
        "b.empty": torch.zeros(0, 3),
    },
    "model-00002-of-00002.safetensors": {
        "c.weight": torch.randn(6, 2),
        "c.half": torch.randn(3, 3).to(torch.float16),
        "c.int8": torch.arange(-3, 4, dtype=torch.int8),
        "c.int32": torch.tensor([7, -9], dtype=torch.int32),
        "c.uint8": torch.tensor([0, 1, 254, 255], dtype=torch.uint8),
        "c.bf16": torch.randn(2, 2).to(torch.bfloat16),
    },
}
ALL = {name: t for tensors in SHARDS.values() for name, t in tensors.items()}
SUBSET = ["a.bias", "b.ids", "c.half", "c.bf16", "b.empty"]


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    for file, tensors in SHARDS.items():
        save_file(tensors, str(root / file), metadata={"format": "pt"})
    weight_map = {name: file for file, tensors in SHARDS.items() for name in tensors}
    (root / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text("{}")
    return root


@pytest.fixture(params=["local", "s3"])
def ckpt_store(request, ckpt_dir):
    if request.param == "local":
        return LocalStorage(ckpt_dir)
    endpoint, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
    store = S3Storage(f"s3://{bucket}/models/tiny", endpoint_url=endpoint)
    for path in ckpt_dir.iterdir():
        store.put_file(path.name, path)
    store.reads.clear()
    return store


def _covered(ranges):
    """Merge (start, end) pairs into a sorted list of disjoint intervals."""
    merged = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [tuple(m) for m in merged]


def test_reads_exactly_the_selected_tensors(ckpt_store):
    index = CheckpointIndex.open(ckpt_store)
    assert index.names == sorted(ALL)
    data_starts = {file: min(index.location(n).start for n in SHARDS[file]) for file in SHARDS}
    for key, start, end in ckpt_store.reads:  # headers only while opening
        assert key == INDEX_FILE or end <= data_starts[key]
    ckpt_store.reads.clear()

    got = index.read(SUBSET)
    assert sorted(got) == sorted(SUBSET)
    for name in SUBSET:
        assert got[name].dtype == ALL[name].dtype and got[name].shape == ALL[name].shape
        assert torch.equal(got[name], ALL[name]), name
    for file in SHARDS:
        wanted = _covered((index.location(n).start, index.location(n).end) for n in SUBSET
                          if index.location(n).file == file)
        read = _covered((s, e) for k, s, e in ckpt_store.reads if k == file and e > s)
        assert read == wanted, file  # no byte of an unselected tensor was read
    assert index.total_bytes(SUBSET) == sum(ALL[n].numel() * ALL[n].element_size() for n in SUBSET)


def test_adjacent_tensors_share_one_request(ckpt_store):
    index = CheckpointIndex.open(ckpt_store)
    file = "model-00002-of-00002.safetensors"
    locs = sorted((index.location(n) for n in SHARDS[file]), key=lambda loc: loc.start)
    first, second = locs[0], locs[1]
    assert first.end == second.start
    names = {n for n in SHARDS[file] if index.location(n) in (first, second)}
    ckpt_store.reads.clear()
    got = index.read(names)
    assert ckpt_store.reads == [(file, first.start, second.end)]
    assert all(torch.equal(got[n], ALL[n]) for n in names)


def test_read_all_and_total_bytes(ckpt_store):
    index = CheckpointIndex.open(ckpt_store)
    got = index.read(index.names)
    assert all(torch.equal(got[n], ALL[n]) and got[n].dtype == ALL[n].dtype for n in ALL)
    assert index.total_bytes() == sum(t.numel() * t.element_size() for t in ALL.values())
    assert len([r for r in ckpt_store.reads if r[0] in SHARDS]) == 2 * 2 + 2  # headers + one run per file


def test_unknown_name_is_a_key_error(ckpt_store):
    index = CheckpointIndex.open(ckpt_store)
    with pytest.raises(KeyError, match="no.such.tensor"):
        index.read(["a.weight", "no.such.tensor"])
    with pytest.raises(KeyError, match="no.such.tensor"):
        index.location("no.such.tensor")


def test_single_file_under_a_prefix(tmp_path):
    tensors = {"w": torch.randn(3, 2), "n": torch.tensor([1, 2], dtype=torch.int64)}
    (tmp_path / "sub").mkdir()
    save_file(tensors, str(tmp_path / "sub" / "model.safetensors"))
    index = CheckpointIndex.open(LocalStorage(tmp_path), prefix="sub")
    assert index.location("w").file == "sub/model.safetensors"
    got = index.read(["n"])
    assert torch.equal(got["n"], tensors["n"]) and got["n"].dtype == torch.int64


def test_missing_safetensors_is_a_clear_error(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not a pickle we would ever load")
    with pytest.raises(CheckpointError, match=r"no model.safetensors or model.safetensors.index.json under "
                                              r".*convert .bin/.pt checkpoints first"):
        CheckpointIndex.open(LocalStorage(tmp_path))


def _write_raw(path, header: bytes, length: int | None = None, tail: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + tail)


@pytest.mark.parametrize("case, match", [
    ("length", "header length 1000000 does not fit"),
    ("json", "invalid JSON"),
    ("offsets", "'w' ends at byte .* beyond the end of the file"),
    ("size", "'w' has 8 bytes but shape"),
    ("dtype", "'w' has an unsupported or missing dtype"),
    ("short", "shorter than the 8-byte length"),
    ("overlap", "tensors 'w' and 'v' overlap \\(data bytes 8..16 belong to both\\)"),
    ("bool", "'w' has invalid data_offsets \\[False, 16\\]"),
])
def test_corrupt_header_names_the_file(tmp_path, case, match):
    path = tmp_path / "model.safetensors"
    good = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    if case == "length":
        _write_raw(path, json.dumps(good).encode(), length=1_000_000, tail=bytes(16))
    elif case == "json":
        _write_raw(path, b"{not json", tail=bytes(16))
    elif case == "offsets":
        _write_raw(path, json.dumps(good).encode(), tail=bytes(8))
    elif case == "size":
        _write_raw(path, json.dumps({"w": {**good["w"], "data_offsets": [0, 8]}}).encode(), tail=bytes(16))
    elif case == "dtype":
        _write_raw(path, json.dumps({"w": {**good["w"], "dtype": "PICKLE"}}).encode(), tail=bytes(16))
    elif case == "overlap":  # each entry is well formed on its own; only together do they alias bytes
        v = {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}
        _write_raw(path, json.dumps({**good, "v": v}).encode(), tail=bytes(24))
    elif case == "bool":  # JSON false is not a byte offset, though Python counts it as the int 0
        _write_raw(path, json.dumps({"w": {**good["w"], "data_offsets": [False, 16]}}).encode(), tail=bytes(16))
    else:
        path.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match=f"model.safetensors.*{match}|{match}.*model.safetensors"):
        CheckpointIndex.open(LocalStorage(tmp_path))


def test_index_naming_a_missing_tensor_is_an_error(tmp_path):
    save_file({"w": torch.ones(2)}, str(tmp_path / "m.safetensors"))
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"w": "m.safetensors", "v": "m.safetensors"}}))
    with pytest.raises(CheckpointError, match="'v' to m.safetensors"):
        CheckpointIndex.open(LocalStorage(tmp_path))


def test_index_cannot_escape_the_root(tmp_path):
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"w": "../outside.safetensors"}}))
    with pytest.raises(CheckpointError, match="'../outside.safetensors', which is not a file name inside the model"):
        CheckpointIndex.open(LocalStorage(tmp_path))


def test_adjacent_ranges_merge_up_to_the_request_cap():
    from workers.safetensors_reader import TensorLocation, _coalesce

    locs = [TensorLocation("f", "F32", (10,), 8 + 40 * i, 8 + 40 * (i + 1)) for i in range(10)]
    assert [(s, e) for s, e, _ in _coalesce(locs)] == [(8, 408)]
    runs = _coalesce(locs, max_bytes=100)
    assert [(s, e) for s, e, _ in runs] == [(8, 88), (88, 168), (168, 248), (248, 328), (328, 408)]
    assert [loc for _, _, members in runs for loc in members] == locs


def test_tensors_that_only_touch_are_accepted(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "v": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
              "e": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]}}  # empty: owns no byte
    _write_raw(tmp_path / "model.safetensors", json.dumps(header).encode(), tail=struct.pack("<4f", 1, 2, 3, 4))
    tensors = CheckpointIndex.open(LocalStorage(tmp_path)).read(["w", "v", "e"])
    assert tensors["w"].tolist() == [1, 2] and tensors["v"].tolist() == [3, 4] and tensors["e"].numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e5m2])
@pytest.mark.parametrize("bad, counts", [(float("nan"), "2 NaN and 0 infinite"), (float("inf"), "0 NaN and 2 infinite")])
def test_non_finite_weights_are_refused_naming_tensor_and_file(tmp_path, dtype, bad, counts):
    weight = torch.ones(3, 4)
    weight[0, 1] = weight[2, 3] = bad
    save_file({"ok.weight": torch.ones(2, 2).to(dtype), "bad.weight": weight.to(dtype),
               "ids": torch.arange(3)}, str(tmp_path / "model.safetensors"))
    index = CheckpointIndex.open(LocalStorage(tmp_path))
    assert index.read(["ok.weight", "ids"])["ids"].tolist() == [0, 1, 2]  # finite tensors and integers read as ever
    with pytest.raises(CheckpointError, match=f"non-finite weights in {tmp_path}/model.safetensors: tensor "
                                              f"'bad.weight' holds {counts} values of 12"):
        index.read(["ok.weight", "bad.weight"])


@pytest.mark.parametrize("metadata", [{"format": "pt"}, None])
def test_the_writer_makes_the_librarys_bytes_and_lets_each_tensor_go(metadata):
    from safetensors.torch import save

    from workers.safetensors_reader import DTYPES
    from workers.safetensors_writer import safetensors_bytes

    generator = torch.Generator().manual_seed(0)
    tensors = {f"{name.lower()}.w": torch.randint(0, 2, (3, k + 1), generator=generator).to(dtype)
               for k, (name, dtype) in enumerate(DTYPES.items())}  # every dtype, in an order that is not the file's
    tensors.update(ALL)
    given = dict(tensors)
    assert bytes(safetensors_bytes(given, metadata)) == save(tensors, metadata)
    assert given == {}


def test_the_writer_refuses_a_dtype_safetensors_does_not_store():
    from workers.safetensors_writer import safetensors_bytes

    with pytest.raises(ValueError, match="'z'.*complex64"):
        safetensors_bytes({"a": torch.zeros(2), "z": torch.zeros(2, dtype=torch.complex64)})
