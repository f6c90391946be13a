"""Pack quantized weights the way compressed-tensors' ``pack-quantized`` format stores them.

The bit layout is the library's own (``pack_to_int32`` / ``unpack_from_int32``): we call it rather than
re-implement it, so that what we write is what vLLM and transformers read.
"""

from __future__ import annotations

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from qvlm.quant import QuantizedWeight, WeightScheme


def pack_weight(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """Tensors of one linear under the names compressed-tensors uses (relative to the module)."""
    bits = qw.scheme.bits
    out = {
        "weight_packed": pack_to_int32(qw.qweight, bits),
        "weight_scale": qw.scale.contiguous(),
        "weight_shape": torch.tensor(list(qw.qweight.shape), dtype=torch.int64),
    }
    if qw.zero is not None:
        out["weight_zero_point"] = pack_to_int32(qw.zero, bits, packed_dim=0)
    return out


def unpack_weight(tensors: dict[str, torch.Tensor], scheme: WeightScheme) -> QuantizedWeight:
    """Inverse of ``pack_weight``: exact integers, scales and zero points."""
    shape = torch.Size(tensors["weight_shape"].tolist())
    qweight = unpack_from_int32(tensors["weight_packed"], scheme.bits, shape)
    scale = tensors["weight_scale"]
    zero = None
    if "weight_zero_point" in tensors:
        zero_shape = torch.Size([shape[0], scale.shape[-1]])
        zero = unpack_from_int32(tensors["weight_zero_point"], scheme.bits, zero_shape, packed_dim=0)
    return QuantizedWeight(qweight, scale, zero, scheme)
