"""``search: learned``: rounding offsets and clipping scales trained on the block output (AutoRound-style).

Per linear: an offset V in [-0.5, 0.5] added before rounding (one per weight) and scales alpha/beta in
[0.5, 1] that shrink each group's max/min. They are trained with signed gradient descent (the update is
lr * sign(grad), lr decaying linearly to 0) through a straight-through rounding, one calibration batch per
step in a seeded order; the parameters with the lowest step loss are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qvlm.capture import call_unit
from qvlm.quant import QuantizedWeight, WeightScheme, grouped, percentile_bounds, qparams_from_bounds, round_ste


@dataclass
class LearnedWeightQuantizer:
    """A weight's rounding offsets and clipping scales as trainable tensors (also used by VEO, offsets frozen)."""

    weight: torch.Tensor  # FP weight [out, in]
    scheme: WeightScheme
    v: torch.Tensor  # [out, groups, group]
    alpha: torch.Tensor  # [out, groups] shrink of the upper bound
    beta: torch.Tensor  # [out, groups] shrink of the lower bound

    @classmethod
    def init(cls, weight: torch.Tensor, scheme: WeightScheme) -> "LearnedWeightQuantizer":
        g = grouped(weight.float(), scheme.group_size)
        return cls(weight, scheme, torch.zeros_like(g, requires_grad=True),
                   torch.ones(g.shape[:2], requires_grad=True), torch.ones(g.shape[:2], requires_grad=True))

    def params(self) -> list[torch.Tensor]:
        return [self.v, self.alpha, self.beta]

    def _bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = percentile_bounds(grouped(self.weight.float(), self.scheme.group_size), 1.0, self.scheme.symmetric)
        return lo * self.beta, hi * self.alpha

    def soft_weight(self) -> torch.Tensor:
        """Differentiable dequantized weight (float scale, straight-through rounding)."""
        s = self.scheme
        lo, hi = self._bounds()
        lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
        if s.symmetric:
            scale = torch.maximum(-lo, hi) / ((s.qmax - s.qmin) / 2)
            zero = torch.zeros_like(scale)
        else:
            scale = (hi - lo) / (s.qmax - s.qmin)
            zero = torch.clamp(round_ste(s.qmin - lo / scale.clamp_min(1e-12)), s.qmin, s.qmax)
        scale = scale.clamp_min(1e-12).unsqueeze(-1)
        zero = zero.unsqueeze(-1)
        g = grouped(self.weight.float(), s.group_size)
        q = torch.clamp(round_ste(g / scale + self.v) + zero, s.qmin, s.qmax)
        return ((q - zero) * scale).reshape(self.weight.shape).to(self.weight.dtype)

    @torch.no_grad()
    def finalize(self) -> QuantizedWeight:
        """Integers and the checkpoint-dtype qparams, computed exactly as ``quantize_weight`` would."""
        s = self.scheme
        lo, hi = self._bounds()
        scale, zero = qparams_from_bounds(lo, hi, s.bits, s.symmetric, self.weight.dtype)
        x = grouped(self.weight.to(scale.dtype), s.group_size) / scale.unsqueeze(-1) + self.v.to(scale.dtype)
        if zero is not None:
            x = x + zero.to(scale.dtype).unsqueeze(-1)
        q = torch.clamp(torch.round(x), s.qmin, s.qmax).to(torch.int8).reshape(self.weight.shape)
        return QuantizedWeight(q, scale, zero, s)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.v.clamp_(-0.5, 0.5)
        self.alpha.clamp_(0.5, 1.0)
        self.beta.clamp_(0.5, 1.0)


def learn_rounding(ws, cfg) -> dict[str, QuantizedWeight]:
    """Train every linear of the workspace's block jointly; returns the final integer weights by name."""
    rounding = {n: LearnedWeightQuantizer.init(ws.fp_weight[n], ws.data.schemes[n]) for n in ws.fq}
    for n, r in rounding.items():
        ws.fq[n].weight_fn = r.soft_weight
    n_batches = len(ws.data.targets)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randint(0, n_batches, (cfg.iters,), generator=gen).tolist()
    lr0 = cfg.lr if cfg.lr is not None else 1.0 / max(cfg.iters, 1)
    best_loss, best = float("inf"), None
    try:
        for step, b in enumerate(order):
            loss = _batch_loss(ws, b)
            if loss.item() < best_loss:
                best_loss = loss.item()
                best = {n: [p.detach().clone() for p in r.params()] for n, r in rounding.items()}
            loss.backward()
            lr = lr0 * (1 - step / max(cfg.iters, 1))
            with torch.no_grad():
                for r in rounding.values():
                    for p in r.params():
                        p -= lr * torch.sign(p.grad)
                        p.grad = None
                    r.clamp_()
    finally:
        for n in rounding:
            ws.fq[n].weight_fn = None
    if best is not None:
        for n, r in rounding.items():
            with torch.no_grad():
                for p, saved in zip(r.params(), best[n]):
                    p.copy_(saved)
    return {n: r.finalize() for n, r in rounding.items()}


def _batch_loss(ws, b: int) -> torch.Tensor:
    hidden = None
    for u, module in enumerate(ws.units):
        call = ws.data.calls[u][b]
        hidden = call_unit(module, call, hidden)
    sq = (hidden.float() - ws.data.targets[b].float()) ** 2
    mask = ws.data.calls[-1][b].mask
    return (sq[mask] if mask is not None else sq).mean()
