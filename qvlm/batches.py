"""Calibration and evaluation batches for a model directory, with the preprocessor its family needs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer

from qvlm.calibration import CalibrationRecord, load_records, make_batches, make_pixel_batches

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class CalibrationSettings:
    data: str = "builtin:shapes"
    samples: int = 64
    eval_samples: int = 16
    max_length: int = 512
    batch_size: int = 8
    seed: int = 0


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
    records = load_records(settings.data, settings.samples + settings.eval_samples, settings.seed)
    return records[: settings.samples], records[settings.samples :]


def batches_for(model_dir: str | Path, records: list[CalibrationRecord], settings: CalibrationSettings,
                include_answer: bool = True) -> list[Batch]:
    config = AutoConfig.from_pretrained(model_dir)
    kind = _kind(config)
    if kind == "vision":
        return make_pixel_batches(records, AutoImageProcessor.from_pretrained(model_dir), settings.batch_size)
    processor = AutoProcessor.from_pretrained(model_dir) if kind == "multimodal" else AutoTokenizer.from_pretrained(model_dir)
    return make_batches(records, processor, settings.max_length, settings.batch_size, include_answer)


def calibration_batches(model_dir: str | Path, settings: CalibrationSettings) -> list[Batch]:
    return batches_for(model_dir, records_for(settings)[0], settings)
