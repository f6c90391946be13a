"""Build a model without weights and fill in only some of its tensors (for stage workers).

The skeleton's parameters live on the meta device while buffers (rotary frequencies, position ids) are
real, so a stage can run the parts it owns. Checkpoint keys are mapped to module names with transformers'
own conversion rules (transformers 5 saves LLaVA as ``language_model.model.layers.N``, its modules are
``model.language_model.layers.N``), so the mapping stays right as transformers changes it.
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Iterable, Mapping

import torch
import transformers
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightRenaming, rename_source_key

from qvlm.capture import disable_kv_cache
from qvlm.errors import InputError
from qvlm.families import MODEL_TYPES, supported_families


class ModelError(InputError, ValueError):
    """The model's files do not fit what qvlm needs; the message names the file and how to fix it."""


def load_config(config_dir: str | Path, shown: str) -> PretrainedConfig:
    """The config in ``config_dir``/config.json, refused with one clear line (naming ``shown``, the file as
    the user knows it) when it is missing, not JSON, or names a model type this transformers cannot build.
    Never runs code shipped with a model."""
    path = Path(config_dir) / "config.json"
    if not path.is_file():
        raise ModelError(f"{shown}: not found; model.path must be a folder written by save_pretrained "
                         "(config.json next to the safetensors files)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{shown}: invalid JSON ({exc}); re-download or re-save the model's config") from None
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if not isinstance(model_type, str) or not model_type:
        raise ModelError(f"{shown}: no \"model_type\" field; re-save the config with save_pretrained")
    if model_type not in CONFIG_MAPPING:
        raise ModelError(f"{shown}: model_type {model_type!r} is not a model transformers {transformers.__version__} "
                         "ships, and qvlm never runs code downloaded with a model; use a supported architecture "
                         "(e.g. llava, llama, clip_vision_model)")
    try:
        config = AutoConfig.from_pretrained(config_dir)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{shown}: transformers cannot read this config ({first}); re-save it with "
                         "save_pretrained") from None
    try:
        model_class(config)
    except ValueError as exc:
        raise ModelError(f"{shown}: {exc}") from None
    check_family(config, shown)
    return config


def check_family(config: PretrainedConfig, shown: str) -> None:
    """Refuse a vision-language model of a family no test proves (its inputs, units or streams may differ from
    every supported one); text-only decoders and encoders are found from their module tree alone."""
    multimodal = hasattr(config, "vision_config") and hasattr(config, "text_config")
    if multimodal and config.model_type not in MODEL_TYPES:
        raise ModelError(f"{shown}: model_type {config.model_type!r} is a vision-language family qvlm does not "
                         f"support yet; supported: {supported_families()}")


def model_class(config: PretrainedConfig) -> type:
    """The transformers class named by the config's ``architectures`` (what ``from_pretrained`` would build)."""
    names = getattr(config, "architectures", None) or []
    for name in names:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise ValueError(
        f"\"architectures\" names {names or 'no class'}, none of which transformers {transformers.__version__} "
        "provides; qvlm builds only model classes that ship with transformers (set architectures to one, "
        "e.g. LlavaForConditionalGeneration)"
    )


def build_skeleton(config: PretrainedConfig | dict) -> nn.Module:
    """The model with parameters on the meta device and real buffers; ``eval()`` mode."""
    if isinstance(config, dict):
        config = AutoConfig.for_model(**config)
    cls = model_class(config)
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)
    disable_kv_cache(model)  # a job never generates: no forward pass of it may build a KV cache
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


def without_video(processor_class: type) -> type:
    """``processor_class`` without its video processor: a job never passes videos, and transformers builds video
    processors only with torchvision (not a qvlm dependency). The image processor and tokenizer load as usual."""
    if "video_processor" not in processor_class.get_attributes():
        return processor_class

    def get_attributes(cls):
        return [a for a in processor_class.get_attributes() if a != "video_processor"]

    return type(processor_class.__name__, (processor_class,), {"get_attributes": classmethod(get_attributes),
                                                               "__init__": _video_processor_optional(processor_class.__init__),
                                                               "__module__": processor_class.__module__})


def _video_processor_optional(init):
    """``init`` with ``video_processor`` (and every parameter after it) defaulting to None where it has no default
    (SmolVLM's processor requires one). A copy of the function, not a wrapper: ``from_pretrained`` reads the
    processor's settings off the code object of ``__init__``."""
    code = init.__code__
    names = code.co_varnames[1 : code.co_argcount]
    defaults = init.__defaults__ or ()
    if "video_processor" not in names or len(names) - names.index("video_processor") <= len(defaults):
        return init
    missing = len(names) - names.index("video_processor") - len(defaults)
    optional = types.FunctionType(code, init.__globals__, init.__name__, (None,) * missing + defaults, init.__closure__)
    optional.__kwdefaults__, optional.__qualname__, optional.__doc__ = init.__kwdefaults__, init.__qualname__, init.__doc__
    return optional


def load_processor(model_dir: str | Path, config: PretrainedConfig) -> object:
    """The multimodal processor saved in ``model_dir`` (its image processor and tokenizer, no video processor),
    refused with one line naming the processor and what to install when transformers cannot build it here."""
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    name = PROCESSOR_MAPPING_NAMES.get(config.model_type)
    processor_class = getattr(transformers, name, None) if name else None
    if processor_class is None:
        raise ModelError(f"{model_dir}: transformers {transformers.__version__} has no processor for model_type "
                         f"{config.model_type!r}; qvlm supports {supported_families()}")
    try:
        return without_video(processor_class).from_pretrained(model_dir)
    except ImportError as exc:  # a backend (torchvision, ...) that this processor cannot do without
        raise ModelError(f"{model_dir}: the processor {name} cannot load here ({_first_line(exc)}); install what it "
                         "names, e.g. torchvision built for your torch (torch==2.14.1 with torchvision==0.29.1)") from None
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ModelError(f"{model_dir}: the processor {name} cannot load ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
