"""Write the rest of the checkpoint around the blocks' files: the unquantized tensors copied unchanged into
files of at most 5 GB (``cluster.plan.rest_chunks``), the index, config.json with its
``quantization_config``, the processor/tokenizer files, and the activation sidecar when the scheme has static
ranges. The blocks' files are already in place (each stage wrote its own); nothing is read back from them but
their records and sidecars.

Runs on a worker, one file at a time (a generator the driver counts as steps): it never holds the whole model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator

from torch import nn

from qvlm.export import (ACTIVATIONS_FILE, encode_activation_ranges, image_encoder_linears, quantization_config,
                         servable_activations)
from qvlm.loading import build_skeleton
from qvlm.quant import ActScheme
from workers.locations import Locations
from workers.model_shard import fetch_small_files
from workers.safetensors_reader import CheckpointIndex
from workers.safetensors_writer import safetensors_bytes
from workers.shard import FILE_METADATA, BlockRecord, activation_ranges, file_name

INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class ExportRequest:
    where: Locations
    blocks: tuple[BlockRecord, ...]  # in block order; block i's file is the checkpoint's file i
    rest_chunks: tuple[tuple[str, ...], ...]  # checkpoint keys of the unquantized tensors, per file
    schemes: dict  # linear module name -> WeightScheme
    act: ActScheme


def checkpoint_files(req: ExportRequest) -> Iterator[tuple[dict[str, dict], int]]:
    """Write the checkpoint's other files one at a time; after each step yield what it wrote ({key: {"sha256",
    "size"}}, the blocks' files with the first) and the number of steps in all (one per file of unquantized
    tensors, then one for the metadata files)."""
    from transformers import AutoConfig

    source, out = req.where.model(), req.where.output()
    local = fetch_small_files(source)
    index = CheckpointIndex.open(source)
    n_files, steps = len(req.blocks) + len(req.rest_chunks), len(req.rest_chunks) + 1
    written = {r.shard_key: {"sha256": r.sha256, "size": r.size} for r in req.blocks}
    weight_map = {key: r.shard_key for r in req.blocks for key in r.tensor_keys}
    for j, chunk in enumerate(req.rest_chunks):
        name = file_name(len(req.blocks) + j, n_files)
        blob = safetensors_bytes(index.read(chunk), FILE_METADATA)
        weight_map.update({key: name for key in chunk})
        yield {**written, name: {"sha256": out.put_bytes(name, blob), "size": len(blob)}}, steps
        written = {}
    sizes = {r.shard_key: r.size for r in req.blocks}
    sizes.update({file_name(len(req.blocks) + j, n_files): out.size(file_name(len(req.blocks) + j, n_files))
                  for j in range(len(req.rest_chunks))})
    model = build_skeleton(AutoConfig.from_pretrained(local))
    files = _metadata_files(out, local, model, req, weight_map, sizes)
    yield {**written, **{name: {"sha256": out.put_bytes(name, data), "size": len(data)} for name, data in files.items()}}, steps


def compressed_schemes(model: nn.Module, schemes: dict) -> dict:
    """The schemes of the linears written compressed: all but a multimodal model's image encoder, which the
    blocks write dense (qvlm.export.image_encoder_linears says why)."""
    dense = image_encoder_linears(model)
    return {name: scheme for name, scheme in schemes.items() if name not in dense}


def _metadata_files(out, local, model, req: ExportRequest, weight_map: dict, sizes: dict) -> dict[str, bytes]:
    """config.json with quantization_config, the index, the source's small files, the activation sidecar."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    config = json.loads((local / "config.json").read_text())
    compressed = compressed_schemes(model, req.schemes)
    quant_config = quantization_config(compressed, req.act, [n for n in linears if n not in compressed])
    if quant_config is not None:
        config["quantization_config"] = quant_config
    files = {"config.json": json.dumps(config, indent=2, sort_keys=True).encode()}
    total = sum(sizes[name] for name in set(weight_map.values()))
    files[INDEX_FILE] = json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                                   indent=2).encode()
    for path in sorted(local.iterdir()):
        if path.name not in files and path.name != INDEX_FILE:
            files[path.name] = path.read_bytes()
    ranges = activation_ranges(out, req.blocks)
    if ranges and not servable_activations(req.act):
        files[ACTIVATIONS_FILE] = encode_activation_ranges(ranges, req.act)
    return files
