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
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qvlm.capture import _strided, unit_output
from qvlm.config import QuantConfig
from qvlm.dependency import ChannelGrid, channel_grid, conditional_entropy_tensor, joint_distribution
from qvlm.fakequant import put_modules, swap_in_fake_quant
from qvlm.learned import LearnedWeightQuantizer
from qvlm.quant import ActRange, WeightScheme, calibrate_act_range
from qvlm.search import BlockResult, LinearResult, apply_linear_results
from qvlm.structure import Unit, find_units

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class VeoResult:
    block: BlockResult  # the vision units with their tuned quantizers; errors = vision-output MSE
    history: tuple[dict, ...]  # per epoch: mean loss terms and the mean soft dependency
    seconds: float


@dataclass
class _Quantizers:
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
def _taps(model: nn.Module, units: Sequence[Unit], language: Sequence[Unit]):
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


def _token_mask(batch: Batch) -> torch.Tensor:
    mask = batch.get("attention_mask")
    return mask.bool() if mask is not None else torch.ones(batch["input_ids"].shape, dtype=torch.bool)


def _next_token_loss(model: nn.Module, logits: torch.Tensor, batch: Batch, answers: torch.Tensor | None) -> torch.Tensor:
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
        mask = _token_mask(batch)
        valid = mask[:, 1:] & mask[:, :-1]
        image_id = getattr(model.config, "image_token_id", None)
        if image_id is not None:
            valid &= ids[:, 1:] != image_id
    return F.cross_entropy(logits[:, :-1][valid].float(), ids[:, 1:][valid])


def _relative_error(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return ((q.float() - r.float()) ** 2).sum() / (r.float() ** 2).sum().clamp_min(1e-12)


def _rows(x: torch.Tensor, batch: Batch, max_rows: int) -> torch.Tensor:
    return _strided(x[_token_mask(batch)].float(), max_rows)


def _soft_dependency(rows: Sequence[torch.Tensor], grids: Sequence[ChannelGrid], weights: torch.Tensor) -> tuple[torch.Tensor, float]:
    """sum_k w_k D(k, k+1) / log M_{k+1} (differentiable) and the unweighted mean D."""
    terms = []
    for k in range(len(rows) - 1):
        joint = joint_distribution(rows[k], rows[k + 1], grids[k], grids[k + 1])
        terms.append(conditional_entropy_tensor(joint) / torch.log(torch.tensor(float(grids[k + 1].levels))))
    if not terms:
        return torch.zeros((), dtype=torch.float64), 0.0
    d = torch.stack(terms)
    return (weights.to(d.dtype) * d).sum(), float(d.detach().mean())


@torch.no_grad()
def _reference(model, units, language, batches, max_rows, bits, act, linears) -> tuple[list, list, list[ChannelGrid], dict]:
    """Full-precision vision outputs, logits, dependency grids and (static schemes) input ranges per linear."""
    vision, logits, rows = [], [], [[] for _ in language]
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    static = act.enabled and act.static
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: inputs[n].append(args[0].reshape(-1, args[0].shape[-1]))) for n in linears] if static else []
    try:
        with _taps(model, units, language) as seen:
            for batch in batches:
                logits.append(model(**batch).logits)
                vision.append(seen["vision"])
                for k, out in enumerate(seen["language"]):
                    rows[k].append(_rows(out, batch, max_rows))
    finally:
        for h in hooks:
            h.remove()
    grids = [channel_grid(torch.cat(r), bits[u.index]) for r, u in zip(rows, language)]
    ranges = {n: calibrate_act_range(_strided(torch.cat(x), 8192), act) for n, x in inputs.items() if x}
    return vision, logits, grids, ranges


def _jacobian_weights(model, seen_fn, batch, ref_logits, n_pairs: int) -> torch.Tensor:
    """w_k = |dE/dX^(k)| for the first unit of each pair, E the relative logits error; mean 1."""
    logits, seen = seen_fn(batch)
    outs = seen["language"][:n_pairs]
    # A layer the vision features do not reach (Mllama's self-attention layers before its first cross-attention
    # layer) has no gradient: its weight is 0.
    reached = [o for o in outs if o.requires_grad]
    grads = dict(zip(map(id, reached), torch.autograd.grad(_relative_error(logits, ref_logits), reached,
                                                           allow_unused=True))) if reached else {}
    norms = torch.tensor([float(g.norm()) if (g := grads.get(id(o))) is not None else 0.0 for o in outs],
                         dtype=torch.float64)
    return norms / norms.mean() if float(norms.sum()) > 0 else torch.ones(n_pairs, dtype=torch.float64)


@contextmanager
def _frozen(model: nn.Module):
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


@contextmanager
def _swapped(model: nn.Module, names: Sequence[str]):
    """Vision linears replaced by FakeQuantLinear for the duration; the originals are put back after."""
    originals = {n: model.get_submodule(n) for n in names}
    fq = swap_in_fake_quant(model, list(names))
    try:
        yield fq
    finally:
        put_modules(model, originals)


def optimize_vision_encoder(model: nn.Module, batches: Sequence[Batch], units: Sequence[Unit], schemes: dict[str, WeightScheme],
                            config: QuantConfig, bits: dict[int, int], answers: Sequence[torch.Tensor] | None = None) -> VeoResult:
    """Train the vision tower's quantizers (model left unchanged); ``bits`` = grid bits of each language unit,
    ``answers`` = per batch, the positions that predict answer tokens (``qvlm.batches.answer_masks``)."""
    check_veo_applies(units)
    cfg, act = config.veo, config.activations
    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    model.eval()
    vision_units = [u for u in units if u.segment == "vision"]
    language = [u for u in units if u.segment == "language"]
    names = vision_linear_names(units)
    ref_vision, ref_logits, grids, act_base = _reference(model, units, language, batches, cfg.max_rows, bits, act, names)
    with _frozen(model), _swapped(model, names) as fq:
        quant = _Quantizers({n: LearnedWeightQuantizer.init(fq[n].weight.detach(), schemes[n]) for n in names}, act_base,
                            {n: torch.ones((), requires_grad=True) for n in act_base})
        for n, q in quant.weights.items():
            q.v.requires_grad_(False)
            fq[n].weight_fn, fq[n].act_scheme = q.soft_weight, act

        def run(batch):
            for n in names:
                fq[n].act_range = quant.act_range(n)
            with _taps(model, units, language) as seen:
                return model(**batch).logits, {"vision": seen["vision"], "language": list(seen["language"])}

        error_before = _vision_mse(run, batches, ref_vision)
        history = _train(model, run, quant, batches, answers, ref_vision, ref_logits, grids, cfg)
        results = tuple(LinearResult(n, quant.weights[n].finalize(), quant.act_range(n, detach=True), None, None) for n in names)
        for n in names:
            fq[n].weight_fn = None
        apply_linear_results(fq, results, act)
        error_after = _vision_mse(run, batches, ref_vision)
    block = BlockResult(tuple(u.name for u in vision_units), results, error_before, error_after,
                        cfg.epochs * len(batches), time.perf_counter() - t0)
    return VeoResult(block, tuple(history), time.perf_counter() - t0)


@torch.no_grad()
def _vision_mse(run, batches, ref_vision) -> float:
    total, count = 0.0, 0
    for batch, ref in zip(batches, ref_vision):
        _, seen = run(batch)
        sq = (seen["vision"].double() - ref.double()) ** 2
        total, count = total + float(sq.sum()), count + sq.numel()
    return total / max(count, 1)


def _train(model, run, quant: _Quantizers, batches, answers, ref_vision, ref_logits, grids, cfg) -> list[dict]:
    optimizer = torch.optim.Adam(quant.params(), lr=cfg.lr)
    n_pairs = len(grids) - 1
    history = []
    for epoch in range(cfg.epochs):
        weights = (_jacobian_weights(model, run, batches[0], ref_logits[0], n_pairs)
                   if cfg.lambda_entropy and n_pairs > 0 else torch.ones(max(n_pairs, 0), dtype=torch.float64))
        sums = {"loss": 0.0, "next_token": 0.0, "dependency": 0.0, "error": 0.0}
        for batch, answer, rv, rl in zip(batches, answers or [None] * len(batches), ref_vision, ref_logits, strict=True):
            logits, seen = run(batch)
            ce = _next_token_loss(model, logits, batch, answer)
            rows = [_rows(out, batch, cfg.max_rows) for out in seen["language"]]
            dep, mean_d = _soft_dependency(rows, grids, weights)
            err = _relative_error(seen["vision"], rv) + cfg.eta * _relative_error(logits, rl)
            loss = ce + cfg.lambda_entropy * dep.float() + cfg.lambda_error * err
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            quant.clamp_()
            for key, value in (("loss", loss.item()), ("next_token", ce.item()), ("dependency", mean_d), ("error", err.item())):
                sums[key] += value
        history.append({"epoch": epoch, **{k: v / len(batches) for k, v in sums.items()},
                        "jacobian_weights": [round(float(w), 4) for w in weights]})
    return history
