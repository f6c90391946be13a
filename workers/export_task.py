"""Write the final checkpoint from the block shards: one safetensors file per block of quantized linears,
the unquantized tensors copied unchanged into files of at most ``max_file_bytes``, the index, config.json
with its ``quantization_config``, the processor/tokenizer files, and the activation sidecar when needed.

Runs on a worker: it holds one output file's tensors at a time, never the whole model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator, Sequence

from safetensors.torch import save as save_safetensors

from qvlm.export import (ACTIVATIONS_FILE, checkpoint_tensors, config_groups, encode_activation_ranges, group_of,
                         image_encoder_linears, quantization_config, servable_activations)
from qvlm.loading import build_skeleton, checkpoint_key_map
from qvlm.quant import ActScheme
from workers.block_task import decode_shard, shard_linears_meta
from workers.safetensors_reader import CheckpointIndex
from workers.stage import fetch_small_files
from workers.storage import open_model, open_output

INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class ExportRequest:
    model_uri: str
    model_endpoint: str | None
    output_uri: str
    output_endpoint: str | None
    shard_keys: tuple[tuple[str, str], ...]  # (block shard key, its sha256), in block order
    schemes: dict  # linear module name -> WeightScheme
    act: ActScheme
    max_file_bytes: int = 5 * 10**9


def _file_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _chunks(keys: Sequence[str], sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    chunks, current, acc = [], [], 0
    for key in keys:
        if current and acc + sizes[key] > max_bytes:
            chunks.append(current)
            current, acc = [], 0
        current.append(key)
        acc += sizes[key]
    return chunks + ([current] if current else [])


def write_checkpoint(req: ExportRequest) -> dict[str, dict]:
    """Write every checkpoint file; returns {key: {"sha256", "size"}} for the manifest."""
    written = {}
    for files, _ in checkpoint_files(req):
        written.update(files)
    return written


def checkpoint_files(req: ExportRequest) -> Iterator[tuple[dict[str, dict], int]]:
    """Write the checkpoint one file at a time; after each step yield what it wrote ({key: {"sha256", "size"}})
    and the number of steps in all (one per safetensors file, then one for the metadata files)."""
    from transformers import AutoConfig

    source, out = open_model(req.model_uri, req.model_endpoint), open_output(req.output_uri, req.output_endpoint)
    local = fetch_small_files(source)
    model = build_skeleton(AutoConfig.from_pretrained(local))
    index = CheckpointIndex.open(source)
    keymap = checkpoint_key_map(model, index.names)
    quantized_keys = {keymap[f"{n}.weight"] for n in req.schemes}
    rest = [k for k in index.names if k not in quantized_keys]
    rest_chunks = _chunks(rest, {k: index.total_bytes([k]) for k in rest}, req.max_file_bytes)
    n_files = len(req.shard_keys) + len(rest_chunks)
    groups = config_groups(_compressed_schemes(model, req.schemes), req.act)
    weight_map, ranges = {}, {}
    for i, (shard_key, sha) in enumerate(req.shard_keys):
        blob = out.get_bytes(shard_key, sha)
        tensors = {}
        for r in decode_shard(blob, shard_linears_meta(blob)):
            prefix = keymap[f"{r.name}.weight"][: -len(".weight")]
            for suffix, t in checkpoint_tensors(r.weight, group_of(groups, r.name)).items():
                tensors[f"{prefix}.{suffix}"] = t
            if r.act_range is not None:
                ranges[r.name] = r.act_range
        yield _put_file(out, _file_name(i, n_files), tensors, weight_map), n_files + 1
    for j, chunk in enumerate(rest_chunks):
        yield _put_file(out, _file_name(len(req.shard_keys) + j, n_files), index.read(chunk), weight_map), n_files + 1
    yield _write_metadata(out, local, model, req, weight_map, ranges), n_files + 1


def _compressed_schemes(model, schemes: dict) -> dict:
    """The schemes of the linears written compressed: all but a multimodal model's image encoder (qvlm.export)."""
    dense = image_encoder_linears(model)
    return {name: scheme for name, scheme in schemes.items() if name not in dense}


def _put_file(out, name: str, tensors: dict, weight_map: dict) -> dict[str, dict]:
    blob = save_safetensors(tensors, {"format": "pt"})
    for key in tensors:
        weight_map[key] = name
    return {name: {"sha256": out.put_bytes(name, blob), "size": len(blob)}}


def _write_metadata(out, local, model, req: ExportRequest, weight_map: dict, ranges: dict) -> dict[str, dict]:
    """config.json with quantization_config, the index, the source's small files, the activation sidecar."""
    from torch import nn

    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    config = json.loads((local / "config.json").read_text())
    compressed = _compressed_schemes(model, req.schemes)
    quant_config = quantization_config(compressed, req.act, [n for n in linears if n not in compressed])
    if quant_config is not None:
        config["quantization_config"] = quant_config
    files = {"config.json": json.dumps(config, indent=2, sort_keys=True).encode()}
    total = sum(out.size(name) for name in set(weight_map.values()))
    files[INDEX_FILE] = json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                                   indent=2).encode()
    for path in sorted(local.iterdir()):
        if path.name not in files and path.name != INDEX_FILE:
            files[path.name] = path.read_bytes()
    if ranges and not servable_activations(req.act):
        files[ACTIVATIONS_FILE] = encode_activation_ranges(ranges, req.act)
    return {name: {"sha256": out.put_bytes(name, data), "size": len(data)} for name, data in files.items()}
