"""Write quantized linears as a compressed-tensors checkpoint (what vLLM and transformers load as is).

The library decides the format of each scheme (``infer_module_format``: int8 weights with dynamic int8
per-token activations -> ``int-quantized``, weight-only -> ``pack-quantized``) and its registered
compressor produces the tensors, from our integers' dequantized weights and qparams (in float32, where
requantizing a dequantized weight with the same qparams gives back the same integers exactly, whatever the
checkpoint's dtype). Config groups are one
per distinct scheme, targeting layers by module name as the loaded model names them; tensors keep the
source checkpoint's key layout (transformers renames both on load).

A multimodal model's image encoder (vision tower and projector) is written dense: its quantized weights
dequantized in the checkpoint dtype, listed in ``ignore``. transformers' ``generate()`` runs the image
encoder before the model's first forward, while compressed-tensors decompresses a loaded model only on that
first forward, so compressed image-encoder linears would fail the first ``generate()`` with an image.

Static activation ranges (Q-VLM's W4A4 / W6A6) have no compressed-tensors form: they go to a sidecar
``qvlm_activations.safetensors`` that qvlm loads for fake-quant evaluation; the checkpoint itself then
serves as weight-only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.compressors.format import infer_module_format
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from qvlm.quant import ActRange, ActScheme, QuantizedWeight, WeightScheme, grouped
from qvlm.structure import find_units

ACTIVATIONS_FILE = "qvlm_activations.safetensors"


# The compressed-tensors formats with vLLM and transformers kernels, and the weight bits each serves.
SERVED_WEIGHT_BITS = {"pack-quantized": (4, 8), "int-quantized": (8,)}


def servable_activations(act: ActScheme) -> bool:
    """Whether compressed-tensors (and so vLLM) can express the activation scheme."""
    return not act.enabled or (act.granularity == "token" and act.bits == 8)


@dataclass(frozen=True)
class Servability:
    """Whether a checkpoint runs in vLLM / transformers as written, or only with qvlm's activation sidecar."""

    servable: bool
    format: str  # the compressed-tensors format config.json names ("mixed-precision" when groups differ)
    sidecar: bool  # static or low-bit activation ranges kept in ACTIVATIONS_FILE
    note: str


def servability(schemes: Mapping[str, WeightScheme], act: ActScheme) -> Servability:
    """What the export of ``schemes`` with ``act`` gives a user: the format it is written in and whether
    a serving kernel exists for every (format, weight bits) of it."""
    groups = config_groups(schemes, act)
    formats = {g.format for g in groups.values()}
    fmt = formats.pop() if len(formats) == 1 else "mixed-precision" if formats else "unquantized"
    if act.enabled and not servable_activations(act):
        return Servability(False, fmt, True, f"{_act_label(act)} activations with W{_bits_label(schemes)} weights "
                           "(Q-VLM static or low-bit activation ranges): research-only, the ranges are kept in a "
                           f"qvlm sidecar file ({ACTIVATIONS_FILE})")
    unserved = sorted({f"W{g.weights.num_bits} {g.format}" for g in groups.values()
                       if g.weights.num_bits not in SERVED_WEIGHT_BITS.get(g.format, ())})
    kind = "weight-only" if not act.enabled else f"{_act_label(act)} activations"
    if unserved:
        return Servability(False, fmt, False, f"{kind} with {', '.join(unserved)} layers: no vLLM/transformers "
                           "kernel for them; research-only")
    return Servability(True, fmt, False, f"{kind}, W{_bits_label(schemes)} {fmt}: servable by vLLM and transformers")


def _act_label(act: ActScheme) -> str:
    return f"A{act.bits} per-{act.granularity} {'sym' if act.symmetric else 'asym'}"


def _bits_label(schemes: Mapping[str, WeightScheme]) -> str:
    return "/".join(str(b) for b in sorted({s.bits for s in schemes.values()}))


def weight_args(scheme: WeightScheme) -> QuantizationArgs:
    if scheme.group_size == -1:
        return QuantizationArgs(num_bits=scheme.bits, type="int", symmetric=scheme.symmetric, strategy="channel")
    return QuantizationArgs(num_bits=scheme.bits, type="int", symmetric=scheme.symmetric, strategy="group",
                            group_size=scheme.group_size)


def activation_args(act: ActScheme) -> QuantizationArgs | None:
    if not act.enabled or not servable_activations(act):
        return None
    return QuantizationArgs(num_bits=8, type="int", symmetric=act.symmetric, strategy="token", dynamic=True)


def config_groups(schemes: Mapping[str, WeightScheme], act: ActScheme) -> dict[str, QuantizationScheme]:
    """One group per distinct weight scheme, most used first, targeting its layers by name."""
    by_scheme: dict[WeightScheme, list[str]] = {}
    for name, scheme in sorted(schemes.items()):
        by_scheme.setdefault(scheme, []).append(name)
    ordered = sorted(by_scheme.items(), key=lambda kv: (-len(kv[1]), kv[0].bits, kv[0].group_size))
    groups = {}
    for i, (scheme, names) in enumerate(ordered):
        group = QuantizationScheme(targets=names, weights=weight_args(scheme), input_activations=activation_args(act))
        group.format = infer_module_format(nn.Linear, group).value
        groups[f"group_{i}"] = group
    return groups


def image_encoder_linears(model: nn.Module) -> set[str]:
    """The linears of a multimodal model's vision tower and projector (what generate() runs before the first
    forward); none for a model without both an image side and a language side."""
    units = find_units(model)
    if not {"vision", "language"} <= {u.segment for u in units}:
        return set()
    return {u.linear_name(n) for u in units if u.segment in ("vision", "projector") for n in u.linears}


def quantization_config(schemes: Mapping[str, WeightScheme], act: ActScheme, ignore: Iterable[str]) -> dict | None:
    """The ``quantization_config`` block of config.json; None when no linear is left to compress."""
    if not schemes:
        return None
    groups = config_groups(schemes, act)
    formats = {g.format for g in groups.values()}
    config = QuantizationConfig(config_groups=groups, format=formats.pop() if len(formats) == 1 else "mixed-precision",
                                quantization_status="compressed", ignore=sorted(ignore))
    return config.model_dump(exclude_none=True)


# Rows of a weight handed to the compressor at once are a multiple of this: a packed zero point holds 32 / bits rows
# in one int32, so slices of whole int32s pack to the whole weight's tensors, joined.
PACKED_ROWS = 32
# Weights handed to the compressor at once: it makes about five float32 copies of what it is given. Writing one 13B
# layer's block took +227 MiB at this size, +455 at the quantizer's 2^24 (the file itself 156; bench/export_memory.py
# in a process that returns freed pages, as a stage actor does: workers/host_memory.py).
COMPRESS_ELEMENTS = 1 << 22


def compressed_tensors(weight: QuantizedWeight, group: QuantizationScheme,
                       max_elements: int = COMPRESS_ELEMENTS) -> dict[str, torch.Tensor]:
    """The tensors of one linear in its group's format, under compressed-tensors' names (``weight_packed``, ...).

    The compressor is given a slice of whole rows at a time (about ``max_elements`` weights): it makes several
    float32 copies of what it is given, which for a whole 13B ``down_proj`` is about 1 GiB beside the block's
    search results. Every tensor it returns is by rows except ``weight_shape``, which is the whole weight's."""
    out_features, in_features = weight.shape
    step = max(PACKED_ROWS, max_elements // max(1, in_features) // PACKED_ROWS * PACKED_ROWS)
    parts = [_compress(weight.rows(start, start + step), group) for start in range(0, out_features, step)]
    if len(parts) == 1:
        return parts[0]
    return {k: (torch.tensor(weight.shape, dtype=v.dtype) if k == "weight_shape" else
                torch.cat([p[k] for p in parts]))
            for k, v in parts[0].items()}


def _compress(weight: QuantizedWeight, group: QuantizationScheme) -> dict[str, torch.Tensor]:
    """The compressor requantizes the weight it is given in that weight's dtype. Given the bfloat16 dequantized
    weight, ``round(w / scale)`` lands off our integer for some 8-bit weights, so it gets the float32 one
    (``(q - z) * scale`` is exact in float32 for a 16-bit scale, so the division gives the integer back)
    with the float32 scale, and the stored scale is put back in the checkpoint's dtype."""
    scale32 = weight.scale.float()
    ints = grouped(weight.integers(torch.float32), weight.scheme.group_size)
    if weight.zero is not None:
        ints = ints - weight.zero.float().unsqueeze(-1)
    state = {"weight": (ints * scale32.unsqueeze(-1)).reshape(weight.shape), "weight_scale": scale32}
    if weight.zero is not None:
        state["weight_zero_point"] = weight.zero
    compressor = BaseCompressor.get_value_from_registry(group.format)
    out = {k: v.contiguous() for k, v in compressor.compress(state, group).items()}
    out["weight_scale"] = weight.scale.contiguous()
    return out


def group_of(groups: Mapping[str, QuantizationScheme], name: str) -> QuantizationScheme | None:
    """The config group targeting linear ``name``; None for a linear written dense."""
    return next((g for g in groups.values() if name in g.targets), None)


def linear_group(scheme: WeightScheme, act: ActScheme) -> QuantizationScheme:
    """The compressed-tensors scheme (with its format) one linear of ``scheme`` is written with."""
    return config_groups({"_": scheme}, act)["group_0"]


def decode_linear(tensors: Mapping[str, torch.Tensor], scheme: WeightScheme) -> QuantizedWeight:
    """Exact integers, scales and zero points of one linear from its compressed tensors (the inverse of
    :func:`compressed_tensors`; names relative to the module)."""
    scale = tensors["weight_scale"]
    if "weight_packed" in tensors:  # pack-quantized: int32 words, zero points packed along the output dim
        shape = torch.Size(tensors["weight_shape"].tolist())
        qweight = unpack_from_int32(tensors["weight_packed"], scheme.bits, shape)
        zero = tensors.get("weight_zero_point")
        if zero is not None:
            zero = unpack_from_int32(zero, scheme.bits, torch.Size([shape[0], scale.shape[-1]]), packed_dim=0)
        return QuantizedWeight.of(qweight, scale, zero, scheme)
    zero = tensors.get("weight_zero_point")  # int-quantized: int8 weight as stored
    return QuantizedWeight.of(tensors["weight"], scale, None if zero is None else zero.to(torch.int8), scheme)


def encode_activation_ranges(ranges: Mapping[str, ActRange], act: ActScheme) -> bytes:
    tensors = {}
    for name, r in sorted(ranges.items()):
        tensors[f"{name}.act_lo"], tensors[f"{name}.act_hi"] = r.lo.contiguous(), r.hi.contiguous()
    return save_safetensors(tensors, {"qvlm.act_scheme": json.dumps(asdict(act))})


def apply_activation_ranges(model: nn.Module, data: bytes) -> ActScheme:
    """Turn the model's quantized linears into FakeQuantLinear with the sidecar's static ranges (in place)."""
    from qvlm.fakequant import swap_in_fake_quant

    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    act = ActScheme(**json.loads(header["__metadata__"]["qvlm.act_scheme"]))
    tensors = load_safetensors(data)
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    for name, fq in swap_in_fake_quant(model, names).items():
        fq.act_scheme = act
        fq.act_range = ActRange(tensors[f"{name}.act_lo"], tensors[f"{name}.act_hi"])
    return act
