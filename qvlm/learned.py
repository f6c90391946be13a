"""``search: learned``: rounding offsets and clipping scales trained on the block output (AutoRound-style).

Per linear: an offset V in [-0.5, 0.5] added before rounding (one per weight) and scales alpha/beta in
[0.5, 1] that shrink each group's starting upper/lower bound. They are trained with signed gradient descent
(the update is lr * sign(grad), lr decaying linearly to 0) through a straight-through rounding, one
calibration batch per step in a seeded order; the parameters with the lowest step loss are kept.

Numerics, whatever the model's dtype: the tunables and every quantizer operation are float32, the scale
used in training is the one the checkpoint stores (rounded to the weight's dtype) and the integers come
from :func:`qvlm.quant.grid_integers` both in training and in :meth:`LearnedWeightQuantizer.finalize`, so
the exported integers are the trained ones. The block loss is the float32 *sum* of squared errors: a mean
over 3e7 output elements makes every float16 gradient underflow to zero (sign descent ignores magnitude).

A quantizer starts from round-to-nearest on the full range, or from another search's integers and qparams
(``start``: the clipped RTN or GPTQ result): its bounds reproduce the start's scale and its offsets are
the start's integers minus ``w / scale``, projected on [-0.5, 0.5] (floor or ceiling of ``w / scale``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qvlm.capture import call_unit
from qvlm.quant import QuantizedWeight, WeightScheme, grid_integers, grid_qparams, grouped, percentile_bounds


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

    @classmethod
    def init(cls, weight: torch.Tensor, scheme: WeightScheme, start: QuantizedWeight | None = None) -> "LearnedWeightQuantizer":
        g = grouped(weight.float(), scheme.group_size)
        if start is None:
            lo0, hi0 = percentile_bounds(g, 1.0, scheme.symmetric)
            v = torch.zeros_like(g)
        else:
            lo0, hi0 = _start_bounds(start)
            q, z = grouped(start.qweight.float(), scheme.group_size), _zero(start)
            v = (q - z - g / start.scale.float().unsqueeze(-1)).clamp(-0.5, 0.5)
        ones = torch.ones(g.shape[:2], device=g.device)
        return cls(weight, scheme, v.requires_grad_(), ones.clone().requires_grad_(), ones.requires_grad_(),
                   lo0.float(), hi0.float())

    def params(self) -> list[torch.Tensor]:
        return [self.v, self.alpha, self.beta]

    def _grid(self, v: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor):
        s = self.scheme
        scale, zero = grid_qparams(self.lo0 * beta, self.hi0 * alpha, s.bits, s.symmetric, self.weight.dtype)
        scale, zero = scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1)
        q = grid_integers(grouped(self.weight, s.group_size), scale, zero, s.qmin, s.qmax, v)
        return q, scale, zero

    def soft_weight(self) -> torch.Tensor:
        """Differentiable dequantized weight: the stored scale, straight-through rounding; its value equals
        ``finalize().dequantize()`` exactly."""
        q, scale, zero = self._grid(self.v, self.alpha, self.beta)
        return ((q if zero is None else q - zero) * scale).reshape(self.weight.shape).to(self.weight.dtype)

    @torch.no_grad()
    def finalize(self) -> QuantizedWeight:
        """Integers and the checkpoint-dtype qparams, exactly as training last saw them."""
        q, scale, zero = self._grid(self.v, self.alpha, self.beta)
        return QuantizedWeight(q.to(torch.int8).reshape(self.weight.shape), scale.squeeze(-1).to(self.weight.dtype),
                               None if zero is None else zero.squeeze(-1).to(torch.int8), self.scheme)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.v.clamp_(-0.5, 0.5)
        self.alpha.clamp_(0.5, 1.0)
        self.beta.clamp_(0.5, 1.0)


def _zero(qw: QuantizedWeight) -> torch.Tensor | float:
    return 0.0 if qw.zero is None else qw.zero.float().unsqueeze(-1)


def _start_bounds(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds whose qparams are ``qw``'s (up to a float32 rounding of the scale before it is stored)."""
    s, scale = qw.scheme, qw.scale.float()
    if qw.zero is None:
        hi = scale * ((s.qmax - s.qmin) / 2)
        return -hi, hi
    z = qw.zero.float()
    return (s.qmin - z) * scale, (s.qmax - z) * scale


def learn_rounding(ws, cfg, starts: dict[str, QuantizedWeight] | None = None) -> dict[str, QuantizedWeight]:
    """Train every linear of the workspace's block jointly; returns the final integer weights by name."""
    starts = starts or {}
    rounding = {n: LearnedWeightQuantizer.init(ws.fp_weight[n], ws.data.schemes[n], starts.get(n)) for n in ws.fq}
    for n, r in rounding.items():
        ws.fq[n].weight_fn = r.soft_weight
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randint(0, len(ws.data.targets), (cfg.iters,), generator=gen).tolist()
    lr0 = cfg.lr if cfg.lr is not None else 1.0 / max(cfg.iters, 1)
    best_loss, best = float("inf"), None
    try:
        for step, b in enumerate(order):
            loss, count = _batch_loss(ws, b)
            if loss.item() / count < best_loss:
                best_loss = loss.item() / count
                best = {n: [p.detach().clone() for p in r.params()] for n, r in rounding.items()}
            loss.backward()
            _sign_step(rounding.values(), lr0 * (1 - step / max(cfg.iters, 1)))
    finally:
        for n in rounding:
            ws.fq[n].weight_fn = None
    if best is not None:
        with torch.no_grad():
            for n, r in rounding.items():
                for p, saved in zip(r.params(), best[n]):
                    p.copy_(saved)
    return {n: r.finalize() for n, r in rounding.items()}


@torch.no_grad()
def _sign_step(quantizers, lr: float) -> None:
    for r in quantizers:
        for p in r.params():
            # A float16 backward can overflow; an inf keeps its sign, a NaN (inf - inf) makes no step.
            p -= lr * torch.sign(torch.nan_to_num(p.grad, nan=0.0))
            p.grad = None
        r.clamp_()


def _batch_loss(ws, b: int) -> tuple[torch.Tensor, int]:
    """Float32 sum of squared errors over the batch's valid output elements, and their count."""
    hidden = None
    for u, module in enumerate(ws.units):
        hidden = call_unit(module, ws.data.calls[u][b], hidden)
    sq = (hidden.float() - ws.data.targets[b].float()) ** 2
    mask = ws.data.calls[-1][b].mask
    sq = sq[mask] if mask is not None else sq
    return sq.sum(), sq.numel()
