"""The calibration record: what every calibration source (a JSONL file, ``qvlm.shapes``) yields."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from PIL import Image


@dataclass(frozen=True)
class CalibrationRecord:
    text: str  # the prompt (question) text, without the answer
    image: "Image.Image | None" = None
    answer: str | None = None  # expected answer for QA data, else None
    origin: str | None = field(default=None, compare=False)  # "calibration file F, line N" for JSONL records


def records_sha256(records) -> str:
    """sha256 over the records in order: each one's text, answer and image (mode, size and pixels), so the same
    digest means the same calibration whatever file or source the records came from."""
    digest = hashlib.sha256()
    for record in records:
        image = record.image
        shape = [image.mode, *image.size] if image is not None else None
        digest.update(json.dumps([record.text, record.answer, shape]).encode())
        if image is not None:
            digest.update(image.tobytes())
    return digest.hexdigest()
