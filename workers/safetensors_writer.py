"""A safetensors file as bytes, built while its tensors are let go: it holds the file's bytes about once.

``safetensors.torch.save`` holds its input tensors, the library's output buffer and the ``bytes`` copy of that
buffer at once: three times the file. A block file of a 13B layer is 150 MiB, written beside the block's search
result at a stage actor's peak, so here each tensor is appended to one growing buffer and dropped from the dict it
came in. The bytes are the library's, to the byte (tests/test_safetensors_reader.py): the JSON header padded with
spaces to 8 bytes, then the tensors ordered by dtype as the library ranks them (wider first, so each offset is a
multiple of its element size), then by name.
"""

from __future__ import annotations

import json

import torch

from workers.safetensors_reader import DTYPES

_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# The order of the library's Dtype enum; it writes tensors by this rank, highest first.
_RANK = {name: rank for rank, name in enumerate(
    ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"])}


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytearray:
    """The safetensors file of ``tensors`` (with ``metadata`` in its header). Empties ``tensors``: each tensor
    is let go once its bytes are in the file (the caller's other references keep it, of course)."""
    unknown = next((name for name, t in tensors.items() if t.dtype not in _NAMES), None)
    if unknown is not None:
        raise ValueError(f"tensor {unknown!r} has dtype {tensors[unknown].dtype}, which safetensors does not store")
    order = sorted(tensors, key=lambda name: (-_RANK[_NAMES[tensors[name].dtype]], name))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    blob = bytearray(len(text).to_bytes(8, "little"))
    blob += text
    for name in order:
        t = tensors.pop(name).detach().cpu().contiguous()
        if t.numel():
            blob += t.reshape(-1).view(torch.uint8).numpy().data  # grows in place: no second copy of the file
    return blob
