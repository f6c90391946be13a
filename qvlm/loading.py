"""Build a model without weights and fill in only some of its tensors (for stage workers).

The skeleton's parameters live on the meta device while buffers (rotary frequencies, position ids) are
real, so a stage can run the parts it owns. Checkpoint keys are mapped to module names with transformers'
own conversion rules (transformers 5 saves LLaVA as ``language_model.model.layers.N``, its modules are
``model.language_model.layers.N``), so the mapping stays right as transformers changes it.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
import transformers
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, PretrainedConfig
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightRenaming, rename_source_key


def model_class(config: PretrainedConfig) -> type:
    """The transformers class named by the config's ``architectures`` (what ``from_pretrained`` would build)."""
    names = getattr(config, "architectures", None) or []
    for name in names:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise ValueError(
        f"config.json names architectures {names or 'none'}, none of which this transformers "
        f"{transformers.__version__} provides; qvlm needs a model class that ships with transformers"
    )


def build_skeleton(config: PretrainedConfig | dict) -> nn.Module:
    """The model with parameters on the meta device and real buffers; ``eval()`` mode."""
    if isinstance(config, dict):
        config = AutoConfig.for_model(**config)
    cls = model_class(config)
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)
    return model.eval()


def checkpoint_key_map(model: nn.Module, file_keys: Iterable[str]) -> dict[str, str]:
    """Module parameter/buffer name -> checkpoint key, for every checkpoint key the model knows."""
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    meta = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)
    mapping = {}
    for key in file_keys:
        name, converter = rename_source_key(key, renamings, converters, prefix, meta)
        if converter is not None:
            raise NotImplementedError(
                f"checkpoint key {key!r} needs transformers' weight conversion {converter!r} (fused or split "
                "tensors); qvlm's shard loader reads only renamed keys so far"
            )
        if name in meta:
            mapping[name] = key
    return mapping


def owned_names(model: nn.Module, modules: Iterable[str]) -> list[str]:
    """State-dict names under any of the given module paths ("" = the whole model)."""
    prefixes = tuple(m + "." if m else "" for m in modules)
    return [n for n in model.state_dict() if n.startswith(prefixes)]


def glue_names(model: nn.Module, unit_modules: Iterable[str]) -> list[str]:
    """State-dict names outside every unit (embeddings, norms, vision stem, heads)."""
    prefixes = tuple(m + "." for m in unit_modules)
    return [n for n in model.state_dict() if not n.startswith(prefixes)]


def materialize(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Put the given tensors into the skeleton under their module names, then re-tie tied weights."""
    missing = set(tensors) - set(model.state_dict())
    if missing:
        raise KeyError(f"not in the model: {sorted(missing)[:5]}")
    model.load_state_dict(dict(tensors), strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
