"""The publish gate (``output.gate``): the evaluation's figures against the job's thresholds.

A job whose gate fails is held: its checkpoint, report and block records stay in the output, but no manifest
is written, so nothing vouches for it as finished (``qvlm verify`` refuses it). What was held is recorded in
``_qvlm/held.json`` (every file with its size and sha256, the figures and the verdict), so that a re-submit
with another gate publishes it without searching or evaluating again, once its files still match.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from qvlm.errors import InputError, JobFailed
from qvlm.evaluate import EvalResult, EvalSkipped, Evaluation
from cluster.job import Gate
from workers.storage import StorageError

HELD_KEY = "_qvlm/held.json"


class GateHeld(JobFailed):
    """The gate failed: the output is held, not published (exit 1)."""


def check_gate_applies(gate: Gate, held_out) -> None:
    """Refuse (exit 2, naming the field) a gate that could only fail: ``max_accuracy_drop`` without a held-out
    record that has an answer (a gate without held-out records is refused with the job file)."""
    if not gate.is_set():
        return
    if gate.max_accuracy_drop is not None and not any(r.answer for r in held_out):
        raise InputError(f"output.gate.max_accuracy_drop: none of the {len(held_out)} held-out records has an answer, "
                         "so answer accuracy cannot be measured; use calibration data with answers, or remove it")


def gate_figures(gate: Gate, evaluation: Evaluation | None) -> list[tuple[str, bool]]:
    """One (line, passed) per threshold set: the figure against it."""
    if not isinstance(evaluation, EvalResult):
        why = evaluation.reason if isinstance(evaluation, EvalSkipped) else "no evaluation ran"
        return [(f"output.gate: no figures to check ({why})", False)]
    checks = []
    if gate.max_kl is not None:
        checks.append((f"KL {evaluation.kl_mean:.4g} nats (max_kl {gate.max_kl:g})", evaluation.kl_mean <= gate.max_kl))
    if gate.min_top1 is not None:
        checks.append((f"top-1 agreement {evaluation.top1_agreement:.4f} (min_top1 {gate.min_top1:g})",
                       evaluation.top1_agreement >= gate.min_top1))
    if gate.max_accuracy_drop is not None:
        checks.append(_accuracy_check(evaluation, gate.max_accuracy_drop))
    return checks


def _accuracy_check(evaluation: EvalResult, limit: float) -> tuple[str, bool]:
    if evaluation.fp_accuracy is None or evaluation.q_accuracy is None:
        return "answer accuracy: no held-out record has an answer (max_accuracy_drop cannot be checked)", False
    drop = evaluation.fp_accuracy - evaluation.q_accuracy
    return (f"answer accuracy drop {drop:.4f} (FP {evaluation.fp_accuracy:.4f}, quantized {evaluation.q_accuracy:.4f}; "
            f"max_accuracy_drop {limit:g})", drop <= limit)


def gate_verdict(gate: Gate, evaluation: Evaluation | None) -> tuple[bool, str]:
    """(passed, one line with every figure against its threshold); a gate that sets nothing passes."""
    if not gate.is_set():
        return True, "no gate"
    checks = gate_figures(gate, evaluation)
    passed = all(ok for _, ok in checks)
    return passed, "; ".join(f"{line}: {'pass' if ok else 'FAIL'}" for line, ok in checks)


def held_message(name: str, uri: str, verdict: str) -> str:
    return (f"[{name}] held by the gate: {verdict}. The checkpoint, report and blocks stay in {uri} without a "
            "manifest; re-submit with a looser output.gate to publish it without searching again")


def write_held(out, files: dict, evaluation: Evaluation | None, provenance: dict, verdict: str) -> None:
    """What a held output holds (every file with size and sha256), the figures it was held on and the
    provenance its manifest will carry once published."""
    figures = asdict(evaluation) if isinstance(evaluation, EvalResult) else None
    doc = {"files": files, "evaluation": figures, "provenance": provenance, "verdict": verdict}
    out.put_bytes(HELD_KEY, json.dumps(doc, indent=1, sort_keys=True).encode())


def read_held(out) -> tuple[dict, EvalResult, dict] | None:
    """(files, evaluation, provenance) of a held output; None when there is none or it cannot be read (then the
    job runs again as a resume)."""
    try:
        doc = json.loads(out.get_bytes(HELD_KEY))
        return dict(doc["files"]), EvalResult(**doc["evaluation"]), dict(doc["provenance"])
    except (StorageError, ValueError, KeyError, TypeError):
        return None
