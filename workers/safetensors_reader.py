"""Read only the tensors a worker needs from a safetensors checkpoint, local or on S3.

A safetensors file is an 8-byte little-endian header length, a JSON header (per tensor: dtype, shape,
data_offsets relative to the end of the header) and the raw bytes. We read the headers with ranged reads,
then fetch exactly the byte ranges of the wanted tensors. Nothing is ever unpickled.

A header is validated before any tensor is read: known dtypes, shapes of non-negative integers, each tensor's
bytes inside the data section, exactly dtype size x elements long, and no two tensors sharing a byte. A tensor
read as floating point must hold finite values only: a NaN or an infinity in a weight would quantize to
garbage that looks like a checkpoint, so it is refused naming the tensor and its file.
"""

from __future__ import annotations

import json
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable

import torch

from workers.storage import Storage, StorageError, check_key

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER = 100 << 20  # the safetensors library's own limit
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_REDOWNLOAD = "re-download the model or re-save it with save_pretrained"

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class CheckpointError(StorageError):
    """The checkpoint is missing, its safetensors headers are corrupt or its weights are not finite (exit 2: the
    model is the job's input)."""

    category = "input"


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes are: absolute byte offsets [start, end) in ``file`` (a storage key)."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _shown(storage: Storage, key: str) -> str:
    """A key as the user knows it: under the storage's URI."""
    return f"{storage.uri.rstrip('/')}/{key}"


def _join(prefix: str, name: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{name}" if prefix else name


def _location(key: str, name: str, entry, data_start: int, file_size: int, where: str) -> TensorLocation:
    """Validate one header entry and turn it into absolute offsets (``where``: the file as the user knows it)."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"corrupt safetensors header in {where}: tensor {name!r} {why}; {_REDOWNLOAD}")
    if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES:
        raise bad(f"has an unsupported or missing dtype {entry.get('dtype') if isinstance(entry, dict) else entry!r}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad(f"has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
            or not offsets[0] <= offsets[1]):
        raise bad(f"has invalid data_offsets {offsets!r}")
    start, end = data_start + offsets[0], data_start + offsets[1]
    if end > file_size:
        raise bad(f"ends at byte {end}, beyond the end of the file ({file_size} bytes)")
    itemsize = torch.empty((), dtype=DTYPES[entry["dtype"]]).element_size()
    if end - start != math.prod(shape) * itemsize:
        raise bad(f"has {end - start} bytes but shape {shape} of {entry['dtype']} needs {math.prod(shape) * itemsize}")
    return TensorLocation(key, entry["dtype"], tuple(shape), start, end)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_no_overlap(locations: dict[str, TensorLocation], data_start: int, where: str) -> None:
    """No two tensors of one file share a byte (a crafted header could alias one tensor's bytes into another)."""
    spans = sorted((loc.start, loc.end, name) for name, loc in locations.items() if loc.end > loc.start)
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise CheckpointError(f"corrupt safetensors header in {where}: tensors {first!r} and {second!r} overlap "
                                  f"(data bytes {start - data_start}..{end - data_start} belong to both); {_REDOWNLOAD}")


def read_header(storage: Storage, key: str) -> dict[str, TensorLocation]:
    """The tensor locations of one safetensors file, from its length prefix and JSON header only."""
    where = _shown(storage, key)
    size = storage.size(key)
    if size < 8:
        raise CheckpointError(f"corrupt safetensors file {where}: only {size} bytes, shorter than the 8-byte "
                              f"length; {_REDOWNLOAD}")
    length = int.from_bytes(storage.get_range(key, 0, 8), "little")
    if length < 2 or length > MAX_HEADER or 8 + length > size:
        raise CheckpointError(f"corrupt safetensors header in {where}: header length {length} does not fit "
                              f"a {size}-byte file; {_REDOWNLOAD}")
    try:
        header = json.loads(storage.get_range(key, 8, 8 + length).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"corrupt safetensors header in {where}: invalid JSON ({exc}); {_REDOWNLOAD}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"corrupt safetensors header in {where}: the header is not a JSON object; {_REDOWNLOAD}")
    header.pop("__metadata__", None)
    locations = {name: _location(key, name, entry, 8 + length, size, where) for name, entry in header.items()}
    _check_no_overlap(locations, 8 + length, where)
    return locations


def _shard_files(storage: Storage, prefix: str) -> tuple[list[str], dict[str, str]]:
    """The checkpoint's files (storage keys) and, if sharded, its weight map (tensor -> key)."""
    index_key, single_key = _join(prefix, INDEX_FILE), _join(prefix, SINGLE_FILE)
    if storage.exists(index_key):
        weight_map = _weight_map(storage, index_key, prefix)
        return sorted(set(weight_map.values())), weight_map
    if storage.exists(single_key):
        return [single_key], {}
    where = _shown(storage, prefix) if prefix else storage.uri
    pickles = [k for k in storage.list(_join(prefix, "") if prefix else "") if k.endswith(PICKLE_SUFFIXES)]
    found = (f", only {_shown(storage, pickles[0])} (a pickle file, never opened: loading one can run code)"
             if pickles else "")
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} under {where}{found}; qvlm reads only safetensors: "
                          "convert .bin/.pt checkpoints first (save_pretrained in a trusted environment)")


def _weight_map(storage: Storage, index_key: str, prefix: str) -> dict[str, str]:
    """tensor name -> storage key of its file, from a sharded checkpoint's index; file names stay inside the model."""
    where = _shown(storage, index_key)
    try:
        weight_map = json.loads(storage.get_bytes(index_key))["weight_map"]
        files = {name: _join(prefix, file) for name, file in weight_map.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"corrupt {where}: expected JSON with a 'weight_map' object ({exc!r}); "
                              f"{_REDOWNLOAD}") from None
    for name, key in files.items():
        try:
            check_key(key)
        except ValueError:
            raise CheckpointError(f"{where}: tensor {name!r} maps to {weight_map[name]!r}, which is not a file "
                                  "name inside the model folder; fix the index's weight_map") from None
    missing = sorted(k for k in set(files.values()) if not storage.exists(k))
    if missing:
        raise CheckpointError(f"{where} lists {_shown(storage, missing[0])}, which does not exist"
                              f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; {_REDOWNLOAD}")
    return files


MAX_REQUEST_BYTES = 64 * 2**20
READ_PARALLELISM = 8  # ranged reads in flight at once: at most this many runs' raw bytes are held together


def _coalesce(locs: list[TensorLocation], max_bytes: int = MAX_REQUEST_BYTES) -> list[tuple[int, int, list[TensorLocation]]]:
    """Group one file's locations (sorted by start) into runs of exactly adjacent byte ranges.

    A run stops growing at ``max_bytes``: each run's raw bytes stay alive while its tensors are copied out,
    so an unbounded run would hold a stage's weights twice at the peak.
    """
    runs: list[tuple[int, int, list[TensorLocation]]] = []
    for loc in locs:
        if runs and runs[-1][1] == loc.start and loc.end - runs[-1][0] <= max_bytes:
            start, _, members = runs[-1]
            runs[-1] = (start, loc.end, members + [loc])
        else:
            runs.append((loc.start, loc.end, [loc]))
    return runs


def _tensor(data: memoryview, loc: TensorLocation) -> torch.Tensor:
    dtype = DTYPES[loc.dtype]
    if loc.start == loc.end:
        return torch.empty(loc.shape, dtype=dtype)
    # bytearray: an owned, writable, aligned copy (torch warns on read-only buffers)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(loc.shape)


def check_finite(name: str, tensor: torch.Tensor, where: str) -> None:
    """Refuse a floating-point tensor holding NaN or infinite values, naming it and its file."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    values = tensor if tensor.element_size() >= 2 else tensor.float()  # isfinite has no float8 kernel
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return
    nans = int(torch.isnan(values).sum())
    raise CheckpointError(f"non-finite weights in {where}: tensor {name!r} holds {nans} NaN and "
                          f"{int((~finite).sum()) - nans} infinite values of {tensor.numel()}; a quantized checkpoint "
                          "of it would be meaningless: re-download the model or repair the tensor")


class CheckpointIndex:
    """The tensor map of a safetensors checkpoint (single file or sharded with model.safetensors.index.json),
    read from headers only."""

    def __init__(self, storage: Storage, locations: dict[str, TensorLocation]):
        self.storage = storage
        self._locations = locations
        self.names: list[str] = sorted(locations)

    @classmethod
    def open(cls, storage: Storage, prefix: str = "") -> "CheckpointIndex":
        """Read the index (if any) and each file's header with ranged reads; no tensor bytes are read."""
        files, weight_map = _shard_files(storage, prefix)
        locations: dict[str, TensorLocation] = {}
        for key in files:
            for name, loc in read_header(storage, key).items():
                if name in locations:
                    raise CheckpointError(f"tensor {name!r} appears in both {_shown(storage, locations[name].file)} "
                                          f"and {_shown(storage, key)}; {_REDOWNLOAD}")
                locations[name] = loc
        for name, key in weight_map.items():
            if name not in locations or locations[name].file != key:
                raise CheckpointError(f"{_shown(storage, _join(prefix, INDEX_FILE))} maps {name!r} to {key}, "
                                      f"but that file's header does not contain it; {_REDOWNLOAD}")
        return cls(storage, locations)

    def location(self, name: str) -> TensorLocation:
        try:
            return self._locations[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in the checkpoint at {self.storage.uri}") from None

    def total_bytes(self, names: Iterable[str] | None = None) -> int:
        locs = self._locations.values() if names is None else (self.location(n) for n in names)
        return sum(loc.end - loc.start for loc in locs)

    def read(self, names: Iterable[str], parallel: int = READ_PARALLELISM) -> dict[str, torch.Tensor]:
        """The named tensors with their exact dtype and shape. Adjacent ranges in one file share a request and
        up to ``parallel`` requests are in flight at once (object stores serve ranged GETs concurrently)."""
        if sys.byteorder != "little":
            raise RuntimeError("safetensors data is little-endian; big-endian hosts are not supported")
        wanted = {name: self.location(name) for name in dict.fromkeys(names)}
        by_file: dict[str, list[TensorLocation]] = {}
        for loc in wanted.values():
            by_file.setdefault(loc.file, []).append(loc)
        runs = [(key, run) for key, locs in by_file.items()
                for run in _coalesce(sorted(set(locs), key=lambda x: (x.start, x.end)))]
        tensors: dict[TensorLocation, torch.Tensor] = {}
        with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
            for part in pool.map(lambda item: self._read_run(*item), runs):
                tensors.update(part)
        for name, loc in wanted.items():
            check_finite(name, tensors[loc], _shown(self.storage, loc.file))
        return {name: tensors[loc] for name, loc in wanted.items()}

    def _read_run(self, key: str, run: tuple[int, int, list[TensorLocation]]) -> dict[TensorLocation, torch.Tensor]:
        start, end, members = run
        view = memoryview(self.storage.get_range(key, start, end))
        return {loc: _tensor(view[loc.start - start:loc.end - start], loc) for loc in members}
