"""Quantized vs full-precision model on held-out records: next-token KL, top-1 agreement, answer accuracy.

Both models run teacher-forced over the same batches (prompt followed by the answer). A position counts
when it and the next token are real tokens (``attention_mask``). A record is answered correctly when the
argmax at every answer position predicts the answer token, all in the one forward pass.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from qvlm.answers import Span, find_answer_spans
from qvlm.calibration import make_batches
from qvlm.records import CalibrationRecord

Batch = dict[str, torch.Tensor]
ROWS_AT_ONCE = 1024  # positions whose log-softmax is computed together


@dataclass(frozen=True)
class EvalResult:
    tokens: int  # valid next-token positions compared
    kl_mean: float  # mean over positions of KL(P_fp || P_q), nats
    top1_agreement: float  # fraction of positions where the argmaxes agree
    questions: int  # records with an answer (that fits in max_length)
    fp_accuracy: float | None  # None when no record has an answer
    q_accuracy: float | None


@dataclass(frozen=True)
class EvalSkipped:
    """No evaluation ran, and why."""

    reason: str


Evaluation = EvalResult | EvalSkipped


def evaluation_line(evaluation: Evaluation | None) -> str:
    """One line for people: the figures, or why there are none."""
    if evaluation is None:
        return "evaluation: none"
    if isinstance(evaluation, EvalSkipped):
        return f"evaluation: skipped ({evaluation.reason})"
    line = (f"evaluation on {evaluation.tokens} held-out positions: mean KL {evaluation.kl_mean:.4g} nats, "
            f"top-1 agreement {evaluation.top1_agreement:.1%}")
    if evaluation.questions:
        line += f", answer accuracy FP {evaluation.fp_accuracy:.1%} vs quantized {evaluation.q_accuracy:.1%}"
    return line


@dataclass
class Tally:
    tokens: int = 0
    kl_sum: float = 0.0
    agree: int = 0
    questions: int = 0
    fp_correct: int = 0
    q_correct: int = 0

    def add(self, fp: torch.Tensor, q: torch.Tensor, batch: Batch, spans: Sequence[Span]) -> None:
        """One batch's logits of both models (float32, on one device), taken ``ROWS_AT_ONCE`` positions at a time
        so that the log-softmax of a large vocabulary never doubles the batch's logits."""
        mask = batch["attention_mask"].bool().to(fp.device)
        valid = mask[:, :-1] & mask[:, 1:]  # position t and its next token t + 1 are both real tokens
        rows, cols = valid.nonzero(as_tuple=True)
        for start in range(0, rows.numel(), ROWS_AT_ONCE):
            r, c = rows[start : start + ROWS_AT_ONCE], cols[start : start + ROWS_AT_ONCE]
            log_p, log_q = F.log_softmax(fp[r, c], dim=-1), F.log_softmax(q[r, c], dim=-1)
            self.kl_sum += float((log_p.exp() * (log_p - log_q)).sum())
            self.agree += int((log_p.argmax(-1) == log_q.argmax(-1)).sum())
        input_ids = batch["input_ids"].to(fp.device)
        self.tokens += rows.numel()
        self.questions += sum(span is not None for span in spans)
        self.fp_correct += _correct(fp, input_ids, spans)
        self.q_correct += _correct(q, input_ids, spans)

    def result(self) -> EvalResult:
        def share(n: int, total: int) -> float | None:
            return n / total if total else None
        if not self.tokens:
            raise ValueError("no valid next-token positions to compare: every row is shorter than 2 tokens")
        return EvalResult(self.tokens, self.kl_sum / self.tokens, self.agree / self.tokens, self.questions,
                          share(self.fp_correct, self.questions), share(self.q_correct, self.questions))


def _device(model: Any) -> torch.device:
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return param.device if param is not None else torch.device("cpu")


@torch.inference_mode()
def _logits(model: Any, batch: Batch) -> torch.Tensor:
    device = _device(model)
    return model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()


def _correct(logits: torch.Tensor, input_ids: torch.Tensor, spans: Sequence[Span]) -> int:
    """Rows whose argmax predicts every answer token (the logits at t predict the token at t + 1)."""
    correct = 0
    for row, span in enumerate(spans):
        if span is not None:
            start, end = span
            correct += bool((logits[row, start - 1 : end - 1].argmax(-1) == input_ids[row, start:end]).all())
    return correct


def compare_models(fp_model: Any, q_model: Any, batches: list[Batch],
                   answer_spans: list[list[Span]] | None = None) -> EvalResult:
    """Compare ``q_model`` with ``fp_model`` on ``batches`` (each model called as ``model(**batch).logits``).

    ``answer_spans`` (from :func:`find_answer_spans`, per batch and row) enables answer accuracy.
    """
    if answer_spans is not None and len(answer_spans) != len(batches):
        raise ValueError(f"answer_spans has {len(answer_spans)} batches, batches has {len(batches)}")
    tally = Tally()
    for i, batch in enumerate(batches):
        spans = answer_spans[i] if answer_spans is not None else [None] * batch["input_ids"].shape[0]
        tally.add(_logits(fp_model, batch), _logits(q_model, batch), batch, spans)
    return tally.result()


def answered_batches(records: Sequence[CalibrationRecord], processor: Any, max_length: int,
                     batch_size: int) -> tuple[list[Batch], list[list[Span]]]:
    """Batches with the answers, and each row's answer span (from the same records tokenized without them)."""
    full = make_batches(records, processor, max_length, batch_size, include_answer=True)
    prompts = make_batches(records, processor, max_length, batch_size, include_answer=False)
    return full, find_answer_spans(prompts, full, records, max_length)


def evaluate_records(fp_model: Any, q_model: Any, processor: Any, records: Sequence[CalibrationRecord],
                     max_length: int, batch_size: int) -> EvalResult:
    """The two whole models on the records' batches (with answers)."""
    return compare_models(fp_model, q_model, *answered_batches(records, processor, max_length, batch_size))


class Comparison:
    """The held-out batches of a run through stages, and the tally of their logits as they come back: a batch's
    full-precision logits wait here for its quantized ones."""

    def __init__(self, batches: list[Batch], spans: list[list[Span]]):
        self.batches, self.spans = batches, spans
        self.tally = Tally()
        self._fp: dict[int, torch.Tensor] = {}

    def add(self, index: int, logits: torch.Tensor, quantized: bool) -> None:
        if not quantized:
            self._fp[index] = logits.float()
            return
        self.tally.add(self._fp.pop(index), logits.float(), self.batches[index], self.spans[index])

    def result(self) -> EvalResult:
        if self._fp:
            raise RuntimeError(f"held-out batches {sorted(self._fp)} have full-precision logits but no quantized ones")
        return self.tally.result()


def evaluation_phase(pipe: Any, n_batches: int, progress: Callable[[int, int], None]) -> EvalResult:
    """Every held-out batch through the stages twice, in full precision and quantized (each stage switches its
    own linears); the first stage finishes each forward pass and tallies. ``pipe`` is a
    :class:`qvlm.method.Pipeline` whose stages hold their evaluation (``Stage.prepare_evaluation``). Forward
    passes run as many batches ahead of the tallies as there are stages, so that the stages overlap."""

    def forward(index: int, quantized: bool) -> Any:
        ref = pipe.call(0, "evaluate_forward", index, quantized)
        for s in range(1, pipe.n_stages):
            ref = pipe.call(s, "evaluate_forward", ref, quantized)
        return ref

    def tally(index: int, fp: Any, q: Any) -> list:
        return [pipe.call(0, "evaluate_head", index, fp, False), pipe.call(0, "evaluate_head", index, q, True)]

    ahead: deque = deque()
    tallied: list = []
    for index in range(n_batches):
        ahead.append((index, forward(index, False), forward(index, True)))
        if len(ahead) > pipe.n_stages:
            tallied += tally(*ahead.popleft())
    while ahead:
        tallied += tally(*ahead.popleft())
    for count, _ in enumerate(pipe.completed(tallied), start=1):
        if count % 2 == 0:
            progress(count // 2, n_batches)
    return pipe.get(pipe.call(0, "evaluation"))
