"""Tiny randomly initialised transformers models, saved like real sharded checkpoints, for tests and demos.

Every linear width is a multiple of 128 so the default weight group size divides all of them. Each
checkpoint is split over several safetensors shards with a ``model.safetensors.index.json``, like the
multi-gigabyte checkpoints the distributed loader reads shard by shard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertModel,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from qvlm.shapes import SHAPES_VOCAB, ShapesSpec, shapes_vocab

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
EXTRA_WORDS = ("a", "an", "the", "image", "of", "this", "in", "answer", ":", "yes", "no", "and", "there")
IMAGE_SIZE = 32
PATCH_SIZE = 8
MIN_SHARDS = 3  # at least 2 are required; 3 leaves room for tensor-size rounding


def build_shapes_tokenizer(spec: ShapesSpec | None = None, special: Mapping[str, str] | None = None) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the shapes vocabulary; prepends ``<s>`` like Llama's tokenizer.

    ``spec`` adds the words of a harder task (e.g. ``qvlm.shapes.HARD_SHAPES``); without it the vocabulary
    is the default task's, which the untrained tiny models' configs depend on. ``special`` adds a model
    family's own special tokens after the words (attribute name -> token, e.g. ``boi_token``), so the
    default ids stay as they are.
    """
    special = dict(special or {})
    words = sorted(set(SHAPES_VOCAB) | set(EXTRA_WORDS) | set(shapes_vocab(spec) if spec else ()))
    added = [t for t in dict.fromkeys(special.values()) if t not in SPECIAL_TOKENS]
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *words, *added))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        # transformers 5 names extra special tokens either as a list or as attributes (a dict), not both
        extra_special_tokens={"image_token": "<image>", **special} if special else ["<image>"],
        padding_side="right",
        model_max_length=256,
    )


def build_shapes_image_processor(image_size: int = IMAGE_SIZE) -> CLIPImageProcessor:
    """CLIP preprocessing at the tiny models' resolution (32x32 unless told)."""
    return CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def _token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    return {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def _llama_config(tokenizer: PreTrainedTokenizerFast, layers: int) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        use_cache=True,  # what real checkpoints ship with; capture must cope with it
        **_token_ids(tokenizer),
    )


def _clip_vision_config(layers: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=256,
        projection_dim=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )


def make_tiny_llava(seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """LLaVA (CLIP 2 layers + projector 128->128->128 + Llama 3 layers) and its processor, in memory."""
    tokenizer = build_shapes_tokenizer()
    config = LlavaConfig(
        vision_config=_clip_vision_config(layers=2),
        text_config=_llama_config(tokenizer, layers=3),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    processor = LlavaProcessor(
        image_processor=build_shapes_image_processor(),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,  # CLIP's CLS token; "default" drops it again
    )
    return model, processor


def make_tiny_llama(seed: int = 0) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Llama causal LM with 4 layers and the shapes tokenizer, in memory."""
    tokenizer = build_shapes_tokenizer()
    torch.manual_seed(seed)
    return LlamaForCausalLM(_llama_config(tokenizer, layers=4)).eval(), tokenizer


def make_tiny_clip_vision(seed: int = 0) -> tuple[CLIPVisionModel, CLIPImageProcessor]:
    """CLIP vision encoder with 3 layers and its image processor, in memory."""
    torch.manual_seed(seed)
    return CLIPVisionModel(_clip_vision_config(layers=3)).eval(), build_shapes_image_processor()


def make_tiny_bert(seed: int = 0) -> tuple[BertModel, PreTrainedTokenizerFast]:
    """BERT encoder with 2 layers and the shapes tokenizer, in memory."""
    tokenizer = build_shapes_tokenizer()
    config = BertConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        **_token_ids(tokenizer),
    )
    torch.manual_seed(seed)
    return BertModel(config).eval(), tokenizer


def _build(make: Callable[[int], tuple[Any, Any]], path: str | Path, seed: int) -> Path:
    """Save ``make(seed)``'s model in shards and its tokenizer/processor next to it."""
    path = Path(path)
    model, preprocessor = make(seed)
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    model.save_pretrained(path, max_shard_size=total // MIN_SHARDS + 1)
    preprocessor.save_pretrained(path)
    return path


def build_tiny_llava(path: str | Path, seed: int = 0) -> Path:
    """Save the tiny LLaVA and its processor at ``path``."""
    return _build(make_tiny_llava, path, seed)


def build_tiny_llama(path: str | Path, seed: int = 0) -> Path:
    """Save the tiny Llama and its tokenizer at ``path``."""
    return _build(make_tiny_llama, path, seed)


def build_tiny_clip_vision(path: str | Path, seed: int = 0) -> Path:
    """Save the tiny CLIP vision encoder and its image processor at ``path``."""
    return _build(make_tiny_clip_vision, path, seed)


def build_tiny_bert(path: str | Path, seed: int = 0) -> Path:
    """Save the tiny BERT and its tokenizer at ``path``."""
    return _build(make_tiny_bert, path, seed)


BUILDERS = {"llava": build_tiny_llava, "llama": build_tiny_llama, "clip": build_tiny_clip_vision, "bert": build_tiny_bert}


def main(argv: list[str] | None = None) -> None:
    """``python -m qvlm.tiny [llava|llama|clip|bert] DIR``: write a tiny model unless DIR already has one."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m qvlm.tiny", description=main.__doc__)
    parser.add_argument("kind", choices=sorted(BUILDERS))
    parser.add_argument("path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if (Path(args.path) / "config.json").exists():
        print(f"{args.path} already holds a model; leaving it")
        return
    print(f"wrote {BUILDERS[args.kind](args.path, args.seed)}")


if __name__ == "__main__":
    main()
