"""Calibration data: records from a built-in generator or a JSONL file, and model-input batches from records.

A JSONL file holds one object per line, ``{"image": <path or null>, "text": <str>, "answer": <optional str>}``;
image paths are relative to the file's folder; blank lines are skipped. ``builtin:shapes`` and
``builtin:shapes-hard`` generate records instead (``qvlm.shapes``); both give ``qvlm.records.CalibrationRecord``.

For a multimodal model each record's text gets exactly one image placeholder (the processor's own
``image_token``, ``<image>`` for LLaVA) per image: one already in the text stays where it stands, a
missing one is put in front, and a record with more placeholders than images is refused, naming its file
and line. Records with and without an image cannot share a batch. Batches are right-padded; the processor
expands the placeholder into one token per image feature, and truncation never cuts those away.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from PIL import Image

from qvlm.errors import InputError
from qvlm.records import CalibrationRecord
from qvlm.shapes import HARD_IMAGE_SIZE, HARD_SHAPES, make_shapes_records

_KEYS = ("image", "text", "answer")


class CalibrationError(InputError, ValueError):
    """Bad calibration data or settings; the message names the source (file and line) and how to fix it."""


def _builtin_shapes(samples: int, seed: int) -> list[CalibrationRecord]:
    return make_shapes_records(samples, seed)


def _builtin_shapes_hard(samples: int, seed: int) -> list[CalibrationRecord]:
    return make_shapes_records(samples, seed, HARD_IMAGE_SIZE, HARD_SHAPES)


BUILTINS: dict[str, Callable[[int, int], list[CalibrationRecord]]] = {
    "shapes": _builtin_shapes,
    "shapes-hard": _builtin_shapes_hard,  # the task bench/trained.py's LLaVA learns
}


def load_records(source: str, samples: int, seed: int, asked: str | None = None) -> list[CalibrationRecord]:
    """``samples`` records from ``builtin:<name>`` or a JSONL file (a seeded subset, in file order).

    ``asked`` says where ``samples`` comes from, for the error when a file has fewer records."""
    if samples < 1:
        raise CalibrationError(f"calibration source {source!r}: samples must be at least 1, got {samples}")
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        if name not in BUILTINS:
            known = ", ".join(f"builtin:{k}" for k in sorted(BUILTINS))
            raise CalibrationError(f"unknown calibration source {source!r}; known built-in sources: {known}")
        return BUILTINS[name](samples, seed)
    return _load_jsonl(Path(source), samples, seed, asked or f"samples={samples}")


def image_files(source: str) -> list[Path]:
    """The image files a JSONL source's records name, as the reader resolves them (none for a built-in source);
    for checks that the job's output leaves its inputs alone. Lines that do not parse are skipped."""
    if source.startswith("builtin:") or not Path(source).is_file():
        return []
    path, found = Path(source), []
    with path.open("rb") as f:
        for raw in f:
            try:
                row = json.loads(raw)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("image"), str):
                found.append(path.parent / row["image"])
    return list(dict.fromkeys(found))


def _load_jsonl(path: Path, samples: int, seed: int, asked: str) -> list[CalibrationRecord]:
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} not found; fix: give an existing .jsonl path or builtin:shapes")
    rows = []  # (line number, parsed record)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(path, lineno, raw)
            if line.strip():
                rows.append((lineno, _parse_line(path, lineno, line)))
    if len(rows) < samples:
        raise CalibrationError(
            f"calibration file {path} has {len(rows)} records, job asks for {asked}; "
            f"fix: add records or lower samples"
        )
    if len(rows) > samples:
        keep = sorted(random.Random(seed).sample(range(len(rows)), samples))
        rows = [rows[i] for i in keep]
    return [_materialise(path, lineno, row) for lineno, row in rows]


def _decode(path: Path, lineno: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"calibration file {path}, line {lineno}: not UTF-8 text ({e.reason} at byte {e.start}); "
                               f"fix: save the file as UTF-8 JSON lines") from None


def _parse_line(path: Path, lineno: int, line: str) -> dict[str, Any]:
    where = f"calibration file {path}, line {lineno}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise CalibrationError(f"{where}: invalid JSON ({e.msg}); fix: write one JSON object per line") from None
    if not isinstance(row, dict):
        raise CalibrationError(f"{where}: expected a JSON object, got {type(row).__name__}; fix: write {{\"text\": ...}}")
    unknown = sorted(set(row) - set(_KEYS))
    if unknown:
        raise CalibrationError(f"{where}: unknown field(s) {unknown}; fix: use only the fields {list(_KEYS)}")
    text = row.get("text")
    if not isinstance(text, str) or not text.strip():
        raise CalibrationError(f"{where}: field \"text\" is missing or empty; fix: give a non-empty string")
    for key in ("image", "answer"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise CalibrationError(f"{where}: field \"{key}\" must be a string or null, got {type(row[key]).__name__}")
    if row.get("image") is not None and not (path.parent / row["image"]).is_file():
        raise CalibrationError(
            f"{where}: field \"image\": file {path.parent / row['image']} not found; "
            f"fix: give a path relative to {path.parent} or null"
        )
    return row


def _materialise(path: Path, lineno: int, row: dict[str, Any]) -> CalibrationRecord:
    image = None
    if row.get("image") is not None:
        image_path = path.parent / row["image"]
        try:
            with Image.open(image_path) as im:
                image = im.convert("RGB")
        except (OSError, ValueError) as e:
            raise CalibrationError(
                f"calibration file {path}, line {lineno}: field \"image\": cannot read {image_path} ({e}); "
                f"fix: point it at a valid image file (PNG, JPEG, ...)"
            ) from None
    return CalibrationRecord(text=row["text"], image=image, answer=row.get("answer"),
                             origin=f"calibration file {path}, line {lineno}")


def record_text(record: CalibrationRecord, include_answer: bool = True) -> str:
    """The prompt, followed by the answer when asked for and present."""
    if include_answer and record.answer is not None:
        return f"{record.text} {record.answer}"
    return record.text


def _is_multimodal(processor: Any) -> bool:
    return getattr(processor, "image_processor", None) is not None


def make_batches(
    records: Sequence[CalibrationRecord], processor: Any, max_length: int, batch_size: int, include_answer: bool = True
) -> list[dict[str, torch.Tensor]]:
    """Model inputs for ``records`` in order, ``batch_size`` per batch (the last may be smaller).

    With a plain tokenizer (text-only model) the records' images are ignored.
    """
    if batch_size < 1 or max_length < 1:
        raise CalibrationError(f"batch_size and max_length must be at least 1, got {batch_size} and {max_length}")
    return [
        _make_batch(records[start : start + batch_size], processor, max_length, include_answer, start)
        for start in range(0, len(records), batch_size)
    ]


def _make_batch(chunk, processor, max_length: int, include_answer: bool, start: int) -> dict[str, torch.Tensor]:
    texts = [record_text(r, include_answer) for r in chunk]
    if not _is_multimodal(processor):
        enc = processor(texts)
        return _pad(enc["input_ids"], _pad_id(processor), max_length, None, start)
    with_image = [r.image is not None for r in chunk]
    if any(with_image) and not all(with_image):
        raise CalibrationError(
            f"calibration batch of records {start}..{start + len(chunk) - 1} mixes records with and without images; "
            f"fix: group image and text-only records apart in the file, or use batch_size=1"
        )
    placeholder = processor.image_token
    texts = [_with_image_placeholder(r, t, placeholder, start + i) for i, (r, t) in enumerate(zip(chunk, texts))]
    if not any(with_image):
        enc = processor(text=texts)
        return _pad(enc["input_ids"], _pad_id(processor.tokenizer), max_length, None, start)
    # One call per prompt, its image in a list of its own: the form every processor takes (Gemma 3 and Mllama
    # refuse a flat list of a batch's images); the rows are then batched here (collate_rows).
    rows = [processor(text=[t], images=[r.image], return_tensors="pt") for r, t in zip(chunk, texts)]
    inputs = set(getattr(processor, "model_input_names", ())) or None
    return collate_rows(rows, _pad_id(processor.tokenizer), max_length, _image_token_id(processor), start, inputs)


# Per-token inputs, [1, tokens, ...] per prompt: truncated to max_length and right-padded (input_ids with the pad
# id, the rest with 0). Every other input is batched along its first dimension (zero-padded to the largest row).
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "cross_attention_mask")
# Per-token inputs that mark a prompt's image tokens (non-zero), where the processor gives them.
_IMAGE_TOKEN_MARKS = ("mm_token_type_ids", "token_type_ids")


def collate_rows(rows: Sequence[Mapping[str, Any]], pad_id: int, max_length: int, image_id: int | None, start: int,
                 inputs: set[str] | None = None) -> dict[str, torch.Tensor]:
    """One batch of the processor's per-prompt outputs: every tensor the model takes (``inputs``, the processor's
    ``model_input_names``; None = every tensor), per-token inputs truncated to ``max_length`` (never dropping an
    image token) and right-padded to the longest row, the others batched along their first dimension."""
    keys = [k for k, v in rows[0].items() if isinstance(v, torch.Tensor) and (inputs is None or k in inputs)]
    for i, row in enumerate(rows):
        _check_image_tokens(row, image_id, max_length, start + i)
    width = min(max_length, max(int(r["input_ids"].shape[1]) for r in rows))
    batch = {}
    for key in keys:
        if key in TOKEN_INPUTS:
            fill = pad_id if key == "input_ids" else 0
            batch[key] = torch.cat([_padded(r[key][:, :width], 1, width, fill) for r in rows])
        else:
            batch[key] = _stack_padded([r[key] for r in rows])
    return batch


def _check_image_tokens(row: Mapping[str, Any], image_id: int | None, max_length: int, index: int) -> None:
    ids = row["input_ids"][0]
    mark = next((row[k][0] for k in _IMAGE_TOKEN_MARKS if isinstance(row.get(k), torch.Tensor)), None)
    image = (mark != 0) if mark is not None else (ids == image_id) if image_id is not None else None
    if image is None or not bool(image.any()):
        return
    last = int(image.nonzero().max()) + 1
    if last > max_length:
        raise CalibrationError(
            f"calibration record {index}: its image expands to {int(image.sum())} image tokens "
            f"(ending at position {last}) but max_length={max_length}; "
            f"fix: max_length must be at least {last} (plus room for the text)"
        )


def _padded(x: torch.Tensor, dim: int, size: int, fill: float) -> torch.Tensor:
    if x.shape[dim] >= size:
        return x
    shape = list(x.shape)
    shape[dim] = size - x.shape[dim]
    return torch.cat([x, torch.full(shape, fill, dtype=x.dtype)], dim=dim)


def _stack_padded(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``parts`` concatenated along dim 0, each first zero-padded in every other dimension to the largest."""
    if parts[0].dim() == 0:
        return torch.stack(list(parts))
    sizes = [max(int(p.shape[d]) for p in parts) for d in range(1, parts[0].dim())]
    for d, size in enumerate(sizes, start=1):
        parts = [_padded(p, d, size, 0) for p in parts]
    return torch.cat(list(parts))


def _with_image_placeholder(record: CalibrationRecord, text: str, placeholder: str, index: int) -> str:
    """``text`` (the record's prompt, perhaps with its answer) holding one ``placeholder`` per image of the record:
    a placeholder the prompt already has stays where it stands; a missing one is put in front."""
    where = record.origin or f"calibration record {index}"
    if record.answer is not None and placeholder in record.answer:
        raise CalibrationError(f"{where}: field \"answer\" holds the image placeholder {placeholder}; "
                               f"fix: put the placeholder in \"text\", where the image belongs")
    images, found = int(record.image is not None), record.text.count(placeholder)
    if found > images:
        held = f"{found} image placeholder{'s' if found > 1 else ''} {placeholder}"
        fix = (f"keep one {placeholder} where the image belongs (or none: it is then put in front of the text)"
               if images else f"remove {placeholder} from the text or give the record an \"image\"")
        raise CalibrationError(f"{where}: field \"text\" holds {held} but the record has {images or 'no'} image; "
                               f"fix: {fix}")
    return text if found == images else f"{placeholder} {text}"


def _image_token_id(processor: Any) -> int:
    token_id = getattr(processor, "image_token_id", None)
    return token_id if token_id is not None else processor.tokenizer.convert_tokens_to_ids(processor.image_token)


def _pad_id(tokenizer: Any) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0  # masked out by attention_mask, so any valid id does


def _pad(rows, pad_id: int, max_length: int, image_id: int | None, start: int) -> dict[str, torch.Tensor]:
    """Truncate each row to ``max_length`` (never dropping image tokens) and right-pad to the longest."""
    rows = [list(r) for r in rows]
    if image_id is not None:
        for i, row in enumerate(rows):
            last = max((j for j, t in enumerate(row) if t == image_id), default=-1)
            if last + 1 > max_length:
                raise CalibrationError(
                    f"calibration record {start + i}: its image expands to {row.count(image_id)} image tokens "
                    f"(ending at position {last + 1}) but max_length={max_length}; "
                    f"fix: max_length must be at least {last + 1} (plus room for the text)"
                )
    rows = [r[:max_length] for r in rows]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def make_pixel_batches(
    records: Sequence[CalibrationRecord], image_processor: Any, batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """``{"pixel_values": ...}`` batches for a vision-only encoder; every record needs an image."""
    if batch_size < 1:
        raise CalibrationError(f"batch_size must be at least 1, got {batch_size}")
    image_processor = getattr(image_processor, "image_processor", image_processor)
    missing = [i for i, r in enumerate(records) if r.image is None]
    if missing:
        raise CalibrationError(
            f"calibration records {missing[:5]} have no image but the model is a vision encoder; "
            f"fix: give every record an \"image\""
        )
    return [
        {"pixel_values": image_processor(images=[r.image for r in records[s : s + batch_size]], return_tensors="pt")["pixel_values"]}
        for s in range(0, len(records), batch_size)
    ]
