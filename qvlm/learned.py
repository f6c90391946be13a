"""``search: learned``: rounding offsets and clipping scales trained on the block output (AutoRound-style).

Per linear: an offset V in [-0.5, 0.5] added before rounding (one per weight) and scales alpha/beta in
[0.5, 1] that shrink each group's starting upper/lower bound. They are trained with signed gradient descent
(the update is lr * sign(grad), lr decaying linearly to 0) through a straight-through rounding, one
calibration batch per step in a seeded order; the parameters kept are the ones, among the start and a few
checkpoints of the training, with the lowest block error on the whole calibration set.

Numerics, whatever the model's dtype: the tunables and every quantizer operation are float32, the scale
used in training is the one the checkpoint stores (rounded to the weight's dtype) and the integers come
from :func:`qvlm.quant.grid_integers` both in training and in :meth:`LearnedWeightQuantizer.finalize`, so
the exported integers are the trained ones. The block loss is the float32 *sum* of squared errors: a mean
over 3e7 output elements makes every float16 gradient underflow to zero (sign descent ignores magnitude).

A quantizer starts from round-to-nearest on the full range, or from another search's integers and qparams
(``start``: the clipped RTN or GPTQ result): its bounds reproduce the start's scale, and each weight gets a
fixed integer shift from its nearest integer to the start's (0 for RTN; GPTQ moves some weights several steps),
so the offsets V start at 0 and choose, as from RTN, between the start's integer and its neighbour on the side
of ``w / scale``. From a start the scales stay fixed (the start's integers were chosen for them) and the step is
smaller (``START_LR / iters``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from qvlm.capture import call_unit, valid_rows
from qvlm.quant import QuantizedWeight, WeightScheme, grid_integers, grid_qparams, grouped, percentile_bounds


# From another search's result the offsets only need to flip a few roundings near their boundaries: a fifth of
# AutoRound's step (1 / iters) keeps them from undoing the start's error compensation (BENCHMARKS.md, issue 18).
START_LR = 0.2
# Where a start's integer is the odd neighbour of an exact halfway point, its offset V starts this far off 0.
HALFWAY_NUDGE = 1.0 / 64


@dataclass
class LearnedWeightQuantizer:
    """A weight's rounding offsets and clipping scales as trainable tensors (also used by VEO, offsets frozen)."""

    weight: torch.Tensor  # FP weight [out, in]
    scheme: WeightScheme
    v: torch.Tensor  # [out, groups, group]
    alpha: torch.Tensor  # [out, groups] shrink of the upper bound
    beta: torch.Tensor  # [out, groups] shrink of the lower bound
    lo0: torch.Tensor  # [out, groups] starting bounds (float32)
    hi0: torch.Tensor
    shift: torch.Tensor | None = None  # [out, groups, group] int16 steps from nearest to the start's integers
    started: bool = False  # from another search's result: its scales stay, only the offsets train

    @classmethod
    def init(cls, weight: torch.Tensor, scheme: WeightScheme, start: QuantizedWeight | None = None) -> "LearnedWeightQuantizer":
        g = grouped(weight.float(), scheme.group_size)
        ones = torch.ones(g.shape[:2], device=g.device)
        v = torch.zeros_like(g).requires_grad_()
        if start is None:
            lo0, hi0 = percentile_bounds(g, 1.0, scheme.symmetric)
            return cls(weight, scheme, v, ones.clone().requires_grad_(), ones.requires_grad_(), lo0, hi0)
        lo0, hi0 = _start_bounds(start)
        quantizer = cls(weight, scheme, v, ones.clone().requires_grad_(), ones.requires_grad_(), lo0, hi0, None, True)
        quantizer._align(grouped(start.integers(torch.float32), scheme.group_size))
        return quantizer

    @torch.no_grad()
    def _align(self, target: torch.Tensor, rounds: int = 3) -> None:
        """Integer shifts that make the untrained quantizer give ``target`` (a clamped value may need two).

        A weight exactly halfway between two integers (``w / scale`` = k + 0.5, common at a group's extreme) rounds
        half to even whatever the integer shift, so a start that chose the odd neighbour is reached by starting its
        offset V a little off 0 (``HALFWAY_NUDGE``, towards the start's integer). A start still not reproduced is
        evaluated as the quantizer gives it, not as the candidate it came from (``learn_rounding`` checks which)."""
        shift = torch.zeros(target.shape, dtype=torch.int16, device=target.device)  # 8-bit steps overflow int8
        for _ in range(rounds):
            self.shift = shift if bool(shift.any()) else None
            q = self._grid(self.v, self.alpha, self.beta)[0]
            if torch.equal(q, target):
                return
            shift = shift + (target - q).to(torch.int16)
        off = q != target
        self.v[off] = HALFWAY_NUDGE * torch.sign(target - q)[off]

    def params(self) -> list[torch.Tensor]:
        return [self.v, self.alpha, self.beta]

    def trainable(self) -> list[torch.Tensor]:
        return [self.v] if self.started else self.params()

    def _grid(self, v: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor):
        s = self.scheme
        scale, zero = grid_qparams(self.lo0 * beta, self.hi0 * alpha, s.bits, s.symmetric, self.weight.dtype)
        scale, zero = scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1)
        offset = v if self.shift is None else v + self.shift
        q = grid_integers(grouped(self.weight, s.group_size), scale, zero, s.qmin, s.qmax, offset)
        return q, scale, zero

    def soft_weight(self) -> torch.Tensor:
        """Differentiable dequantized weight: the stored scale, straight-through rounding; its value equals
        ``finalize().dequantize()`` exactly. When it trains, its float32 intermediates (the scaled weight, the
        integers) are not kept for the backward but computed again there, one linear at a time: they would
        otherwise be held for every linear of the block at once."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.params()):
            return checkpoint(self._soft_weight, self.v, self.alpha, self.beta, use_reentrant=False)
        return self._soft_weight(self.v, self.alpha, self.beta)

    def _soft_weight(self, v: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        q, scale, zero = self._grid(v, alpha, beta)
        return ((q if zero is None else q - zero) * scale).reshape(self.weight.shape).to(self.weight.dtype)

    @torch.no_grad()
    def finalize(self) -> QuantizedWeight:
        """Integers and the checkpoint-dtype qparams, exactly as training last saw them."""
        q, scale, zero = self._grid(self.v, self.alpha, self.beta)
        return QuantizedWeight.of(q.to(torch.int8).reshape(self.weight.shape), scale.squeeze(-1).to(self.weight.dtype),
                                  None if zero is None else zero.squeeze(-1).to(torch.int8), self.scheme)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.v.clamp_(-0.5, 0.5)
        self.alpha.clamp_(0.5, 1.0)
        self.beta.clamp_(0.5, 1.0)


def _start_bounds(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds whose qparams are ``qw``'s (up to a float32 rounding of the scale before it is stored)."""
    s, scale = qw.scheme, qw.scale.float()
    if qw.zero is None:
        hi = scale * ((s.qmax - s.qmin) / 2)
        return -hi, hi
    z = qw.zero.float()
    return (s.qmin - z) * scale, (s.qmax - z) * scale


@dataclass(frozen=True)
class Measured:
    """Integer weights, their block error on the whole calibration set, and whether the workspace's cached
    outputs (``ws.outputs``) are still the block run with them (then whoever hands the output on, or measures
    them again, need not run the block)."""

    weights: dict[str, QuantizedWeight]
    error: float
    fresh: bool


def learn_rounding(ws, cfg, starts: dict[str, QuantizedWeight] | None = None, known: Measured | None = None,
                   checkpoints: int = 8) -> Measured:
    """Train every linear of the workspace's block jointly; returns the weights kept.

    The parameters kept are those with the lowest error on the whole calibration set among the start and
    ``checkpoints`` evenly spaced points of the training (one forward pass over the calibration data each), so
    the result is never worse than the start. The start's error is ``known.error`` when the untrained quantizers
    reproduce ``known.weights`` exactly (the same weights in place give the same forward pass, bit for bit)."""
    starts = starts or {}
    rounding = {n: LearnedWeightQuantizer.init(ws.fp_weight[n], ws.data.schemes[n], starts.get(n)) for n in ws.fq}
    for n, r in rounding.items():
        ws.fq[n].weight_fn = r.soft_weight
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randint(0, len(ws.data.targets), (cfg.iters,), generator=gen).tolist()
    lr0 = cfg.lr if cfg.lr is not None else (START_LR if starts else 1.0) / max(cfg.iters, 1)
    every = max(cfg.iters // max(checkpoints, 1), 1)
    best = _Best()
    try:
        if not best.take_known(known, rounding):
            best.offer(ws, rounding)
        for step, b in enumerate(order):
            loss, _ = _batch_loss(ws, b)
            loss.backward()
            _sign_step(rounding.values(), lr0 * (1 - step / max(cfg.iters, 1)))
            if (step + 1) % every == 0 or step + 1 == len(order):
                best.offer(ws, rounding)
    finally:
        for n in rounding:
            ws.fq[n].weight_fn = None
    if not best.weights:  # no error measured was finite (NaN in the block): the caller quarantines it
        return Measured({n: r.finalize() for n, r in rounding.items()}, float("nan"), False)
    return Measured(best.weights, best.error, best.fresh)


class _Best:
    """The integer weights with the lowest whole-calibration-set block error seen so far: kept as the checkpoint
    will hold them (int8 and qparams, one byte a weight), not as the float32 offsets that gave them."""

    def __init__(self):
        self.error, self.weights, self.fresh = float("inf"), {}, False

    def offer(self, ws, rounding: dict) -> None:
        # The pass over every batch runs with each linear's integers, made once for it (not a soft weight a
        # batch): their dequantized value is exactly the soft weight's.
        weights = {n: r.finalize() for n, r in rounding.items()}
        for n, qw in weights.items():
            ws.fq[n].quantized, ws.fq[n].weight_fn = qw, None
        try:
            error = ws.refresh()
        finally:
            for n, r in rounding.items():
                ws.fq[n].weight_fn = r.soft_weight
        self.fresh = error < self.error  # ws.outputs now hold this offer's outputs, kept or not
        if self.fresh:
            self.error, self.weights = error, weights

    def take_known(self, known: Measured | None, rounding: dict) -> bool:
        """Take ``known`` as the start's offer if the untrained quantizers give exactly its weights."""
        if known is None or set(known.weights) != set(rounding):
            return False
        start = {n: r.finalize() for n, r in rounding.items()}
        if not all(_same(start[n], known.weights[n]) for n in rounding):
            return False
        if known.error < self.error:  # as offer(): a NaN error is never kept
            self.error, self.weights, self.fresh = known.error, known.weights, known.fresh
        return True


def _same(a: QuantizedWeight, b: QuantizedWeight) -> bool:
    return (torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
            and (a.zero is None) == (b.zero is None) and (a.zero is None or torch.equal(a.zero, b.zero)))


@torch.no_grad()
def _sign_step(quantizers, lr: float) -> None:
    for r in quantizers:
        for p in r.trainable():
            # A float16 backward can overflow; an inf keeps its sign, a NaN (inf - inf) makes no step.
            p -= lr * torch.sign(torch.nan_to_num(p.grad, nan=0.0))
        for p in r.params():
            p.grad = None
        r.clamp_()


def _batch_loss(ws, b: int) -> tuple[torch.Tensor, int]:
    """Float32 sum of squared errors over the batch's valid output elements, and their count."""
    hidden = None
    for u, module in enumerate(ws.units):
        hidden = call_unit(module, ws.data.calls[u][b], hidden)
    target = ws.data.targets[b].to(hidden.device, non_blocking=True)  # kept in host memory when the GPU is full
    sq = valid_rows((hidden.float() - target.float()) ** 2, ws.data.calls[-1][b].mask)
    return sq.sum(), sq.numel()
