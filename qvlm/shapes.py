"""The built-in synthetic "shapes" task: one coloured shape on a plain background, a question, a one-word answer.

Scenes are drawn from a seeded ``random.Random`` and pixel noise from a numpy Generator with the same seed, so the
same ``(n, seed, image_size, spec)`` always gives the same records. ``ShapesSpec`` holds the knobs a harder
variant can turn (more colours, backgrounds, noise, jitter); its defaults are the task as first defined.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from qvlm.calibration import CalibrationRecord

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
# Shape centre as a fraction of the image side (x, y).
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
QUESTIONS: dict[str, str] = {
    "color": "what color is the shape ?",
    "shape": "what shape is it ?",
    "position": "where is the shape ?",
}


@dataclass(frozen=True)
class ShapesSpec:
    """Parameters of the task; the defaults are the standard (easy) variant."""

    colors: tuple[str, ...] = tuple(COLORS)
    shapes: tuple[str, ...] = SHAPES
    positions: tuple[str, ...] = tuple(POSITIONS)
    questions: tuple[str, ...] = tuple(QUESTIONS)  # attributes that may be asked about
    background: tuple[int, int, int] = (245, 245, 245)
    size_fraction: float = 0.32  # shape side as a fraction of the image side
    jitter: float = 0.04  # max centre offset as a fraction of the image side
    noise: float = 0.0  # std of additive Gaussian pixel noise, in 0..255 units

    def __post_init__(self) -> None:
        for name, known in (("colors", COLORS), ("positions", POSITIONS), ("questions", QUESTIONS)):
            unknown = set(getattr(self, name)) - set(known)
            if unknown:
                raise ValueError(f"ShapesSpec.{name} has unknown values {sorted(unknown)}; known: {sorted(known)}")
        if set(self.shapes) - set(SHAPES):
            raise ValueError(f"ShapesSpec.shapes must be among {SHAPES}, got {self.shapes}")


def shapes_vocab(spec: ShapesSpec = ShapesSpec()) -> tuple[str, ...]:
    """Every word a question or answer of ``spec`` can use, sorted."""
    words = {w for q in spec.questions for w in QUESTIONS[q].split()}
    words.update(spec.colors, spec.shapes, spec.positions)
    return tuple(sorted(words))


SHAPES_VOCAB: tuple[str, ...] = shapes_vocab()


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, half: float, fill) -> None:
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)


def _render(
    rng: random.Random, noise_rng: np.random.Generator, spec: ShapesSpec, image_size: int, color: str, shape: str, position: str
) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), spec.background)
    fx, fy = POSITIONS[position]
    cx = (fx + rng.uniform(-spec.jitter, spec.jitter)) * image_size
    cy = (fy + rng.uniform(-spec.jitter, spec.jitter)) * image_size
    _draw_shape(ImageDraw.Draw(image), shape, cx, cy, spec.size_fraction * image_size / 2, COLORS[color])
    if spec.noise > 0:
        pixels = np.asarray(image, dtype=np.float32) + noise_rng.normal(0.0, spec.noise, (image_size, image_size, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))
    return image


def make_shapes_records(n: int, seed: int, image_size: int = 32, spec: ShapesSpec | None = None) -> list[CalibrationRecord]:
    """``n`` records (image, question, one-word answer), deterministic for ``seed``."""
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    spec = spec or ShapesSpec()
    rng = random.Random(seed)
    noise_rng = np.random.default_rng(seed)  # a separate stream: noise leaves the scenes unchanged
    records = []
    for _ in range(n):
        color, shape, position = rng.choice(spec.colors), rng.choice(spec.shapes), rng.choice(spec.positions)
        asked = rng.choice(spec.questions)
        image = _render(rng, noise_rng, spec, image_size, color, shape, position)
        answer = {"color": color, "shape": shape, "position": position}[asked]
        records.append(CalibrationRecord(text=QUESTIONS[asked], image=image, answer=answer))
    return records
