"""Search one block and write it as a shard: ``_qvlm/blocks/block-NNNNN.safetensors`` plus a JSON record.

The shard is written first and the record (with the shard's sha256) second, so a record is the proof that
its shard is complete. The task reads only the block's own unit tensors from the model's safetensors.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from qvlm.capture import UnitCall
from qvlm.config import QuantConfig
from qvlm.quant import ActRange, QuantizedWeight, WeightScheme
from qvlm.search import BlockData, BlockResult, LinearResult, linear_tensors, quantized_block_outputs, search_block
from workers.fault_hooks import fault_point
from workers.stage import ModelShard
from workers.storage import open_output, open_storage

BLOCKS_PREFIX = "_qvlm/blocks"


@dataclass(frozen=True)
class BlockSpec:
    index: int
    unit_names: tuple[str, ...]
    unit_linears: tuple[tuple[str, ...], ...]
    schemes: dict[str, WeightScheme]


@dataclass(frozen=True)
class BlockRecord:
    index: int
    shard_key: str
    sha256: str
    size: int
    unit_names: tuple[str, ...]
    error_before: float
    error_after: float
    evaluations: int
    seconds: float


def shard_key(index: int) -> str:
    return f"{BLOCKS_PREFIX}/block-{index:05d}.safetensors"


def record_key(index: int) -> str:
    return f"{BLOCKS_PREFIX}/block-{index:05d}.json"


def _shard_metadata(result: BlockResult) -> dict[str, str]:
    linears = [
        {"name": r.name, "scheme": asdict(r.weight.scheme), "weight_percentile": r.weight_percentile,
         "act_percentile": r.act_percentile}
        for r in result.linears
    ]
    return {"qvlm.linears": json.dumps(linears, sort_keys=True)}


def encode_shard(result: BlockResult) -> bytes:
    return save_safetensors({k: v.contiguous() for k, v in linear_tensors(result.linears).items()}, _shard_metadata(result))


def decode_shard(data: bytes, linears_meta: Sequence[dict]) -> list[LinearResult]:
    tensors = load_safetensors(data)
    results = []
    for meta in linears_meta:
        n = meta["name"]
        weight = QuantizedWeight(tensors[f"{n}.qweight"], tensors[f"{n}.scale"], tensors.get(f"{n}.zero"), WeightScheme(**meta["scheme"]))
        act = ActRange(tensors[f"{n}.act_lo"], tensors[f"{n}.act_hi"]) if f"{n}.act_lo" in tensors else None
        results.append(LinearResult(n, weight, act, meta["weight_percentile"], meta["act_percentile"]))
    return results


def shard_linears_meta(data: bytes) -> list[dict]:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return json.loads(header["__metadata__"]["qvlm.linears"])


def block_data(shard: ModelShard, spec: BlockSpec, first_calls: list[UnitCall], targets: list[torch.Tensor],
               config: QuantConfig, inputs: list[torch.Tensor] | None) -> BlockData:
    calls0 = [c.with_hidden(h) for c, h in zip(first_calls, inputs)] if inputs is not None else list(first_calls)
    calls = [calls0] + [list(first_calls) for _ in spec.unit_names[1:]]
    return BlockData([shard.module(n) for n in spec.unit_names], list(spec.unit_names), [tuple(l) for l in spec.unit_linears],
                     calls, targets, dict(spec.schemes), config.activations)


def run_block(model_uri: str, model_endpoint: str | None, output_uri: str, output_endpoint: str | None,
              spec: BlockSpec, first_calls: list[UnitCall], targets: list[torch.Tensor], config: QuantConfig,
              inputs: list[torch.Tensor] | None = None, want_outputs: bool = False):
    """Search the block, write its shard and record; returns (record, quantized outputs or None)."""
    shard = ModelShard(model_uri, model_endpoint, list(spec.unit_names), glue=False)
    data = block_data(shard, spec, first_calls, targets, config, inputs)
    result = search_block(data, config.search_config())
    fault_point(f"block-{spec.index}")  # a test hook; off unless QVLM_TEST_FAULTS is set
    storage = open_output(output_uri, output_endpoint)
    blob = encode_shard(result)
    sha = storage.put_bytes(shard_key(spec.index), blob)
    record = BlockRecord(spec.index, shard_key(spec.index), sha, len(blob), spec.unit_names, result.error_before,
                         result.error_after, result.evaluations, result.seconds)
    storage.put_bytes(record_key(spec.index), json.dumps(asdict(record), sort_keys=True).encode())
    outputs = quantized_block_outputs(data, result) if want_outputs else None
    return record, outputs


def replay_block(model_uri: str, model_endpoint: str | None, output_uri: str, output_endpoint: str | None,
                 spec: BlockSpec, record: BlockRecord, first_calls: list[UnitCall], targets: list[torch.Tensor],
                 config: QuantConfig, inputs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Quantized outputs of an already finished block (resume under ``propagation: quantized``)."""
    shard = ModelShard(model_uri, model_endpoint, list(spec.unit_names), glue=False)
    data = block_data(shard, spec, first_calls, targets, config, inputs)
    blob = open_storage(output_uri, output_endpoint).get_bytes(record.shard_key, record.sha256)
    linears = tuple(decode_shard(blob, shard_linears_meta(blob)))
    result = BlockResult(record.unit_names, linears, record.error_before, record.error_after, record.evaluations, record.seconds)
    return quantized_block_outputs(data, result)
