"""Per-block quantizer search against the block's full-precision output (Q-VLM Eq. 3).

A block is a run of consecutive units of one stream. ``search_block`` works on copies of the block's unit
modules whose target linears are swapped for ``FakeQuantLinear``; the caller's modules are never changed.
Methods (``SEARCHERS``): ``rtn`` (no search), ``clip`` (each weight group's clipping from an MSE shrink grid
of its range, weighted by the input's mean square; for static activation schemes a clipping percentile of
each input range chosen by coordinate passes over the block), ``learned`` (rounding offsets and clipping
scales trained with signed gradient descent, AutoRound-style), ``gptq`` (the baseline, unit by unit, with
act-order on static groups when asked) and ``best`` (candidates inside the block: clipped RTN, GPTQ with the
searched clipping, and learned rounding started from the better of the two; the one with the lowest
block-output error is kept, and every candidate's error is reported). All are deterministic for a seed.

A block whose search fails numerically (a Hessian that stays non-positive-definite after the damping
retries, NaN/inf in its errors or parameters) is quarantined: it gets the safe fallback, RTN with the
unweighted clipping search (which needs no calibration data), and ``BlockResult.quarantine`` says why.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch
from torch import nn

from qvlm.capture import UnitCall, call_unit, capture_linear_inputs, row_mask, shared_input_groups, valid_rows
from qvlm.fakequant import FakeQuantLinear, put_modules
from qvlm.quant import (SHRINK_GRID, ActRange, ActScheme, QuantizedWeight, WeightScheme, calibrate_act_range,
                        quantize_clipped, quantize_weight)

SearchMethod = Literal["rtn", "clip", "learned", "gptq", "best"]
ERROR_ELEMENTS = 1 << 22  # elements of a batch's output compared at a time (32 MiB in float64)


@dataclass(frozen=True)
class SearchConfig:
    method: SearchMethod = "best"
    percentiles: tuple[float, ...] = (1.0, 0.995, 0.99, 0.985, 0.98)  # static activation ranges
    epochs: int = 4  # clip, and static activation ranges: coordinate passes
    iters: int = 100  # learned: optimisation steps
    lr: float | None = None  # learned: None = 1 / iters
    seed: int = 0
    max_act_rows: int = 8192  # rows kept per linear to calibrate static activation ranges
    shrinks: tuple[float, ...] = SHRINK_GRID  # weight clipping: shrink factors of each group's range
    act_order: bool = True  # gptq: columns by decreasing diag(H), static groups
    damp: float = 0.01  # gptq: damping, x mean(diag(H))


@dataclass
class BlockData:
    """What one block search needs: its unit modules and, per calibration batch, inputs and FP targets."""

    units: list[nn.Module]
    unit_names: list[str]
    linears: list[tuple[str, ...]]  # per unit, names relative to the unit
    calls: list[list[UnitCall]]  # [unit][batch]: captured arguments (the first unit's hidden is the block input)
    targets: list[torch.Tensor]  # [batch]: FP output of the last unit on FP inputs
    schemes: dict[str, WeightScheme]  # full linear name -> weight scheme
    act: ActScheme = field(default_factory=ActScheme)


@dataclass(frozen=True)
class LinearResult:
    name: str
    weight: QuantizedWeight
    act_range: ActRange | None
    weight_percentile: float | None
    act_percentile: float | None


@dataclass(frozen=True)
class BlockResult:
    unit_names: tuple[str, ...]
    linears: tuple[LinearResult, ...]
    error_before: float  # block-output MSE with round-to-nearest (all percentiles 1.0)
    error_after: float
    evaluations: int
    seconds: float
    candidates: dict[str, float] = field(default_factory=dict)  # `best`: block-output MSE of each candidate
    chosen: str | None = None  # `best`: the candidate kept
    quarantine: str | None = None  # why the search's result was replaced by the safe fallback


@dataclass(frozen=True)
class _Found:
    """What one searcher returns. ``outputs()`` gives the block's output per batch with the kept result in place:
    the searcher's last forward pass where that ran with the kept result (one more pass where it did not)."""

    linears: tuple[LinearResult, ...]
    before: float
    after: float
    evaluations: int
    outputs: Callable[[], list[torch.Tensor]]
    candidates: dict[str, float] = field(default_factory=dict)
    chosen: str | None = None


class _Workspace:
    """Copies of the block's units with fake-quant linears, and the cached outputs of each unit.

    The full-precision weights are the caller's own tensors, read and never written. The fake-quant linears run
    with the integer weights put in them (``FakeQuantLinear.quantized``, dequantized one linear at a time as the
    forward reaches it), so the workspace holds no dense copy of the block's weights."""

    def __init__(self, data: BlockData):
        self.data = data
        self.units: list[nn.Module] = []
        self.fq: dict[str, FakeQuantLinear] = {}
        self.unit_of: dict[str, int] = {}
        self.fp_weight: dict[str, torch.Tensor] = {}
        for u, (module, name, rel) in enumerate(zip(data.units, data.unit_names, data.linears)):
            unit, fqs = _fake_quant_copy(module, rel)
            self.units.append(unit)
            for r, fq in fqs.items():
                self.fq[f"{name}.{r}"] = fq
                self.unit_of[f"{name}.{r}"] = u
                self.fp_weight[f"{name}.{r}"] = module.get_submodule(r).weight.detach()
        self.outputs: list[list[torch.Tensor]] = []
        self.evaluations = 0

    def run_from(self, u: int) -> list[list[torch.Tensor]]:
        """Outputs of units u..end for every batch, reusing the cached outputs of unit u-1."""
        outs = []
        for j in range(u, len(self.units)):
            prev = outs[-1] if outs else (self.outputs[j - 1] if j > 0 else None)
            outs.append([
                call_unit(self.units[j], call, None if prev is None else prev[b])
                for b, call in enumerate(self.data.calls[j])
            ])
        self.evaluations += 1
        return outs

    def error(self, last: Sequence[torch.Tensor]) -> float:
        return block_error(last, self.data.targets, self.data.calls[-1])

    def refresh(self) -> float:
        with torch.no_grad():
            return self.keep(self.run_from(0))

    def keep(self, outputs: list[list[torch.Tensor]]) -> float:
        """Take ``outputs`` (every unit, every batch) as the block's current run; returns its error."""
        self.outputs = outputs
        return self.error(outputs[-1])


def _fake_quant_copy(module: nn.Module, linears: Sequence[str]) -> tuple[nn.Module, dict[str, FakeQuantLinear]]:
    """A copy of ``module`` with the named linears swapped for fake-quant ones that read the caller's weights
    (the deep copy skips them): whatever the search puts in place goes to ``quantized``, never to ``weight``."""
    originals = [module.get_submodule(r).weight for r in linears]
    unit = copy.deepcopy(module, {id(w): w for w in originals})
    fqs = {r: FakeQuantLinear.from_linear(unit.get_submodule(r), share=True) for r in linears}
    put_modules(unit, fqs)
    return unit.requires_grad_(False), fqs


def block_error(outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], calls: Sequence[UnitCall]) -> float:
    """Mean squared error over the valid tokens of every batch, accumulated in float64 a slice of rows at a time
    (``ERROR_ELEMENTS``): a whole batch's float64 difference would be four times its output."""
    total, count = 0.0, 0
    for out, tgt, call in zip(outputs, targets, calls):  # targets may be kept in host memory, outputs on the GPU
        flags, width = row_mask(out, call.mask), out.shape[-1]
        out, tgt = out.reshape(-1, width), tgt.reshape(-1, width)
        step = max(1, ERROR_ELEMENTS // width)
        batch = torch.zeros((), dtype=torch.float64, device=out.device)
        for start in range(0, out.shape[0], step):
            rows = slice(start, start + step)
            diff = out[rows].double() - tgt[rows].to(out.device, non_blocking=True).double()
            diff = valid_rows(diff, None if flags is None else flags[rows])
            batch += diff.square_().sum()
            count += diff.numel()
        total += float(batch)  # one device sync a batch
    return total / max(count, 1)


def _act_rows(ws: _Workspace, cfg: SearchConfig) -> dict[str, torch.Tensor]:
    """FP inputs of every linear on the FP block (first unit fed the block input), for static act ranges."""
    rows: dict[str, torch.Tensor] = {}
    hidden = None
    with torch.no_grad():
        for u, (module, name, rel) in enumerate(zip(ws.units, ws.data.unit_names, ws.data.linears)):
            calls = ws.data.calls[u] if hidden is None else [c.with_hidden(h) for c, h in zip(ws.data.calls[u], hidden)]
            hidden = [] if u + 1 < len(ws.units) else None  # the pass that captures a unit feeds the next one
            for r, x in capture_linear_inputs(module, rel, calls, cfg.max_act_rows, hidden).items():
                rows[f"{name}.{r}"] = x
    return rows


class _Candidates:
    """Cached quantized weights and activation ranges per (linear, percentile)."""

    def __init__(self, ws: _Workspace, cfg: SearchConfig):
        self.ws, self.data = ws, ws.data
        act = ws.data.act
        self.act_rows = _act_rows(ws, cfg) if act.enabled and act.static else {}
        self._w: dict[tuple[str, float], QuantizedWeight] = {}
        self._a: dict[tuple[str, float], ActRange] = {}

    def weight(self, name: str, p: float) -> QuantizedWeight:
        if (name, p) not in self._w:
            self._w[name, p] = quantize_weight(self.ws.fp_weight[name], self.data.schemes[name], p)
        return self._w[name, p]

    def act_range(self, name: str, p: float) -> ActRange | None:
        if name not in self.act_rows:
            return None
        if (name, p) not in self._a:
            self._a[name, p] = calibrate_act_range(self.act_rows[name], self.data.act, p)
        return self._a[name, p]

    def apply(self, name: str, wp: float | None, ap: float | None) -> None:
        fq = self.ws.fq[name]
        if wp is not None:
            fq.quantized = self.weight(name, wp)
        fq.act_scheme = self.data.act
        fq.act_range = self.act_range(name, ap) if ap is not None else None


def _coordinate_search(ws: _Workspace, cand: _Candidates, cfg: SearchConfig, wp: dict, ap: dict, coords: list) -> float:
    """Coordinate passes: each (linear, kind) coordinate tries every percentile with the others fixed."""
    best = ws.refresh()
    for _ in range(cfg.epochs):
        changed = False
        for name, kind in coords:
            state = wp if kind == "weight" else ap
            for p in cfg.percentiles:
                if p == state[name]:
                    continue
                old = state[name]
                state[name] = p
                cand.apply(name, wp[name], ap[name])
                with torch.no_grad():
                    outs = ws.run_from(ws.unit_of[name])
                err = ws.error(outs[-1])
                if err < best:
                    best, changed = err, True
                    ws.outputs[ws.unit_of[name]:] = outs
                else:
                    state[name] = old
                    cand.apply(name, wp[name], ap[name])
        if not changed:
            break
    return best


def _start(data: BlockData, cfg: SearchConfig) -> tuple[_Workspace, _Candidates, dict, dict, float]:
    ws = _Workspace(data)
    cand = _Candidates(ws, cfg)
    wp = {n: 1.0 for n in ws.fq}
    ap = {n: (1.0 if n in cand.act_rows else None) for n in ws.fq}
    for n in ws.fq:
        cand.apply(n, wp[n], ap[n])
    return ws, cand, wp, ap, ws.refresh()


def _results(ws: _Workspace, cand: _Candidates, wp: dict, ap: dict, weights: dict | None = None) -> tuple[LinearResult, ...]:
    return tuple(
        LinearResult(n, (weights or {}).get(n) or cand.weight(n, wp[n]), cand.act_range(n, ap[n]) if ap[n] else None,
                     None if weights and n in weights else wp[n], ap[n])
        for n in ws.fq
    )


def search_rtn(data: BlockData, cfg: SearchConfig) -> _Found:
    ws, cand, wp, ap, before = _start(data, cfg)
    return _Found(_results(ws, cand, wp, ap), before, before, ws.evaluations, _last_outputs(ws))


def search_clip(data: BlockData, cfg: SearchConfig) -> _Found:
    """Weights: each group's clipping from the shrink grid, weighted by the input's mean square (no block
    evaluation needed); then static activation ranges by coordinate passes over the block."""
    ws, cand, wp, ap, before = _start(data, cfg)
    weights = clipped_weights(ws, cfg)
    _set_weights(ws, weights)
    wp = {n: None for n in ws.fq}  # the coordinate passes leave these weights alone
    after = _coordinate_search(ws, cand, cfg, wp, ap, [(n, "act") for n in ws.fq if ap[n] is not None])
    return _Found(_results(ws, cand, wp, ap, weights), before, after, ws.evaluations, _last_outputs(ws))


def search_learned(data: BlockData, cfg: SearchConfig) -> _Found:
    from qvlm.learned import Measured, learn_rounding

    ws, cand, wp, ap, before = _start(data, cfg)
    act_coords = [(n, "act") for n in ws.fq if ap[n] is not None]
    start = _coordinate_search(ws, cand, cfg, wp, ap, act_coords) if act_coords else before
    learned = learn_rounding(ws, cfg, known=Measured({n: cand.weight(n, wp[n]) for n in ws.fq}, start, True))
    if not learned.error < before:  # never hand back something worse than where the search started
        for n in ws.fq:
            cand.apply(n, 1.0, ap[n])
        return _Found(_results(ws, cand, wp, ap), before, min(before, ws.refresh()), ws.evaluations,
                      _last_outputs(ws))
    return _Found(_results(ws, cand, wp, ap, learned.weights), before, learned.error, ws.evaluations,
                  _kept_outputs(ws, learned.weights, learned.fresh))


def search_gptq(data: BlockData, cfg: SearchConfig) -> _Found:
    """GPTQ as the reference tools run it (min/max ranges), with act-order on static groups if ``cfg`` asks."""
    ws, cand, wp, ap, before = _start(data, cfg)
    weights, after = gptq_weights(ws, cfg, shrinks=(1.0,))
    return _Found(_results(ws, cand, wp, ap, weights), before, after, ws.evaluations, _last_outputs(ws))


def search_best(data: BlockData, cfg: SearchConfig) -> _Found:
    """Candidates inside the block, each scored on the block output: clipped RTN (``rtn``), GPTQ with the
    searched clipping (``gptq``), learned rounding started from the better of those two (``learned``). Static
    activation ranges are searched first, with RTN weights, and shared by every candidate."""
    from qvlm.learned import Measured, learn_rounding

    ws, cand, wp, ap, before = _start(data, cfg)
    act_coords = [(n, "act") for n in ws.fq if ap[n] is not None]
    if act_coords:
        _coordinate_search(ws, cand, cfg, wp, ap, act_coords)
    found = {"rtn": clipped_weights(ws, cfg)}
    errors = {"rtn": _weights_error(ws, found["rtn"])}
    found["gptq"], errors["gptq"] = gptq_weights(ws, cfg, cfg.shrinks)  # its last forward leaves ws.outputs
    start = min(("rtn", "gptq"), key=lambda k: (errors[k], k != "rtn"))
    known = Measured(found[start], errors[start], start == "gptq")
    learned = learn_rounding(ws, cfg, starts=found[start], known=known)
    found["learned"], errors["learned"] = learned.weights, learned.error
    chosen = min(found, key=lambda k: errors[k])  # each candidate's error was measured with its weights in place
    outputs = _kept_outputs(ws, found[chosen], learned.fresh and found[chosen] is learned.weights)
    return _Found(_results(ws, cand, wp, ap, found[chosen]), before, errors[chosen], ws.evaluations, outputs, errors,
                  chosen)


def clipped_weights(ws: _Workspace, cfg: SearchConfig) -> dict[str, QuantizedWeight]:
    """RTN of every linear with each group's clipping from the shrink grid, weighted by the mean square of the
    linear's input on the full-precision block."""
    power = block_input_power(ws.data)
    return {n: quantize_clipped(ws.fp_weight[n], ws.data.schemes[n], power[n], cfg.shrinks) for n in ws.fq}


def gptq_weights(ws: _Workspace, cfg: SearchConfig,
                 shrinks: tuple[float, ...]) -> tuple[dict[str, QuantizedWeight], float]:
    """GPTQ unit by unit: each unit's Hessians come from its inputs with the units before it in the block already
    quantized, accumulated batch by batch (float32) by forward hooks, one per distinct input; the linears that
    share an input and a scheme (q/k/v, gate/up) are quantized in one column loop. The quantized units' outputs
    that feed the next unit are the block run with the GPTQ weights in place: they become the workspace's outputs,
    and their error is returned with the weights (no forward pass is run twice)."""
    from qvlm.gptq import gptq_quantize_shared

    data, weights, outputs = ws.data, {}, []
    ws.outputs = []  # replaced below; the earlier weights' outputs are not needed again
    for u, (module, name, rel) in enumerate(zip(data.units, data.unit_names, data.linears)):
        calls = data.calls[u] if not outputs else [c.with_hidden(h) for c, h in zip(data.calls[u], outputs[-1])]
        for group, h in unit_hessians(module, rel, calls):
            by_scheme: dict[WeightScheme, list[str]] = {}
            for r in group:
                by_scheme.setdefault(data.schemes[f"{name}.{r}"], []).append(f"{name}.{r}")
            for scheme, names in by_scheme.items():
                found = dict(zip(names, gptq_quantize_shared([ws.fp_weight[n] for n in names], h, scheme, cfg.damp,
                                                             act_order=cfg.act_order, shrinks=shrinks)))
                weights.update(found)
                _set_weights(ws, found)
        with torch.no_grad():
            outputs.append([call_unit(ws.units[u], c) for c in calls])
    ws.evaluations += 1  # the pass run_from would have made
    return weights, ws.keep(outputs)


def _set_weights(ws: _Workspace, weights: dict[str, QuantizedWeight]) -> None:
    for n, qw in weights.items():
        ws.fq[n].quantized = qw


def _weights_error(ws: _Workspace, weights: dict[str, QuantizedWeight]) -> float:
    """Block-output error with ``weights`` in place (they stay in place)."""
    _set_weights(ws, weights)
    return ws.refresh()


def _last_outputs(ws: _Workspace) -> Callable[[], list[torch.Tensor]]:
    """The block output of the workspace's last full forward pass (the searcher left the kept result in place)."""
    return lambda: ws.outputs[-1]


def _kept_outputs(ws: _Workspace, weights: dict[str, QuantizedWeight], fresh: bool) -> Callable[[], list[torch.Tensor]]:
    """The block output with ``weights`` in place: the last forward pass's when ``fresh`` (it ran with them),
    else one more forward pass with them put back, run only when asked for."""
    if fresh:
        return _last_outputs(ws)

    def run() -> list[torch.Tensor]:
        _weights_error(ws, weights)
        return ws.outputs[-1]

    return run


class _InputPower:
    """Running mean square of each input channel of one linear (the diagonal of its Hessian, halved)."""

    def __init__(self, in_features: int):
        self.sum = torch.zeros(in_features)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        self.sum = self.sum.to(flat.device) + flat.square().sum(0)
        self.rows += flat.shape[0]

    @property
    def value(self) -> torch.Tensor:
        return self.sum / max(self.rows, 1)


@torch.no_grad()
def block_input_power(data: BlockData) -> dict[str, torch.Tensor]:
    """Mean square of every input channel of every linear of the full-precision block (first unit fed the block
    input), over the valid tokens."""
    out: dict[str, torch.Tensor] = {}
    hidden = None
    for u, (module, name, rel) in enumerate(zip(data.units, data.unit_names, data.linears)):
        calls = data.calls[u] if hidden is None else [c.with_hidden(h) for c, h in zip(data.calls[u], hidden)]
        hidden = [] if u + 1 < len(data.units) else None  # the pass that measures a unit feeds the next one
        for r, acc in _hooked_inputs(module, rel, calls, _InputPower, hidden).items():
            out[f"{name}.{r}"] = acc.value
    return out


@torch.no_grad()
def unit_hessians(module: nn.Module, linears: Sequence[str],
                  calls: Sequence[UnitCall]) -> list[tuple[tuple[str, ...], torch.Tensor]]:
    """``2/n X^T X`` of each group of the named linears that share one input tensor, over the calls (valid token
    rows), accumulated batch by batch in float32 by a forward hook on the group's first linear."""
    from qvlm.gptq import HessianAccumulator

    groups: dict[HessianAccumulator, list[str]] = {}  # an accumulator per input tensor, hashed by identity
    for n, acc in _hooked_inputs(module, linears, calls, HessianAccumulator).items():
        groups.setdefault(acc, []).append(n)
    return [(tuple(names), acc.hessian) for acc, names in groups.items()]


def _hooked_inputs(module: nn.Module, linears: Sequence[str], calls: Sequence[UnitCall], make: Callable,
                   outputs: list | None = None) -> dict:
    """``make(in_features)`` accumulators fed each named linear's valid input rows over the calls, by a forward
    hook on the first linear of each group that shares one input tensor; returns one (shared) per name. The
    unit's output of each call is appended to ``outputs`` when a list is given."""
    groups = shared_input_groups(module, list(linears), calls[0])
    accumulators = {g[0]: make(module.get_submodule(g[0]).in_features) for g in groups}
    mask: list = [None]
    handles = [module.get_submodule(first).register_forward_pre_hook(
        lambda _m, args, acc=acc: acc.add(valid_rows(args[0], mask[0])))
        for first, acc in accumulators.items()]
    try:
        for call in calls:
            mask[0] = call.mask
            output = call_unit(module, call)
            if outputs is not None:
                outputs.append(output)
    finally:
        for handle in handles:
            handle.remove()
    return {n: accumulators[g[0]] for g in groups for n in g}


SEARCHERS: dict[str, Callable[[BlockData, SearchConfig], _Found]] = {
    "rtn": search_rtn, "clip": search_clip, "learned": search_learned, "gptq": search_gptq, "best": search_best}

# Forwards of the block over every batch that ``BlockResult.evaluations`` does not count, weight-only schemes
# (a static activation scheme adds one to each: the pass that collects the linears' input rows): clip's and
# best's input-power pass (``block_input_power``), gptq's and best's Hessian pass (``gptq_weights``). Learned
# rounding's steps (one batch each) are not forwards over every batch. tests/test_search.py counts them.
UNCOUNTED_FORWARDS: dict[str, int] = {"rtn": 0, "clip": 1, "gptq": 1, "learned": 0, "best": 2}


def search_block(data: BlockData, cfg: SearchConfig) -> BlockResult:
    """Choose the block's quantizer parameters; returns integer weights, act ranges and errors before/after.
    A numerical failure quarantines the block (see the module docstring)."""
    return _search(data, cfg)[0]


def search_block_with_outputs(data: BlockData, cfg: SearchConfig) -> tuple[BlockResult, list[torch.Tensor]]:
    """:func:`search_block` and the block's quantized output per batch (the next block's input under Eq. 3
    propagation), equal to :func:`quantized_block_outputs` of the result, mostly without running the block again:
    it is the search's own last forward pass, except where ``learned`` or ``best`` keeps weights it did not
    measure last."""
    result, found = _search(data, cfg)
    return result, found.outputs()


def _search(data: BlockData, cfg: SearchConfig) -> tuple[BlockResult, _Found]:
    from qvlm.gptq import NumericalFailure

    if cfg.method not in SEARCHERS:
        raise ValueError(f"unknown search method {cfg.method!r}; choose one of {sorted(SEARCHERS)}")
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    try:
        found = SEARCHERS[cfg.method](data, cfg)
        problem = non_finite(found)
    except NumericalFailure as exc:
        found, problem = None, f"{cfg.method}: {exc}"
    if problem is not None:
        found = _fallback(data, cfg, found)
    result = BlockResult(tuple(data.unit_names), found.linears, found.before, found.after, found.evaluations,
                         time.perf_counter() - t0, found.candidates, found.chosen, problem)
    return result, found


def non_finite(found: _Found) -> str | None:
    """Why ``found`` cannot be kept (NaN or infinity in its errors or quantization parameters), or None."""
    for what, value in [("error before the search", found.before), ("block-output error", found.after),
                        *((f"{k} candidate's error", v) for k, v in found.candidates.items())]:
        if not math.isfinite(value):
            return f"{what} is {value}"
    for r in found.linears:
        tensors = [r.weight.scale] + ([r.act_range.lo, r.act_range.hi] if r.act_range is not None else [])
        if not all(torch.isfinite(t.float()).all() for t in tensors):
            return f"non-finite quantization parameters in {r.name}"
    return None


def _fallback(data: BlockData, cfg: SearchConfig, failed: _Found | None) -> _Found:
    """The quarantined block's weights: RTN with the unweighted clipping search (no calibration data), the
    activation ranges at the full range of the finite calibration rows; errors as measured (maybe NaN)."""
    ws = _Workspace(data)
    cand = _Candidates(ws, SearchConfig(max_act_rows=cfg.max_act_rows))
    cand.act_rows = {n: torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) for n, x in cand.act_rows.items()}
    weights = {n: quantize_clipped(ws.fp_weight[n], data.schemes[n], None, cfg.shrinks) for n in ws.fq}
    ap = {n: (1.0 if n in cand.act_rows else None) for n in ws.fq}
    for n in ws.fq:
        cand.apply(n, None, ap[n])
    after = _weights_error(ws, weights)
    before = failed.before if failed is not None else after
    candidates = dict(failed.candidates) if failed is not None else {}
    return _Found(_results(ws, cand, {n: None for n in ws.fq}, ap, weights), before, after, ws.evaluations,
                  _last_outputs(ws), candidates, "fallback")


@torch.no_grad()
def quantized_block_outputs(data: BlockData, result: BlockResult) -> list[torch.Tensor]:
    """The block's output per batch with ``result`` applied (the next block's input under Eq. 3 propagation)."""
    ws = _Workspace(data)
    apply_linear_results(ws.fq, result.linears, data.act, dense=False)
    return ws.run_from(0)[-1]


def linear_tensors(results: Sequence[LinearResult]) -> dict[str, torch.Tensor]:
    """Every quantized tensor of the results by name, in a fixed order (what block shards hold)."""
    out: dict[str, torch.Tensor] = {}
    for r in results:
        out[f"{r.name}.qweight"] = r.weight.qweight
        out[f"{r.name}.scale"] = r.weight.scale
        if r.weight.zero is not None:
            out[f"{r.name}.zero"] = r.weight.zero
        if r.act_range is not None:
            out[f"{r.name}.act_lo"], out[f"{r.name}.act_hi"] = r.act_range.lo, r.act_range.hi
    return out


def apply_linear_results(fq_by_name: dict[str, FakeQuantLinear], results: Sequence[LinearResult], act: ActScheme,
                         dense: bool = True) -> None:
    """Put ``results`` in their fake-quant linears: the dequantized weight in ``weight`` or, unless ``dense``, the
    integers in ``quantized`` (a search's workspace, whose ``weight`` is the caller's)."""
    for r in results:  # results read back from storage are on the CPU: each goes to its module's device
        fq = fq_by_name[r.name]
        device = fq.weight.device
        if dense:
            fq.weight.data = r.weight.dequantize().to(device, fq.weight.dtype)
        else:
            fq.quantized = r.weight.to(device)
        fq.act_scheme = act
        fq.act_range = None if r.act_range is None else ActRange(r.act_range.lo.to(device), r.act_range.hi.to(device))
