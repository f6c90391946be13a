"""Where each record's answer sits in its batch: the tokens a teacher-forced model must predict to answer (for
VEO's next-token loss and the evaluation's answer accuracy)."""

from __future__ import annotations

from typing import Sequence

import torch

from qvlm.records import CalibrationRecord

Batch = dict[str, torch.Tensor]
Span = tuple[int, int] | None  # [start, end) of a record's answer tokens in its row, None = no answer


def answer_span(prompt_ids: Sequence[int], full_ids: Sequence[int]) -> Span:
    """Where the answer sits in ``full_ids`` (prompt + answer), from the same row tokenized without it.

    The answer is what differs between the two rows: strip their common prefix, then their common suffix
    (a tokenizer that appends EOS puts it after the answer).
    """
    prompt_ids, full_ids = list(prompt_ids), list(full_ids)
    start = 0
    while start < min(len(prompt_ids), len(full_ids)) and prompt_ids[start] == full_ids[start]:
        start += 1
    tail = 0
    while tail < min(len(prompt_ids), len(full_ids)) - start and prompt_ids[-1 - tail] == full_ids[-1 - tail]:
        tail += 1
    end = len(full_ids) - tail
    return (start, end) if 0 < start < end else None


def _row_ids(batch: Batch, row: int) -> list[int]:
    return batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()


def find_answer_spans(prompt_batches: list[Batch], full_batches: list[Batch],
                 records: Sequence[CalibrationRecord], max_length: int) -> list[list[Span]]:
    """Per batch, per row: the answer span, or None when the record has no answer or may be truncated.

    A row of exactly ``max_length`` tokens may have lost part of its answer, so it is left out rather
    than graded on a fragment.
    """
    spans, i = [], 0
    for prompt, full in zip(prompt_batches, full_batches, strict=True):
        row_spans = []
        for row in range(full["input_ids"].shape[0]):
            full_ids = _row_ids(full, row)
            fits = records[i].answer is not None and len(full_ids) < max_length
            row_spans.append(answer_span(_row_ids(prompt, row), full_ids) if fits else None)
            i += 1
        spans.append(row_spans)
    return spans
