"""The quantizable units of a transformers model, found from its module structure.

A *unit* is one repeated layer (a vision-tower encoder layer, a decoder layer, an encoder layer) or the
multimodal projector. Units are found from the module tree, never from widths or checkpoint names:
a *layer list* is an ``nn.ModuleList`` of same-class children that contain linear layers; a *loose*
module holds linears outside every layer list. The projector is the loose module that sits between a
vision layer list and a language layer list in module order (``lm_head``, poolers and heads are not units).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Iterable, Literal

from torch import nn

Segment = Literal["vision", "projector", "language"]
SEGMENTS: tuple[Segment, ...] = ("vision", "projector", "language")
_VISION_WORDS = ("vision", "visual")
_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")  # CLIPVisionModel -> CLIP, Vision, Model
SUPPORTED = ("decoder LLMs (e.g. LlamaForCausalLM), LLaVA-style vision-language models (e.g. "
             "LlavaForConditionalGeneration) and transformer encoders (e.g. BertModel, CLIPVisionModel)")


@dataclass(frozen=True)
class Unit:
    index: int
    name: str  # module path inside the model, e.g. "model.language_model.layers.3"
    segment: Segment
    linears: tuple[str, ...]  # linear layer names relative to the unit, in module order

    def linear_name(self, relative: str) -> str:
        return f"{self.name}.{relative}"


def _linear_names(module: nn.Module) -> tuple[str, ...]:
    return tuple(n for n, m in module.named_modules() if isinstance(m, nn.Linear))


def _is_layer_list(module: nn.Module) -> bool:
    """A ModuleList of layers that hold linears: all of one class, or of several layer classes (Mllama interleaves
    self- and cross-attention decoder layers in one list), never of bare linears of several classes."""
    if not isinstance(module, nn.ModuleList) or len(module) == 0:
        return False
    first = type(module[0])
    one_class = all(type(m) is first for m in module)
    return (one_class or not any(isinstance(m, nn.Linear) for m in module)) and all(_linear_names(m) for m in module)


def _contains_layer_list(module: nn.Module) -> bool:
    return any(_is_layer_list(m) for m in module.modules())


def _is_vision(path: str, ancestors: list[nn.Module]) -> bool:
    """A word of the path or of an ancestor's class name is "vision" or "visual". Whole words, split at ``_``, ``.``
    and case changes: LLaVA-OneVision's model class (``LlavaOnevisionModel``) holds its decoder too."""
    names = [path] + [type(a).__name__ for a in ancestors]
    return any(w.lower() in _VISION_WORDS for name in names for w in _WORD.findall(name))


def _walk(module: nn.Module, path: str, ancestors: list[nn.Module], found: list) -> None:
    """Depth-first in registration order: record layer lists and loose linear-holding modules."""
    for child_name, child in module.named_children():
        child_path = f"{path}.{child_name}" if path else child_name
        if _is_layer_list(child):
            segment = "vision" if _is_vision(child_path, ancestors + [module]) else "language"
            found.append(("list", child_path, child, segment))
        elif _contains_layer_list(child):
            _walk(child, child_path, ancestors + [module], found)
        elif _linear_names(child):
            found.append(("loose", child_path, child, None))


def check_supported(model: nn.Module) -> None:
    """Raise ValueError for a model qvlm cannot run stage by stage. An encoder-decoder (T5, BART, Whisper) has
    layer lists, but its decoder layers take the encoder's output on every call and its forward pass needs
    decoder inputs that calibration records do not give."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ValueError(f"{type(model).__name__} is an encoder-decoder model; qvlm supports {SUPPORTED}")


def closest_module_names(model: nn.Module, name: str, n: int = 3) -> list[str]:
    """The module names of ``model`` closest to ``name``, compared as an ``ignore`` entry names them: whole, or
    by a trailing dotted part (so ``mlp.up_prj`` finds ``mlp.up_proj``)."""
    candidates = {tail for full, _ in model.named_modules() if full for tail in _tails(full)}
    return difflib.get_close_matches(name, sorted(candidates), n=n)


def _tails(name: str) -> Iterable[str]:
    """The name and each trailing dotted part of it that does not start at a layer number."""
    parts = name.split(".")
    return (".".join(parts[i:]) for i in range(len(parts)) if not parts[i].isdigit())


def find_units(model: nn.Module) -> list[Unit]:
    """The ordered quantizable units of ``model``; raises if it has no repeated layer list."""
    found: list = []
    _walk(model, "", [], found)
    if not any(kind == "list" for kind, *_ in found):
        raise ValueError(f"{type(model).__name__} has no repeated layer list with linear layers; qvlm supports {SUPPORTED}")
    units: list[Unit] = []
    for i, (kind, path, module, segment) in enumerate(found):
        if kind == "list":
            for j, layer in enumerate(module):
                units.append(Unit(len(units), f"{path}.{j}", segment, _linear_names(layer)))
        elif _between_vision_and_language(found, i):
            units.append(Unit(len(units), path, "projector", _linear_names(module)))
    return units


def _between_vision_and_language(found: list, i: int) -> bool:
    before = [seg for kind, _, _, seg in found[:i] if kind == "list"]
    after = [seg for kind, _, _, seg in found[i + 1 :] if kind == "list"]
    return bool(before) and before[-1] == "vision" and bool(after) and after[0] == "language"


def segments_of(units: list[Unit]) -> list[list[Unit]]:
    """Consecutive runs of units that share a segment and a layer list (the streams D is defined on)."""
    runs: list[list[Unit]] = []
    for unit in units:
        parent = unit.name.rsplit(".", 1)[0]
        if runs and runs[-1][-1].segment == unit.segment and runs[-1][-1].name.rsplit(".", 1)[0] == parent:
            runs[-1].append(unit)
        else:
            runs.append([unit])
    return runs
