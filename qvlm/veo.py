"""Visual-encoder optimisation (VEO, Q-VLM Eq. 8-10): tune the vision tower's quantizers so that the language
model's layers carry less cross-layer dependency, before the dependency is mined and the layers partitioned.

The authors never released this part; our reading (method.md 1.6):
- What moves: per vision-tower linear, the clipping scales of its weight groups (the alpha/beta in [0.5, 1] of
  ``search: learned``, rounding offsets fixed at 0) and, for static activation schemes, one clipping scale of its
  input range. Nothing else: the full-precision model, LayerNorms included, is unchanged, so the checkpoint
  keeps the source's unquantized tensors. Adam, straight-through rounding.
- The language model is frozen and runs in full precision (the paper keeps it with its initial quantizers; its
  quantizers are searched later, block by block, on what the tuned tower feeds it).
- Loss = next-token cross-entropy (on the answer tokens when the calibration records have answers, as LLaVA is
  instruction-tuned; else on every token) + lambda_entropy * sum_k w_k D(k, k+1) + lambda_error * (vision-output error
  + eta * logits error). D is the soft-assignment conditional entropy of consecutive decoder-layer outputs
  (qvlm/dependency.py) kept differentiable, on grids fixed from the full-precision pass. w_k = |dE/dX^(k)| of the
  logits error, taken on the first batch of each epoch and normalised to mean 1. Errors are relative squared
  errors (|q - r|^2 / |r|^2). Eq. 8 as printed equals -D and would raise the dependency; we minimise D.
- The vision output is what the projector consumes (the tower's selected feature layer), so layers after it,
  which the model never uses, get no gradient and keep round-to-nearest.

The tuned quantizers are the vision tower's result: its units form one block that is not searched again.

It runs through the stages that hold the model (:func:`veo_phase`, one stage's part in qvlm/veo_stage.py):
forward passes go down the stages as in the capture, with each stage keeping its graph; the first stage, which
holds the tower, the glue and the quantizers, computes the loss and sends the gradients back up the stages. A
one-process run is one stage holding every unit. What crosses a boundary per step: the hidden state and its
gradient, and each language unit's ``max_rows`` strided rows and their gradients (LLaVA-13B at the default
512 rows: 40 x 512 x 5120 float32, 0.4 GB each way).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qvlm.capture import unit_output
from qvlm.config import QuantConfig
from qvlm.dependency import ChannelGrid, chunk_counts, conditional_entropy_tensor
from qvlm.learned import LearnedWeightQuantizer
from qvlm.quant import ActRange, WeightScheme
from qvlm.search import BlockResult
from qvlm.structure import Unit, find_units

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class VeoResult:
    block: BlockResult  # the vision units with their tuned quantizers; errors = vision-output MSE
    history: tuple[dict, ...]  # per epoch: mean loss terms and the mean soft dependency
    seconds: float


@dataclass
class Quantizers:
    weights: dict[str, LearnedWeightQuantizer]
    act_base: dict[str, ActRange]  # calibrated full-precision input range per linear (static schemes)
    act_scale: dict[str, torch.Tensor]  # trainable shrink of that range, in [0.5, 1]

    def params(self) -> list[torch.Tensor]:
        return [p for q in self.weights.values() for p in (q.alpha, q.beta)] + list(self.act_scale.values())

    def act_range(self, name: str, detach: bool = False) -> ActRange | None:
        if name not in self.act_base:
            return None
        base, s = self.act_base[name], self.act_scale[name]
        s = s.detach() if detach else s
        return ActRange(base.lo * s, base.hi * s)

    @torch.no_grad()
    def clamp_(self) -> None:
        for q in self.weights.values():
            q.clamp_()
        for s in self.act_scale.values():
            s.clamp_(0.5, 1.0)


def vision_linear_names(units: Sequence[Unit]) -> list[str]:
    return [u.linear_name(n) for u in units if u.segment == "vision" for n in u.linears]


def tower_part(tower: BlockResult, unit_names: Sequence[str]) -> BlockResult:
    """The tuned tower's linears inside ``unit_names``: what one vision block holds once the partition numbers the
    tower's blocks (a tower of two layer lists, as Mllama's, is two streams and so two blocks). Errors and counts
    stay the whole tower's."""
    inside = tuple(r for r in tower.linears if any(r.name.startswith(u + ".") for u in unit_names))
    return replace(tower, unit_names=tuple(unit_names), linears=inside)


def check_veo_applies(units: Sequence[Unit]) -> None:
    """VEO needs a vision tower and a language model among the targeted units."""
    segments = {u.segment for u in units}
    if "vision" not in segments or "language" not in segments:
        raise ValueError("quantization.qvlm.veo needs a vision-language model with both the vision tower and the "
                         f"language model in quantization.targets (found segments {sorted(segments)}); turn veo off")


def _feature_tap(model: nn.Module, units: Sequence[Unit], store) -> torch.utils.hooks.RemovableHandle:
    """Hook that stores the vision output: the projector's input, else the last vision unit's output."""
    projector = [u for u in find_units(model) if u.segment == "projector"]
    if projector:
        def before(_m, args, kwargs):
            store(args[0] if args else next(iter(kwargs.values())))

        return model.get_submodule(projector[0].name).register_forward_pre_hook(before, with_kwargs=True)
    last = [u for u in units if u.segment == "vision"][-1]
    return model.get_submodule(last.name).register_forward_hook(lambda _m, _a, out: store(unit_output(out)))


@contextmanager
def taps(model: nn.Module, units: Sequence[Unit], language: Sequence[Unit]):
    """Record, per forward, the vision output and every language unit's output (graph kept for gradients)."""
    seen: dict = {"vision": None, "language": [None] * len(language)}
    hooks = [_feature_tap(model, units, lambda x: seen.__setitem__("vision", x))]
    for k, u in enumerate(language):
        hooks.append(model.get_submodule(u.name).register_forward_hook(
            lambda _m, _a, out, k=k: seen["language"].__setitem__(k, unit_output(out))))
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def token_mask(batch: Batch) -> torch.Tensor:
    mask = batch.get("attention_mask")
    return mask.bool() if mask is not None else torch.ones(batch["input_ids"].shape, dtype=torch.bool)


def next_token_loss(model: nn.Module, logits: torch.Tensor, batch: Batch, answers: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy on the next token: at the positions that predict answer tokens when the records have answers,
    else at every real position (image placeholders excluded as targets).

    A LLaVA is instruction-tuned with the loss on the answers only and never learned to predict its prompts; the
    cross-entropy of the prompt tokens is large, meaningless for the task, and pulls the tower off (measured:
    BENCHMARKS.md "VEO").
    """
    ids = batch["input_ids"]
    if answers is not None:
        valid = answers[:, :-1]
        if not bool(valid.any()):
            return logits.sum() * 0.0  # no answer fits in this batch: no task signal
    else:
        mask = token_mask(batch)
        valid = mask[:, 1:] & mask[:, :-1]
        image_id = getattr(model.config, "image_token_id", None)
        if image_id is not None:
            valid &= ids[:, 1:] != image_id
    return F.cross_entropy(logits[:, :-1][valid].float(), ids[:, 1:][valid])


def relative_error(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return ((q.float() - r.float()) ** 2).sum() / (r.float() ** 2).sum().clamp_min(1e-12)


def dependency_gradients(rows: Sequence[torch.Tensor], grids: Sequence[ChannelGrid], weights: torch.Tensor,
                         scale: float) -> tuple[list[torch.Tensor], float, float]:
    """The gradient of ``scale`` x sum_k w_k D(k, k+1) / log M_{k+1} with respect to each unit's rows, its value,
    and the unweighted mean D.

    Pair by pair and chunk by chunk: D depends on the rows only through the joint of soft levels, a sum over
    chunks of rows, so the joint is accumulated without a graph, D's gradient taken with respect to it (a small
    M x M matrix), and each chunk's soft assignment recomputed with a graph only while its share is propagated
    back. The graph of the whole term (rows x channels x levels, several times, per layer: tens of GB for a 13B
    model) is never held; the chunks keep to about 2^24 soft probabilities each."""
    grads = [torch.zeros_like(r) for r in rows]
    total, values = 0.0, []
    for k in range(len(rows) - 1):
        rk, rn, gk, gn = rows[k].detach(), rows[k + 1].detach(), grids[k], grids[k + 1]
        chunk = max(1, 2**24 // (rk.shape[1] * max(gk.levels, gn.levels)))
        with torch.no_grad():
            counts = sum(chunk_counts(rk[i : i + chunk], rn[i : i + chunk], gk, gn) for i in range(0, rk.shape[0], chunk))
        counts.requires_grad_(True)
        d = conditional_entropy_tensor(counts / counts.sum()) / math.log(gn.levels)
        values.append(float(d.detach()))
        total += float(weights[k]) * values[-1]
        if not scale:
            continue
        (g_counts,) = torch.autograd.grad(scale * float(weights[k]) * d, [counts])
        for i in range(0, rk.shape[0], chunk):
            a, b = rk[i : i + chunk].requires_grad_(True), rn[i : i + chunk].requires_grad_(True)
            g_a, g_b = torch.autograd.grad(chunk_counts(a, b, gk, gn), [a, b], g_counts)
            grads[k][i : i + chunk] += g_a
            grads[k + 1][i : i + chunk] += g_b
    return grads, scale * total, sum(values) / len(values) if values else 0.0




def veo_phase(pipe: Any, items: Sequence[Any], units: Sequence[Unit], schemes: dict[str, WeightScheme],
              bits: dict[int, int], config: QuantConfig, answers: Any = None,
              progress: Callable[[int, int], None] | None = None) -> Any:
    """Train the vision tower's quantizers through the stages of ``pipe`` (a :class:`qvlm.method.Pipeline`
    whose first stage owns the whole tower); the model is unchanged afterwards. ``items`` are the calibration
    batches as the first stage's capture takes them, ``bits`` the grid bits of each language unit and
    ``answers`` what the first stage needs to find the answer positions of each batch. Returns what the first
    stage's ``finish`` gives: a :class:`VeoResult` (a worker writes it and gives its record). ``progress(done,
    total)`` hears of each training step as it completes."""
    check_veo_applies(units)
    n = pipe.n_stages
    finished = False
    try:
        pipe.get([pipe.call(s, "veo", "begin", list(units), schemes, bits, config, answers if s == 0 else None)
                  for s in range(n)])
        _passes(pipe, items, "reference")
        n_pairs = pipe.get(pipe.call(0, "veo", "start_training", *[pipe.call(s, "veo", "grids") for s in range(n)]))
        steps = []
        for epoch in range(config.veo.epochs):
            if config.veo.lambda_entropy and n_pairs > 0:
                pipe.call(0, "veo", "set_weights", *_passes(pipe, items[:1], "jacobian")[-1])
            steps += [calls[0] for calls in _passes(pipe, items, "train")]  # the first stage's step
            pipe.call(0, "veo", "end_epoch", epoch)
        result = pipe.call(0, "veo", "finish")
        progress = progress or (lambda done, total: None)
        progress(0, len(steps))
        for done, _ in enumerate(pipe.completed(steps), start=1):
            progress(done, len(steps))
        result = pipe.get(result)
        finished = True
    finally:
        try:  # every stage's model as it was, also when a step failed (then that failure is the one raised)
            pipe.get([pipe.call(s, "veo", "end") for s in range(n)])
        except Exception:
            if finished:
                raise
    return result


def _passes(pipe: Any, items: Sequence[Any], mode: str) -> list:
    """Each batch down the stages and (except in the reference pass) its gradients back up; returns, per batch,
    the stages' last calls (in the Jacobian pass: each stage's gradient norms)."""
    n, steps = pipe.n_stages, []
    for index, item in enumerate(items):
        last, _, reach = pipe.call(0, "veo", "forward", index, item, mode, returns=3)
        rows = []
        for s in range(1, n):
            last, stage_rows, reach = pipe.call(s, "veo", "forward", index, last, mode, reach, returns=3)
            rows.append(stage_rows)
        parts = pipe.call(0, "veo", "head", index, mode, last, *rows, returns=max(n - 1, 1))
        if mode == "reference":
            continue
        parts = [] if n == 1 else [parts] if n == 2 else list(parts)
        grad, norms = None, []
        for s in range(n - 1, 0, -1):
            grad, stage_norms = pipe.call(s, "veo", "backward", mode, parts[s - 1], grad, returns=2)
            norms.insert(0, stage_norms)
        norms.insert(0, pipe.call(0, "veo", "backward_first", mode, grad))
        steps.append(norms)
    return steps
