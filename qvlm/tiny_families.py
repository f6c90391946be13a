"""Tiny random-weight models of the vision-language families qvlm supports beyond LLaVA, each with an offline
processor (the shapes tokenizer plus the family's special tokens, the family's PIL image processor), for tests.

Every linear width is a multiple of 128 (the default weight group size); one or two layers per stack.
Saved like real sharded checkpoints (``python -m qvlm.tiny_families qwen2_5_vl DIR``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMProcessor,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from qvlm.loading import without_video
from qvlm.tiny import IMAGE_SIZE, PATCH_SIZE, _build, _clip_vision_config, _llama_config, _token_ids, build_shapes_tokenizer

_TEXT = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": False}
_VISION = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
           "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE}


def _seeded(cls, config, seed: int):
    torch.manual_seed(seed)
    return cls(config).eval()


def make_tiny_llava_next(seed: int = 0):
    """LLaVA-NeXT (any-resolution tiles of a CLIP tower, the image newline parameter, a Llama decoder)."""
    tokenizer = build_shapes_tokenizer()
    pinpoints = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE]]
    config = LlavaNextConfig(
        vision_config=_clip_vision_config(layers=2), text_config=_llama_config(tokenizer, layers=2),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False,
    )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                                   vision_feature_select_strategy="default", image_token="<image>",
                                   num_additional_image_tokens=1)
    return _seeded(LlavaNextForConditionalGeneration, config, seed), processor


def make_tiny_llava_onevision(seed: int = 0):
    """LLaVA-OneVision (any-resolution tiles of a SigLIP tower, the image newline parameter, a Qwen2 decoder)."""
    tokenizer = build_shapes_tokenizer(special={"image_token": "<image>", "video_token": "<video>"})
    pinpoints = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE]]
    config = LlavaOnevisionConfig(
        vision_config={"model_type": "siglip_vision_model", **_VISION, "vision_use_head": False},
        text_config={"model_type": "qwen2", **_TEXT, **_token_ids(tokenizer)},
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"), image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1, vision_feature_select_strategy="full", tie_word_embeddings=False,
    )
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                                      image_grid_pinpoints=pinpoints)
    processor = without_video(LlavaOnevisionProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="full", image_token="<image>", video_token="<video>")
    return _seeded(LlavaOnevisionForConditionalGeneration, config, seed), processor


def _qwen_vl_tokenizer():
    """The shapes tokenizer with the Qwen2-VL/Qwen2.5-VL vision tokens, and their ids for the config."""
    special = {"vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>",
               "image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
    tokenizer = build_shapes_tokenizer(special=special)
    ids = {f"{k}_id": tokenizer.convert_tokens_to_ids(v) for k, v in special.items()}
    return tokenizer, ids


def _qwen_vl_processor(processor_class, tokenizer):
    image_processor = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2,
                                               min_pixels=IMAGE_SIZE * IMAGE_SIZE, max_pixels=IMAGE_SIZE * IMAGE_SIZE)
    return without_video(processor_class)(image_processor=image_processor, tokenizer=tokenizer)


_QWEN_VL_TEXT = {**{k: v for k, v in _TEXT.items() if k != "tie_word_embeddings"},
                 "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}}


def make_tiny_qwen2_vl(seed: int = 0):
    """Qwen2-VL (vision blocks, patch merger, decoder with 3-D multimodal rotary positions)."""
    tokenizer, ids = _qwen_vl_tokenizer()
    config = Qwen2VLConfig(
        text_config={**_QWEN_VL_TEXT, **_token_ids(tokenizer)},
        vision_config={"depth": 2, "embed_dim": 128, "hidden_size": 128, "mlp_ratio": 2, "num_heads": 4,
                       "patch_size": 8, "spatial_merge_size": 2, "temporal_patch_size": 2},
        **ids, tie_word_embeddings=False,
    )
    return _seeded(Qwen2VLForConditionalGeneration, config, seed), _qwen_vl_processor(Qwen2VLProcessor, tokenizer)


def make_tiny_qwen2_5_vl(seed: int = 0):
    """Qwen2.5-VL (windowed vision blocks, patch merger, decoder with 3-D multimodal rotary positions)."""
    tokenizer, ids = _qwen_vl_tokenizer()
    config = Qwen2_5_VLConfig(
        text_config={**_QWEN_VL_TEXT, **_token_ids(tokenizer)},
        vision_config={"depth": 2, "hidden_size": 128, "intermediate_size": 256, "num_heads": 4, "patch_size": 8,
                       "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 32, "out_hidden_size": 128,
                       "fullatt_block_indexes": [1]},
        **ids, tie_word_embeddings=False,
    )
    return _seeded(Qwen2_5_VLForConditionalGeneration, config, seed), _qwen_vl_processor(Qwen2_5_VLProcessor, tokenizer)


def make_tiny_gemma3(seed: int = 0):
    """Gemma 3 (SigLIP tower, pooling multi-modal projector, decoder of sliding and global attention layers)."""
    special = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tokenizer = build_shapes_tokenizer(special=special)
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in special.items()}
    config = Gemma3Config(
        text_config={**_TEXT, **_token_ids(tokenizer), "head_dim": 32, "query_pre_attn_scalar": 32,
                     "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]},
        vision_config={"model_type": "siglip_vision_model", **_VISION, "vision_use_head": False},
        mm_tokens_per_image=4, boi_token_index=ids["boi_token"], eoi_token_index=ids["eoi_token"],
        image_token_index=ids["image_token"], tie_word_embeddings=False,
    )
    image_processor = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4)
    return _seeded(Gemma3ForConditionalGeneration, config, seed), processor


def _idefics3_layout(config_cls, processor_cls, image_processor_cls, model_cls, seed: int):
    """SigLIP-like tower, pixel-shuffle connector, Llama decoder: Idefics3's layout, which SmolVLM shares."""
    special = {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
               "global_image_token": "<global-img>"}
    tokenizer = build_shapes_tokenizer(special=special)
    config = config_cls(
        vision_config={**_VISION}, text_config=_llama_config(tokenizer, layers=2).to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=2, tie_word_embeddings=False,
    )
    image_processor = image_processor_cls(size={"longest_edge": IMAGE_SIZE}, do_image_splitting=False,
                                          max_image_size={"longest_edge": IMAGE_SIZE})
    processor = processor_cls(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4)
    return _seeded(model_cls, config, seed), processor


def make_tiny_idefics3(seed: int = 0):
    """Idefics3."""
    return _idefics3_layout(Idefics3Config, Idefics3Processor, Idefics3ImageProcessorPil,
                            Idefics3ForConditionalGeneration, seed)


def make_tiny_smolvlm(seed: int = 0):
    """SmolVLM (its processor built without the video processor)."""
    return _idefics3_layout(SmolVLMConfig, without_video(SmolVLMProcessor), SmolVLMImageProcessorPil,
                            SmolVLMForConditionalGeneration, seed)


def make_tiny_mllama(seed: int = 0):
    """Mllama (tiled vision encoder with global layers, decoder with interleaved cross-attention layers)."""
    special = {"image_token": "<|image|>"}
    tokenizer = build_shapes_tokenizer(special=special)
    config = MllamaConfig(
        vision_config={"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_global_layers": 1,
                       "attention_heads": 4, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "max_num_tiles": 2,
                       "vision_output_dim": 256, "intermediate_layers_indices": [0],
                       "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]]},
        text_config={**{k: v for k, v in _TEXT.items() if k != "tie_word_embeddings"}, **_token_ids(tokenizer),
                     "num_hidden_layers": 2, "cross_attention_layers": [1]},
        image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"),
    )
    image_processor = MllamaImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, max_image_tiles=2)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model = _seeded(MllamaForConditionalGeneration, config, seed)
    with torch.no_grad():  # the cross-attention gates start at 0 (tanh(0) = 0: the image would not reach the text)
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(1.0)
    return model, processor


FAMILY_MAKERS = {
    "llava_next": make_tiny_llava_next,
    "llava_onevision": make_tiny_llava_onevision,
    "qwen2_vl": make_tiny_qwen2_vl,
    "qwen2_5_vl": make_tiny_qwen2_5_vl,
    "gemma3": make_tiny_gemma3,
    "idefics3": make_tiny_idefics3,
    "smolvlm": make_tiny_smolvlm,
    "mllama": make_tiny_mllama,
}


def build_tiny_family(family: str, path: str | Path, seed: int = 0) -> Path:
    """Save the tiny model of ``family`` (a key of ``FAMILY_MAKERS``) and its processor at ``path``."""
    return _build(FAMILY_MAKERS[family], path, seed)


def main(argv: list[str] | None = None) -> None:
    """``python -m qvlm.tiny_families FAMILY DIR``: write the family's tiny model."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m qvlm.tiny_families", description=main.__doc__)
    parser.add_argument("family", choices=sorted(FAMILY_MAKERS))
    parser.add_argument("path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"wrote {build_tiny_family(args.family, args.path, args.seed)}")


if __name__ == "__main__":
    main()
