"""One stage's part of visual-encoder optimisation through the pipeline (the method and the order of the calls:
qvlm/veo.py, :func:`qvlm.veo.veo_phase`).

Each stage keeps the autograd graph of one calibration batch between its ``forward`` and its ``backward``: its
input hidden state is a leaf, and so is every hand-over argument that depends on the vision tower (Mllama's
cross-attention states); its language units' outputs are kept with their graph, and their strided rows (the
dependency term's input) go to the first stage. A ``backward`` gets the gradients of its output hidden state,
of the arguments it passed on and of its rows, and returns those of its inputs, for the stage before. Which
inputs carry a gradient travels with the hand-over (:class:`Reach`), so a layer the vision tower does not reach
gets none, as in one process. The language model's weights are frozen in every stage.

The first stage also owns the vision tower, the model's glue and what is trained: it runs the model's own
forward up to its last unit, finishes the forward from the last stage's hidden state to logits (``head``),
computes the loss with every stage's rows, its vision output and the final hidden state as leaves, and, after
its own backward, steps the optimiser. So only hidden states, rows and their gradients cross stage boundaries,
and no worker holds more than its own units.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from qvlm.capture import (Handover, _strided, call_unit, capture_units, finish_forward, handover, replace_tensors,
                          row_selection, tensors_in)
from qvlm.config import QuantConfig
from qvlm.dependency import ChannelGrid, channel_grid
from qvlm.fakequant import put_modules, swap_in_fake_quant
from qvlm.learned import LearnedWeightQuantizer
from qvlm.quant import ActRange, WeightScheme, calibrate_act_range
from qvlm.search import BlockResult, LinearResult, apply_linear_results
from qvlm.structure import Unit
from qvlm.veo import (Quantizers, VeoResult, dependency_gradients, next_token_loss, relative_error, taps, token_mask,
                      vision_linear_names)

Batch = dict[str, torch.Tensor]
MODES = ("reference", "jacobian", "train")
ACT_ROWS = 8192  # input rows per vision linear that its static activation range is calibrated on  # full-precision pass; Jacobian weights of Eq. 9; a training step


def _rows(x: torch.Tensor, mask: torch.Tensor | None, max_rows: int) -> torch.Tensor:
    """The strided valid rows of one unit output, in float32 (what the dependency term sees); every row when the
    token mask does not match the output's positions."""
    matches = mask is not None and tuple(mask.shape) == tuple(x.shape[:-1])
    rows = x[mask] if matches else x.reshape(-1, x.shape[-1])
    return _strided(rows.float(), max_rows)


def _leaf(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.detach().to(device).requires_grad_(True)


@dataclass(frozen=True)
class Reach:
    """Which parts of a hand-over depend on the vision tower: the hidden state, and which of the tensors in its
    arguments (positions in ``qvlm.capture.tensors_in`` order)."""

    hidden: bool
    arguments: tuple[int, ...]


@dataclass
class _Graph:
    """One batch's forward through this stage, kept for its backward."""

    outs: list[torch.Tensor]  # own language units' outputs, with their graph
    rows: list[torch.Tensor] = field(default_factory=list)  # their strided rows (train mode)
    leaf: torch.Tensor | None = None  # the input hidden state (later stages, when the tower reaches it)
    arguments: list[torch.Tensor] = field(default_factory=list)  # hand-over arguments that carry a gradient
    vision: torch.Tensor | None = None  # the vision output (first stage)


@dataclass
class _HeadGrads:
    """What the first stage's loss gave its own tensors, held until the stages after it have sent theirs back."""

    out: torch.Tensor | None  # of the final hidden state, when this stage is also the last
    vision: torch.Tensor | None = None
    rows: list[torch.Tensor | None] = field(default_factory=list)


class _Trainer:
    """The first stage's part: references, the quantizers and their optimiser, the loss, the history."""

    def __init__(self, model: nn.Module, units: Sequence[Unit], schemes: dict[str, WeightScheme], config: QuantConfig,
                 answers: Sequence[torch.Tensor] | None):
        torch.manual_seed(config.seed)
        self.started = time.perf_counter()
        self.model, self.units, self.schemes, self.config, self.cfg = model, list(units), schemes, config, config.veo
        self.names = vision_linear_names(units)
        self.answers = answers
        self.batches: dict[int, Batch] = {}
        self.ref_vision: dict[int, torch.Tensor] = {}
        self.ref_logits: dict[int, torch.Tensor] = {}  # in host memory: samples x tokens x vocabulary in all
        self.input_rows: dict[str, list[int]] = {n: [] for n in self.names}  # rows of each call (static schemes)
        self.grids: list[ChannelGrid] = []
        self.weights = torch.ones(0, dtype=torch.float64)
        self.quant: Quantizers | None = None
        self.originals: dict[str, nn.Module] = {}
        self.history: list[dict] = []
        self.sums = dict.fromkeys(("loss", "next_token", "dependency", "error"), 0.0)
        self.steps = 0
        self.error_before = 0.0

    def act_ranges(self, detach: bool = False) -> None:
        """Give each fake-quantized vision linear its current input range (with the graph to its scale)."""
        if self.quant is not None:
            for n in self.names:
                self.model.get_submodule(n).act_range = self.quant.act_range(n, detach)

    @contextmanager
    def tower_without_graph(self):
        """The tower's quantizers as they stand, recording no graph: the head's pass to the logits runs the
        tower again (the model's own forward), and its output goes nowhere the loss reaches."""
        if self.quant is None:
            yield
            return
        fq = {n: self.model.get_submodule(n) for n in self.names}
        for n, module in fq.items():
            module.weight_fn = _no_grad(self.quant.weights[n].soft_weight)
        self.act_ranges(detach=True)
        try:
            yield
        finally:
            for n, module in fq.items():
                module.weight_fn = self.quant.weights[n].soft_weight
            self.act_ranges()

    def static(self) -> bool:
        return self.config.activations.enabled and self.config.activations.static

    def count_inputs(self) -> list:
        """Hooks that count the input rows of each call of each vision linear (static activation schemes)."""
        return [self.model.get_submodule(n).register_forward_pre_hook(
            lambda _m, args, n=n: self.input_rows[n].append(args[0].shape[:-1].numel())) for n in self.names] \
            if self.static() else []

    def input_ranges(self, forward) -> dict[str, ActRange]:
        """Each vision linear's full-precision input range, calibrated on the evenly strided ``ACT_ROWS`` rows of
        all its inputs: picked call by call in one more pass (``forward(batch)`` over the kept batches), so that
        no more than those rows of the tower's inputs are ever held."""
        if not self.static():
            return {}
        picks = {n: row_selection(rows, ACT_ROWS) for n, rows in self.input_rows.items()}
        kept: dict[str, list[torch.Tensor]] = {n: [] for n in self.names}

        def keep(_m, args, n):
            flat, pick = args[0].detach().reshape(-1, args[0].shape[-1]), picks[n][len(kept[n])]
            kept[n].append(flat if pick is None else flat[pick.to(flat.device)])

        hooks = [self.model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: keep(m, a, n)) for n in self.names]
        try:
            for batch in self.batches.values():
                forward(batch)
        finally:
            for h in hooks:
                h.remove()
        return {n: calibrate_act_range(torch.cat(x), self.config.activations) for n, x in kept.items() if x}

    def start(self, grids: list[ChannelGrid], act_base: dict[str, ActRange]) -> None:
        """Swap fake-quantized linears into the tower and make its quantizers trainable."""
        self.grids = grids
        self.weights = torch.ones(max(len(grids) - 1, 0), dtype=torch.float64)  # Eq. 9's weights before the first
        act = self.config.activations
        self.originals = {n: self.model.get_submodule(n) for n in self.names}
        fq = swap_in_fake_quant(self.model, self.names)
        self.quant = Quantizers({n: LearnedWeightQuantizer.init(fq[n].weight.detach(), self.schemes[n]) for n in self.names},
                                 act_base, {n: torch.ones((), requires_grad=True) for n in act_base})
        for n, q in self.quant.weights.items():
            q.v.requires_grad_(False)
            fq[n].weight_fn, fq[n].act_scheme = q.soft_weight, act
        self.optimizer = torch.optim.Adam(self.quant.params(), lr=self.cfg.lr)

    def put_back(self) -> None:
        """The tower's own linears in place of the fake-quantized ones (once)."""
        put_modules(self.model, self.originals)
        self.originals = {}

    def set_weights(self, norms: torch.Tensor) -> None:
        self.weights = norms / norms.mean() if float(norms.sum()) > 0 else torch.ones_like(norms)

    def loss(self, index: int, logits: torch.Tensor, vision: torch.Tensor, rows: list[torch.Tensor]
             ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The loss's next-token and error terms (a tensor to differentiate) and the dependency term's gradient
        with respect to each unit's rows (taken on its own, :func:`qvlm.veo.dependency_gradients`)."""
        answer = self.answers[index].to(logits.device) if self.answers is not None else None
        ce = next_token_loss(self.model, logits, self.batches[index], answer)
        row_grads, dep, mean_d = dependency_gradients(rows, self.grids, self.weights, self.cfg.lambda_entropy)
        err = relative_error(vision, self.ref_vision[index]) + self.cfg.eta * relative_error(logits, self.reference(index, logits))
        loss = ce + self.cfg.lambda_error * err
        for key, value in (("loss", loss.item() + dep), ("next_token", ce.item()), ("dependency", mean_d), ("error", err.item())):
            self.sums[key] += value
        self.steps += 1
        return loss, row_grads

    def reference(self, index: int, logits: torch.Tensor) -> torch.Tensor:
        """Batch ``index``'s full-precision logits, where ``logits`` are."""
        return self.ref_logits[index].to(logits.device, non_blocking=True)

    def end_epoch(self, epoch: int) -> None:
        self.history.append({"epoch": epoch, **{k: v / max(self.steps, 1) for k, v in self.sums.items()},
                             "jacobian_weights": [round(float(w), 4) for w in self.weights]})
        self.sums, self.steps = dict.fromkeys(self.sums, 0.0), 0

    def finish(self, vision_error) -> VeoResult:
        """Fix the trained quantizers into the tower, measure its error, and put the model's linears back."""
        act = self.config.activations
        results = tuple(LinearResult(n, self.quant.weights[n].finalize(), self.quant.act_range(n, detach=True), None, None)
                        for n in self.names)
        fq = {n: self.model.get_submodule(n) for n in self.names}
        for module in fq.values():
            module.weight_fn = None
        apply_linear_results(fq, results, act)
        self.quant = None  # the tower runs with the fixed quantizers now
        error_after = vision_error()
        self.put_back()
        units = tuple(u.name for u in self.units if u.segment == "vision")
        seconds = time.perf_counter() - self.started
        block = BlockResult(units, results, self.error_before, error_after, self.cfg.epochs * len(self.batches), seconds)
        return VeoResult(block, tuple(self.history), seconds)


class StageVeo:
    """VEO's state in one stage, from ``begin`` to ``end`` (see the module's docstring)."""

    def __init__(self, stage, units: Sequence[Unit], schemes: dict[str, WeightScheme], bits: dict[int, int],
                 config: QuantConfig, answers: Sequence[torch.Tensor] | None = None):
        self.stage, self.model, self.device = stage, stage.model, stage.device
        self.max_rows, self.activations = config.veo.max_rows, config.activations
        self.language = [u for u in stage.units if u.segment == "language"]
        if not self.language or stage.units[-1].segment != "language":
            raise NotImplementedError("VEO through the stages needs every stage to end on a language-model unit "
                                      f"(this stage ends on {stage.units[-1].name})")
        if not stage.first and len(self.language) != len(stage.units):
            raise NotImplementedError("VEO through the stages needs the whole vision tower in the first stage")
        self.grid_bits = [bits[u.index] for u in self.language]
        self.reference_range: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.language)
        self.graph: _Graph | None = None
        self.head_grads: _HeadGrads | None = None
        # Frozen here, given back at the end: only what this stage froze (stages in one process share one model).
        self.frozen = [p for p in self.model.parameters() if p.requires_grad]
        for p in self.frozen:
            p.requires_grad_(False)
        self.trainer = _Trainer(self.model, units, schemes, config, answers) if stage.first else None

    # --- forward ----------------------------------------------------------------------------------------

    def forward(self, index: int, item: Batch | Handover, mode: str, reach: Reach | None = None
                ) -> tuple[Handover, list[torch.Tensor] | None, Reach | None]:
        """One batch through this stage: what the next stage takes, (later stages, train mode) the rows the
        first stage's loss needs, and what of the hand-over the tower reaches. The first stage keeps each batch
        from the reference pass on; a later stage gets the ``reach`` of the stage before."""
        if mode not in MODES:
            raise ValueError(f"unknown VEO pass {mode!r}; one of {MODES}")
        grad = mode != "reference"
        if self.stage.first:
            return self._forward_first(index, item, mode, grad)
        item = item.to(self.device)
        graph = _Graph([])
        if grad:
            item, graph = self._leaves(item, reach)
        hidden = item.hidden
        with torch.set_grad_enabled(grad):
            for unit in self.stage.units:
                hidden = call_unit(self.stage.module(unit.index), item.call_for(unit.name, hidden))
                graph.outs.append(hidden)
            graph.rows = [_rows(o, item.mask, self.max_rows) for o in graph.outs] if mode == "train" else []
        self._keep(graph, item.mask, mode)
        rows = [r.detach() for r in graph.rows] if mode == "train" else None
        passed_on = replace_tensors(item.arguments, [t.detach() for t in tensors_in(item.arguments)])
        reached = Reach(hidden.requires_grad, reach.arguments) if grad else None
        return Handover(hidden.detach(), item.mask, passed_on, item.unit_arguments), rows, reached

    def _leaves(self, item: Handover, reach: Reach) -> tuple[Handover, _Graph]:
        """The hand-over with a leaf for each part the tower reaches, and the graph that holds those leaves."""
        graph = _Graph([], leaf=_leaf(item.hidden, self.device) if reach.hidden else None)
        tensors = tensors_in(item.arguments)
        for k in reach.arguments:
            tensors[k] = _leaf(tensors[k], self.device)
            graph.arguments.append(tensors[k])
        hidden = graph.leaf if graph.leaf is not None else item.hidden
        return Handover(hidden, item.mask, replace_tensors(item.arguments, tensors), item.unit_arguments), graph

    def _forward_first(self, index: int, batch: Batch | None, mode: str, grad: bool) -> tuple[Handover, None, Reach | None]:
        t = self.trainer
        if index not in t.batches:  # kept from the reference pass on
            t.batches[index] = {k: v.to(self.device) for k, v in batch.items()}
        batch = t.batches[index]
        t.act_ranges()
        hooks = t.count_inputs() if mode == "reference" else []
        try:
            with taps(self.model, t.units, self.language) as seen:
                captured = capture_units(self.model, self.stage.units, [batch], stop_after_last=True,
                                         ahead=self.stage.ahead, grad=grad)
        finally:
            for h in hooks:
                h.remove()
        mask = token_mask(batch).to(self.device)
        graph = _Graph(list(seen["language"]), vision=seen["vision"])
        with torch.set_grad_enabled(grad):
            graph.rows = [_rows(o, mask, self.max_rows) for o in graph.outs] if mode == "train" else []
        if mode == "reference":
            t.ref_vision[index] = graph.vision.detach()
        given = handover(graph.outs[-1], mask, captured[len(self.stage.units):])
        arguments = tensors_in(given.arguments)
        reach = Reach(graph.outs[-1].requires_grad, tuple(k for k, a in enumerate(arguments) if a.requires_grad))
        graph.arguments = [arguments[k] for k in reach.arguments]
        self._keep(graph, mask, mode)
        passed_on = replace_tensors(given.arguments, [a.detach() for a in arguments])
        return Handover(given.hidden.detach(), mask, passed_on, given.unit_arguments), None, reach if grad else None

    def _keep(self, graph: _Graph, mask: torch.Tensor | None, mode: str) -> None:
        if mode == "reference":
            for k, out in enumerate(graph.outs):  # a grid needs only each channel's range over the batches' rows
                rows, seen = _rows(out.detach(), mask, self.max_rows), self.reference_range[k]
                lo, hi = rows.amin(0), rows.amax(0)
                self.reference_range[k] = (lo, hi) if seen is None else (torch.minimum(seen[0], lo), torch.maximum(seen[1], hi))
            self.graph = None
        else:
            self.graph = graph

    def grids(self) -> list[ChannelGrid]:
        """The dependency grids of this stage's language units, fixed from the full-precision pass."""
        return [channel_grid(torch.stack(lo_hi), b) for lo_hi, b in zip(self.reference_range, self.grid_bits)]

    # --- the first stage: head, optimiser -------------------------------------------------------------------

    def start_training(self, *grids: list[ChannelGrid]) -> int:
        """Every stage's grids (in stage order) in; returns the number of consecutive language-unit pairs."""
        t = self.trainer
        ranges = t.input_ranges(lambda batch: capture_units(self.model, self.stage.units, [batch], stop_after_last=True,
                                                            ahead=self.stage.ahead))
        t.start([ChannelGrid(g.lo.to(self.device), g.hi.to(self.device), g.levels) for part in grids for g in part], ranges)
        t.error_before = self.vision_error()
        return max(len(t.grids) - 1, 0)

    def head(self, index: int, mode: str, last: Handover, *remote_rows: list[torch.Tensor] | None) -> Any:
        """Finish batch ``index``'s forward from the last stage's hidden state; in training, the loss and its
        gradients. Returns, for each later stage in order, the gradients of its output and of its rows."""
        t, grad = self.trainer, mode != "reference"
        batch = t.batches[index]
        h = _leaf(last.hidden, self.device) if grad else last.hidden.to(self.device)
        layer_list = self.stage.units[-1].name.rsplit(".", 1)[0]
        with torch.set_grad_enabled(grad), t.tower_without_graph():
            logits = finish_forward(self.model, layer_list, batch, h)
        n_later = len(remote_rows)
        if mode == "reference":
            t.ref_logits[index] = logits.detach().to("cpu")
            return _parts([(None, None)] * n_later)
        if mode == "jacobian":
            (g_h,) = torch.autograd.grad(relative_error(logits, t.reference(index, logits)), [h])
            self.head_grads = _HeadGrads(g_h if not n_later else None)
            return _parts([(g_h if s == n_later - 1 else None, None) for s in range(n_later)])
        own = [r.detach() for r in self.graph.rows]
        remote = [[r.to(self.device) for r in rows] for rows in remote_rows]
        vision = _leaf(self.graph.vision, self.device)
        loss, row_grads = t.loss(index, logits, vision, own + [r for rows in remote for r in rows])
        g_h, g_vision = torch.autograd.grad(loss, [h, vision], allow_unused=True)
        g_own, rest = row_grads[: len(own)], row_grads[len(own):]
        self.head_grads = _HeadGrads(g_h if not n_later else None, g_vision, g_own)
        parts = []
        for s, rows in enumerate(remote):
            parts.append((g_h if s == n_later - 1 else None, rest[: len(rows)]))
            rest = rest[len(rows):]
        return _parts(parts)

    def set_weights(self, *norms: list[float]) -> None:
        """The Jacobian weights of Eq. 9 from every stage's gradient norms (in stage order)."""
        flat = torch.tensor([x for part in norms for x in part], dtype=torch.float64)
        self.trainer.set_weights(flat[: max(len(self.trainer.grids) - 1, 0)])

    def end_epoch(self, epoch: int) -> None:
        self.trainer.end_epoch(epoch)

    def finish(self) -> VeoResult:
        return self.trainer.finish(self.vision_error)

    @torch.no_grad()
    def vision_error(self) -> float:
        """Mean squared error of the vision output against full precision over the calibration batches."""
        t = self.trainer
        t.act_ranges()
        total, count = 0.0, 0
        for index, batch in t.batches.items():
            with taps(self.model, t.units, []) as seen:
                capture_units(self.model, self.stage.units, [batch], stop_after_last=True, ahead=self.stage.ahead)
            sq = (seen["vision"].double() - t.ref_vision[index].double()) ** 2
            total, count = total + float(sq.sum()), count + sq.numel()
        return total / max(count, 1)

    # --- backward ---------------------------------------------------------------------------------------

    def backward(self, mode: str, part: tuple | None, from_next: tuple | None) -> tuple[Any, list[float]]:
        """A later stage: the gradients of its output hidden state (from the stage after it, or, for the last,
        the loss), of the arguments it passed on and of its rows in; those of its inputs (hidden state,
        arguments) out, and in the Jacobian pass the gradient norm of each own unit's output."""
        g_out, g_rows = part if part is not None else (None, None)
        g_out, g_passed = from_next if from_next is not None else (g_out, [None] * len(self.graph.arguments))
        graph, self.graph = self.graph, None
        outputs, grads = self._outputs(graph, g_out, [*zip(graph.rows, g_rows or [])])
        inputs = ([graph.leaf] if graph.leaf is not None else []) + graph.arguments
        reached = [o for o in graph.outs if o.requires_grad] if mode == "jacobian" else []
        got = list(torch.autograd.grad(outputs, inputs + reached, grads, allow_unused=True)) if outputs else \
            [None] * (len(inputs) + len(reached))
        g_hidden = got.pop(0) if graph.leaf is not None else None
        g_arguments = [_sum(mine, passed) for mine, passed in zip(got[: len(graph.arguments)], g_passed)]
        by_id = dict(zip(map(id, reached), got[len(graph.arguments):]))
        return (g_hidden, g_arguments), _norms([by_id.get(id(o)) for o in graph.outs])

    def _outputs(self, graph: _Graph, g_out: torch.Tensor | None, more: list[tuple]) -> tuple[list, list]:
        """The tensors of ``graph`` to differentiate and their incoming gradients: the output hidden state and
        each (tensor, gradient) of ``more`` whose gradient is there and which depends on the tower."""
        outputs, grads = [], []
        for tensor, g in [(graph.outs[-1], g_out), *more]:
            if g is not None and tensor is not None and tensor.requires_grad:
                outputs.append(tensor)
                grads.append(g.to(self.device))
        return outputs, grads

    def backward_first(self, mode: str, from_next: tuple | None) -> list[float] | None:
        """The first stage: its own tensors' gradients from the loss, plus those of what it handed over from the
        stage after it; a training step then, or, in the Jacobian pass, the gradient norm of each own unit's
        output."""
        graph, self.graph = self.graph, None
        held, self.head_grads = self.head_grads, None
        g_out, g_passed = from_next if from_next is not None else (held.out, [])
        more = [*zip(graph.arguments, g_passed), *zip([graph.vision, *graph.rows], [held.vision, *held.rows])]
        outputs, grads = self._outputs(graph, g_out, more)
        if mode == "jacobian":
            reached = [o for o in graph.outs if o.requires_grad]
            got = dict(zip(map(id, reached), torch.autograd.grad(outputs, reached, grads, allow_unused=True))) \
                if outputs and reached else {}
            return _norms([got.get(id(o)) for o in graph.outs])
        t = self.trainer
        t.optimizer.zero_grad()
        if outputs:
            torch.autograd.backward(outputs, grads)
        t.optimizer.step()
        t.quant.clamp_()
        return None

    def end(self) -> None:
        """The model as it was: its parameters' requires_grad flags and, when training stopped before ``finish``,
        the tower's own linears."""
        for p in self.frozen:
            p.requires_grad_(True)
        if self.trainer is not None:
            self.trainer.put_back()
        self.graph = self.head_grads = self.trainer = None


def _no_grad(fn):
    def call():
        with torch.no_grad():
            return fn()

    return call


def _sum(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None or b is None:
        return a if b is None else b
    return a + b.to(a.device)


def _norms(grads: Sequence[torch.Tensor | None]) -> list[float]:
    return [float(g.norm()) if g is not None else 0.0 for g in grads]


def _parts(parts: list) -> Any:
    """One value per later stage, as a pipeline call with that many returns gives them back."""
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else tuple(parts)
