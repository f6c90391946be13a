"""Calibration and evaluation batches for a model directory, with the preprocessor its family needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

from qvlm.config import CalibrationSettings
from qvlm.loading import load_processor
from qvlm.calibration import load_records, make_batches, make_pixel_batches
from qvlm.records import CalibrationRecord
from qvlm.answers import find_answer_spans
from qvlm.evaluate import Comparison, EvalSkipped, answered_batches

Batch = dict[str, torch.Tensor]


def _kind(config) -> str:
    has_vision = hasattr(config, "vision_config")
    has_text = hasattr(config, "text_config") or hasattr(config, "vocab_size")
    if has_vision and has_text:
        return "multimodal"
    if has_vision or hasattr(config, "image_size"):
        return "vision"
    return "text"


def records_for(settings: CalibrationSettings) -> tuple[list[CalibrationRecord], list[CalibrationRecord]]:
    """(calibration records, held-out evaluation records), both drawn with the job's seed."""
    total = settings.samples + settings.eval_samples
    asked = f"samples + eval_samples = {settings.samples} + {settings.eval_samples} = {total}"
    records = load_records(settings.data, total, settings.seed, asked if settings.eval_samples else None)
    return records[: settings.samples], records[settings.samples :]


def load_preprocessor(model_dir: str | Path) -> tuple[str, Any]:
    """(kind, preprocessor): an image processor for a vision encoder, a processor for a multimodal model,
    else a tokenizer."""
    config = AutoConfig.from_pretrained(model_dir)
    kind = _kind(config)
    if kind == "vision":
        return kind, AutoImageProcessor.from_pretrained(model_dir)
    return kind, load_processor(model_dir, config) if kind == "multimodal" else AutoTokenizer.from_pretrained(model_dir)


def make_batches_of(kind: str, preprocessor: Any, records: list[CalibrationRecord], settings: CalibrationSettings,
                    include_answer: bool = True) -> list[Batch]:
    if kind == "vision":
        return make_pixel_batches(records, preprocessor, settings.batch_size)
    return make_batches(records, preprocessor, settings.max_length, settings.batch_size, include_answer)


def batches_for(model_dir: str | Path, records: list[CalibrationRecord], settings: CalibrationSettings,
                include_answer: bool = True) -> list[Batch]:
    return make_batches_of(*load_preprocessor(model_dir), records, settings, include_answer)


def calibration_batches(model_dir: str | Path, settings: CalibrationSettings) -> list[Batch]:
    return batches_for(model_dir, records_for(settings)[0], settings)


def answer_masks(model_dir: str | Path, records: list[CalibrationRecord], settings: CalibrationSettings) -> list[torch.Tensor] | None:
    """Per batch of ``batches_for(model_dir, records, settings)``: True at the positions whose next token belongs
    to the record's answer. None when no record has an answer that fits in ``max_length`` (nothing to supervise).
    """
    kind, preprocessor = load_preprocessor(model_dir)
    if kind == "vision" or all(r.answer is None for r in records):
        return None
    full = make_batches_of(kind, preprocessor, records, settings)
    prompts = make_batches_of(kind, preprocessor, records, settings, include_answer=False)
    masks = []
    for batch, spans in zip(full, find_answer_spans(prompts, full, records, settings.max_length), strict=True):
        mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        for row, span in enumerate(spans):
            if span is not None:
                mask[row, span[0] - 1 : span[1] - 1] = True
        masks.append(mask)
    return masks if any(bool(m.any()) for m in masks) else None


def calibration_answer_masks(model_dir: str | Path, settings: CalibrationSettings) -> list[torch.Tensor] | None:
    """``answer_masks`` of the calibration records, aligned with ``calibration_batches``."""
    return answer_masks(model_dir, records_for(settings)[0], settings)


def held_out_comparison(model_dir: str | Path, settings: CalibrationSettings) -> Comparison | EvalSkipped:
    """The held-out records' batches (with answers) and answer spans, ready to tally; or why there are none."""
    records = records_for(settings)[1]
    if not records:
        return EvalSkipped("calibration.eval_samples is 0")
    kind, preprocessor = load_preprocessor(model_dir)
    if kind == "vision":
        return EvalSkipped("a vision encoder alone has no next-token logits to compare")
    return Comparison(*answered_batches(records, preprocessor, settings.max_length, settings.batch_size))
