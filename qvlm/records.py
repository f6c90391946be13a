"""The calibration record: what every calibration source (a JSONL file, ``qvlm.shapes``) yields."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image


@dataclass(frozen=True)
class CalibrationRecord:
    text: str  # the prompt (question) text, without the answer
    image: "Image.Image | None" = None
    answer: str | None = None  # expected answer for QA data, else None
    origin: str | None = field(default=None, compare=False)  # "calibration file F, line N" for JSONL records
