"""Write quantized linears as a compressed-tensors checkpoint (what vLLM and transformers load as is).

The library decides the format of each scheme (``infer_module_format``: int8 weights with dynamic int8
per-token activations -> ``int-quantized``, weight-only -> ``pack-quantized``). The tensors are made from our
integers directly (at 4 and 8 bits the packed words are their bytes; other widths and the zero points go through
the library's own packer): the integers are the ones the checkpoint holds, so the registered compressor's way
(requantizing the dequantized weight in float32) would give the same tensors at the cost of several float32
copies of each weight; tests hold the two equal. Config groups are one per distinct scheme, targeting layers by
module name as the loaded model names them; tensors keep the source checkpoint's key layout (transformers renames
both on load).

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
import sys
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping

import torch
from compressed_tensors.compressors.format import infer_module_format
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from qvlm.quant import ActRange, ActScheme, QuantizedWeight, WeightScheme, held_codes
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


# Weights packed at once where the integers are not the packed words' bytes already (3, 5, 6, 7 bits): the library's
# packer makes int32 copies of what it is given (4 bytes a weight, 270 MiB each for a whole 13B down_proj).
PACK_ELEMENTS = 1 << 22


def compressed_tensors(weight: QuantizedWeight, group: QuantizationScheme) -> dict[str, torch.Tensor]:
    """The tensors of one linear in its group's format, under compressed-tensors' names (``weight_packed``, ...),
    made from our integers as the format stores them: what the library's registered compressor makes from the
    dequantized weight and qparams (tests/test_numerics.py holds the two equal for every scheme), without the
    float32 copies of the weight it takes to requantize it. At 4 bits the integers as held are the packed words'
    bytes, so ``weight_packed`` is a view of them."""
    scale = weight.scale.contiguous()
    if group.format == "int-quantized":
        out = {"weight": weight.qweight.contiguous(), "weight_scale": scale}
        if weight.zero is not None:
            out["weight_zero_point"] = weight.zero.contiguous()
        return out
    if group.format != "pack-quantized":
        raise NotImplementedError(f"qvlm writes the pack-quantized and int-quantized formats, not {group.format!r}")
    out = {"weight_packed": _packed_words(weight), "weight_scale": scale,
           "weight_shape": torch.tensor(tuple(weight.shape))}
    if weight.zero is not None:  # packed along the output dimension (compressed-tensors 0.17 returns a transposed view)
        out["weight_zero_point"] = pack_to_int32(weight.zero.contiguous(), weight.scheme.bits, packed_dim=0).contiguous()
    return out


def _bytewise(bits: int, in_features: int) -> bool:
    """Whether the packed int32 words of a weight are its integers byte for byte, offset to unsigned: at 4 bits two
    a byte with the even column low (as ``QuantizedWeight`` holds them), at 8 bits one a byte; whole words to a
    row, and a word's bytes in the host's order, which must then be little endian."""
    return bits in (4, 8) and in_features * bits % 32 == 0 and sys.byteorder == "little"


def _packed_words(weight: QuantizedWeight) -> torch.Tensor:
    out_features, in_features = weight.shape
    bytewise = _bytewise(weight.scheme.bits, in_features)
    if bytewise and weight.packed:  # 4 bits: the held bytes themselves
        return weight.codes.contiguous().view(torch.int32)
    if bytewise and weight.scheme.bits == 8:
        return (weight.codes.contiguous().view(torch.uint8) ^ 0x80).view(torch.int32)  # int8 q -> q + 128
    step = max(1, PACK_ELEMENTS // max(1, in_features))
    words = None
    for start in range(0, out_features, step):
        part = pack_to_int32(weight.rows(start, start + step).qweight.contiguous(), weight.scheme.bits)
        if words is None:
            words = part.new_empty((out_features, part.shape[1]))
        words[start:start + part.shape[0]] = part
    return words


def _unpacked_codes(words: torch.Tensor, scheme: WeightScheme, shape: torch.Size) -> torch.Tensor:
    """The inverse of :func:`_packed_words`: integers as ``QuantizedWeight.codes`` holds them."""
    if not _bytewise(scheme.bits, shape[1]):
        return held_codes(unpack_from_int32(words, scheme.bits, shape), scheme)
    data = words.contiguous().view(torch.uint8)
    return data if scheme.bits == 4 else (data ^ 0x80).view(torch.int8)


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
        zero = tensors.get("weight_zero_point")
        if zero is not None:
            zero = unpack_from_int32(zero, scheme.bits, torch.Size([shape[0], scale.shape[-1]]), packed_dim=0)
        return QuantizedWeight(_unpacked_codes(tensors["weight_packed"], scheme, shape), scale, zero, scheme)
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
