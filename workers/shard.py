"""A finished block in the output: its final checkpoint file, packed as compressed-tensors stores it and named
as the checkpoint names it (``model-0000K-of-0000N.safetensors``); a sidecar beside it when the block has
something the checkpoint does not hold (``_qvlm/blocks/block-NNNNN.extra.safetensors``: static activation ranges,
and the scales of linears written dense, see ``qvlm.export.image_encoder_linears``); and a JSON record written
last (``_qvlm/blocks/block-NNNNN.json``) that proves both complete with their sha256 and says what the file holds.

A resumed job trusts a block only through its record; the export only indexes the files the blocks wrote.
"""

from __future__ import annotations

import json
import reprlib
from dataclasses import asdict, dataclass, field
from typing import Collection, Mapping, Sequence

from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from qvlm.errors import InputError
from qvlm.export import compressed_tensors, decode_linear, encode_activation_ranges, linear_group
from qvlm.quant import ActRange, ActScheme, WeightScheme, quantize_with_qparams
from qvlm.search import BlockResult, LinearResult
from workers.safetensors_writer import safetensors_bytes

BLOCKS_PREFIX = "_qvlm/blocks"
FILE_METADATA = {"format": "pt"}


class CorruptRecord(InputError, ValueError):
    """A block record that cannot be read as one (half-written, edited, of another version)."""


@dataclass(frozen=True)
class LinearEntry:
    name: str  # module name in the model
    key: str  # the checkpoint's key prefix of this linear (the source file's layout)
    scheme: WeightScheme
    dense: bool  # written as its dequantized weight (scale and zero point in the sidecar)
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
    sidecar_key: str | None = None  # what the checkpoint does not hold, when the block has any
    sidecar_sha256: str | None = None
    candidates: dict[str, float] = field(default_factory=dict)  # search `best`: block-output error of each candidate
    chosen: str | None = None  # the candidate kept ("fallback" when quarantined)
    quarantine: str | None = None  # why the search's result was replaced by the safe fallback

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "BlockRecord":
        """The record in ``data``; CorruptRecord saying what is wrong (not JSON, a field missing or mistyped)."""
        try:
            raw = json.loads(data)
        except ValueError as exc:
            raise CorruptRecord(f"not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise CorruptRecord(f"a JSON {type(raw).__name__}, not an object")
        for name, kind in _RECORD_FIELDS.items():
            value = raw.get(name)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise CorruptRecord(f"{name} is {reprlib.repr(value)}, not {_KINDS[kind]}" if name in raw else f"no {name}")
        try:
            linears = tuple(LinearEntry(**{**e, "scheme": WeightScheme(**e["scheme"])}) for e in raw["linears"])
            return cls(**{**raw, "linears": linears, "unit_names": tuple(raw["unit_names"]),
                          "tensor_keys": tuple(raw["tensor_keys"])})
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise CorruptRecord(f"its linears are not readable ({type(exc).__name__}: {exc})") from None


_NUMBER = (int, float)
_RECORD_FIELDS = {"index": int, "shard_key": str, "sha256": str, "size": int, "unit_names": list, "linears": list,
                  "tensor_keys": list, "error_before": _NUMBER, "error_after": _NUMBER, "evaluations": int,
                  "seconds": _NUMBER}
_KINDS = {int: "an integer", str: "a string", list: "a list", _NUMBER: "a number"}


def record_key(index: int) -> str:
    return f"{BLOCKS_PREFIX}/block-{index:05d}.json"


def sidecar_key(index: int) -> str:
    return f"{BLOCKS_PREFIX}/block-{index:05d}.extra.safetensors"


def file_name(position: int, n_files: int) -> str:
    """The checkpoint's name of its file number ``position`` (0-based) of ``n_files``."""
    return f"model-{position + 1:05d}-of-{n_files:05d}.safetensors"


@dataclass(frozen=True)
class EncodedBlock:
    """A searched block as it is written: its checkpoint file, its sidecar (or None), what the record says."""

    file: bytearray
    sidecar: bytes | None
    entries: tuple[LinearEntry, ...]
    tensor_keys: tuple[str, ...]  # the file's tensors, sorted


def encode_block(result: BlockResult, prefixes: Mapping[str, str], act: ActScheme,
                 dense: Collection[str] = ()) -> EncodedBlock:
    """A searched block's files. ``prefixes`` maps each linear's module name to its checkpoint key prefix; the
    linears in ``dense`` are written dequantized."""
    tensors, extra, ranges, entries = {}, {}, {}, []
    for r in result.linears:
        is_dense = r.name in dense
        if is_dense:
            tensors[f"{prefixes[r.name]}.weight"] = r.weight.dequantize().contiguous()
            extra[f"{r.name}.weight_scale"] = r.weight.scale.contiguous()
            if r.weight.zero is not None:
                extra[f"{r.name}.weight_zero_point"] = r.weight.zero.contiguous()
        else:
            for suffix, t in compressed_tensors(r.weight, linear_group(r.weight.scheme, act)).items():
                tensors[f"{prefixes[r.name]}.{suffix}"] = t
        if r.act_range is not None:
            ranges[r.name] = r.act_range
        entries.append(LinearEntry(r.name, prefixes[r.name], r.weight.scheme, is_dense, r.weight_percentile,
                                   r.act_percentile))
    if ranges:
        extra.update(load_safetensors(encode_activation_ranges(ranges, act)))
    sidecar = save_safetensors(extra, {"qvlm.act_scheme": json.dumps(asdict(act))}) if extra else None
    keys = tuple(sorted(tensors))
    return EncodedBlock(safetensors_bytes(tensors, FILE_METADATA), sidecar, tuple(entries), keys)


def write_block_files(storage, index: int, key: str, result: BlockResult, prefixes: Mapping[str, str],
                      act: ActScheme, dense: Collection[str] = (), extra_key: str | None = None) -> BlockRecord:
    """Write the block's file (at ``key``) and its sidecar (at ``extra_key``, by default the block's own);
    returns the record that vouches for them, not yet written."""
    encoded = encode_block(result, prefixes, act, dense)
    sha = storage.put_bytes(key, encoded.file)
    side_key, side_sha = None, None
    if encoded.sidecar is not None:
        side_key = extra_key or sidecar_key(index)
        side_sha = storage.put_bytes(side_key, encoded.sidecar)
    return BlockRecord(index, key, sha, len(encoded.file), tuple(result.unit_names), encoded.entries,
                       encoded.tensor_keys, result.error_before, result.error_after,
                       result.evaluations, result.seconds, side_key, side_sha, dict(result.candidates),
                       result.chosen, result.quarantine)


def write_block(storage, index: int, key: str, result: BlockResult, prefixes: Mapping[str, str],
                act: ActScheme, dense: Collection[str] = ()) -> BlockRecord:
    """Write the block's file (and sidecar), then its record, last; returns the record."""
    record = write_block_files(storage, index, key, result, prefixes, act, dense)
    storage.put_bytes(record_key(index), record.to_json())
    return record


def read_record(storage, index: int) -> BlockRecord | None:
    """The block's record, None when it has none; raises CorruptRecord for one that cannot be read."""
    key = record_key(index)
    if not storage.exists(key):
        return None
    return BlockRecord.from_json(storage.get_bytes(key))


def _sidecar(storage, record: BlockRecord) -> dict:
    return load_safetensors(storage.get_bytes(record.sidecar_key, record.sidecar_sha256)) if record.sidecar_key else {}


def read_block(storage, record: BlockRecord) -> BlockResult:
    """The block's result as searched (integers, scales, ranges), from its verified files."""
    tensors = load_safetensors(storage.get_bytes(record.shard_key, record.sha256))
    extra = _sidecar(storage, record)
    linears = []
    for e in record.linears:
        own = {k[len(e.key) + 1:]: v for k, v in tensors.items() if k.startswith(e.key + ".")}
        if e.dense:
            weight = quantize_with_qparams(own["weight"], extra[f"{e.name}.weight_scale"],
                                           extra.get(f"{e.name}.weight_zero_point"), e.scheme)
        else:
            weight = decode_linear(own, e.scheme)
        act = ActRange(extra[f"{e.name}.act_lo"], extra[f"{e.name}.act_hi"]) if f"{e.name}.act_lo" in extra else None
        linears.append(LinearResult(e.name, weight, act, e.weight_percentile, e.act_percentile))
    return BlockResult(record.unit_names, tuple(linears), record.error_before, record.error_after, record.evaluations,
                       record.seconds, dict(record.candidates), record.chosen, record.quarantine)


def activation_ranges(storage, records: Sequence[BlockRecord]) -> dict[str, ActRange]:
    """Every block's static activation ranges by linear name (for the checkpoint's sidecar)."""
    out = {}
    for r in records:
        extra = _sidecar(storage, r)
        for e in r.linears:
            if f"{e.name}.act_lo" in extra:
                out[e.name] = ActRange(extra[f"{e.name}.act_lo"], extra[f"{e.name}.act_hi"])
    return out
