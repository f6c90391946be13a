"""A finished block in the output: its final checkpoint file, packed as compressed-tensors stores it and named
as the checkpoint names it (``model-0000K-of-0000N.safetensors``), the static activation ranges beside it when
the scheme has them (``_qvlm/blocks/block-NNNNN.act.safetensors``), and a JSON record written last
(``_qvlm/blocks/block-NNNNN.json``) that proves both complete with their sha256 and says what the file holds.

A resumed job trusts a block only through its record; the export only indexes the files the blocks wrote.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Mapping, Sequence

from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from qvlm.export import compressed_tensors, decode_linear, encode_activation_ranges, linear_group
from qvlm.quant import ActRange, ActScheme, WeightScheme
from qvlm.search import BlockResult, LinearResult

BLOCKS_PREFIX = "_qvlm/blocks"
FILE_METADATA = {"format": "pt"}


class CorruptRecord(ValueError):
    """A block record that cannot be read as one (half-written, edited, of another version)."""


@dataclass(frozen=True)
class LinearEntry:
    name: str  # module name in the model
    key: str  # the checkpoint's key prefix of this linear (the source file's layout)
    scheme: WeightScheme
    weight_percentile: float | None
    act_percentile: float | None


@dataclass(frozen=True)
class BlockRecord:
    index: int
    shard_key: str  # the block's checkpoint file
    sha256: str
    size: int
    unit_names: tuple[str, ...]
    linears: tuple[LinearEntry, ...]
    tensor_keys: tuple[str, ...]  # checkpoint keys in the file, for the index's weight_map
    error_before: float
    error_after: float
    evaluations: int
    seconds: float
    act_key: str | None = None  # static activation ranges, when the scheme has them
    act_sha256: str | None = None
    candidates: dict[str, float] = field(default_factory=dict)  # search `best`: block-output error of each candidate
    chosen: str | None = None  # the candidate kept ("fallback" when quarantined)
    quarantine: str | None = None  # why the search's result was replaced by the safe fallback

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "BlockRecord":
        try:
            raw = json.loads(data)
            linears = tuple(LinearEntry(**{**e, "scheme": WeightScheme(**e["scheme"])}) for e in raw.pop("linears"))
            return cls(**{**raw, "linears": linears, "unit_names": tuple(raw["unit_names"]),
                          "tensor_keys": tuple(raw["tensor_keys"])})
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise CorruptRecord(f"not a block record ({type(exc).__name__}: {exc})") from None


def record_key(index: int) -> str:
    return f"{BLOCKS_PREFIX}/block-{index:05d}.json"


def act_key(index: int) -> str:
    return f"{BLOCKS_PREFIX}/block-{index:05d}.act.safetensors"


def file_name(position: int, n_files: int) -> str:
    """The checkpoint's name of its file number ``position`` (0-based) of ``n_files``."""
    return f"model-{position + 1:05d}-of-{n_files:05d}.safetensors"


def encode_block(result: BlockResult, prefixes: Mapping[str, str], act: ActScheme) -> tuple[bytes, bytes | None, tuple]:
    """(checkpoint file bytes, activation ranges bytes or None, linear entries) of a searched block.
    ``prefixes`` maps each linear's module name to its checkpoint key prefix."""
    tensors, ranges, entries = {}, {}, []
    for r in result.linears:
        for suffix, t in compressed_tensors(r.weight, linear_group(r.weight.scheme, act)).items():
            tensors[f"{prefixes[r.name]}.{suffix}"] = t
        if r.act_range is not None:
            ranges[r.name] = r.act_range
        entries.append(LinearEntry(r.name, prefixes[r.name], r.weight.scheme, r.weight_percentile, r.act_percentile))
    blob = save_safetensors(tensors, FILE_METADATA)
    return blob, (encode_activation_ranges(ranges, act) if ranges else None), tuple(entries)


def write_block_files(storage, index: int, key: str, result: BlockResult, prefixes: Mapping[str, str],
                      act: ActScheme, ranges_key: str | None = None) -> BlockRecord:
    """Write the block's file (at ``key``) and its activation ranges (at ``ranges_key``, by default the block's
    own); returns the record that vouches for them, not yet written."""
    blob, ranges, entries = encode_block(result, prefixes, act)
    sha = storage.put_bytes(key, blob)
    range_key, range_sha = None, None
    if ranges is not None:
        range_key = ranges_key or act_key(index)
        range_sha = storage.put_bytes(range_key, ranges)
    return BlockRecord(index, key, sha, len(blob), tuple(result.unit_names), entries,
                       tuple(sorted(load_safetensors(blob))), result.error_before, result.error_after,
                       result.evaluations, result.seconds, range_key, range_sha, dict(result.candidates),
                       result.chosen, result.quarantine)


def write_block(storage, index: int, key: str, result: BlockResult, prefixes: Mapping[str, str],
                act: ActScheme) -> BlockRecord:
    """Write the block's file (and ranges), then its record, last; returns the record."""
    record = write_block_files(storage, index, key, result, prefixes, act)
    storage.put_bytes(record_key(index), record.to_json())
    return record


def copy_block(storage, record: BlockRecord, index: int, key: str) -> BlockRecord:
    """The block ``record`` describes, written again as block ``index`` at ``key`` (the VEO-tuned tower becomes the
    vision stream's block once the partition numbers it)."""
    blob = storage.get_bytes(record.shard_key, record.sha256)
    storage.put_bytes(key, blob)
    copied = replace(record, index=index, shard_key=key)
    storage.put_bytes(record_key(index), copied.to_json())
    return copied


def read_record(storage, index: int) -> BlockRecord | None:
    """The block's record, None when it has none; raises CorruptRecord for one that cannot be read."""
    key = record_key(index)
    if not storage.exists(key):
        return None
    return BlockRecord.from_json(storage.get_bytes(key))


def read_block(storage, record: BlockRecord) -> BlockResult:
    """The block's result as searched (integers, scales, ranges), from its verified file."""
    tensors = load_safetensors(storage.get_bytes(record.shard_key, record.sha256))
    ranges = load_safetensors(storage.get_bytes(record.act_key, record.act_sha256)) if record.act_key else {}
    linears = []
    for e in record.linears:
        own = {k[len(e.key) + 1:]: v for k, v in tensors.items() if k.startswith(e.key + ".")}
        act = ActRange(ranges[f"{e.name}.act_lo"], ranges[f"{e.name}.act_hi"]) if f"{e.name}.act_lo" in ranges else None
        linears.append(LinearResult(e.name, decode_linear(own, e.scheme), act, e.weight_percentile, e.act_percentile))
    return BlockResult(record.unit_names, tuple(linears), record.error_before, record.error_after, record.evaluations,
                       record.seconds, dict(record.candidates), record.chosen, record.quarantine)


def activation_ranges(storage, records: Sequence[BlockRecord]) -> dict[str, ActRange]:
    """Every block's static activation ranges by linear name (for the checkpoint's sidecar)."""
    out = {}
    for r in records:
        if r.act_key:
            ranges = load_safetensors(storage.get_bytes(r.act_key, r.act_sha256))
            for e in r.linears:
                if f"{e.name}.act_lo" in ranges:
                    out[e.name] = ActRange(ranges[f"{e.name}.act_lo"], ranges[f"{e.name}.act_hi"])
    return out

