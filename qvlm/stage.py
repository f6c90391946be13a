"""A pipeline stage: the units of a model that one worker owns, on one device, with what was captured for them.

The first stage runs the model's own forward pass (embeddings, vision tower, projector merge) and stops after
its last unit; a later stage calls its units directly on the call handed over by the stage before (every unit of
one layer list takes the same extra arguments). A stage computes its units' statistics and searches the blocks
that lie inside it with the weights and captured inputs it already holds; only the hidden states at its
boundaries leave it. Computation runs on ``device``; captures are kept on ``keep_on`` (the device itself, or
host memory when they do not fit; or the vision tower's alone in host memory) and moved one calibration batch at a
time.

A one-process run is one stage that owns every unit (``qvlm.driver.quantize``); a job has one per worker.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from qvlm.capture import Handover, UnitCapture, call_unit, capture_units, finish_forward, handover, move
from qvlm.config import QuantConfig
from qvlm.dependency import pair_dependency, unit_entropy, unit_rows
from qvlm.evaluate import Comparison, EvalResult
from qvlm.fakequant import FakeQuantLinear, put_modules, swap_in_fake_quant
from qvlm.quant import WeightScheme
from qvlm.search import (BlockData, BlockResult, apply_linear_results, quantized_block_outputs, search_block,
                         search_block_with_outputs)
from qvlm.stats import UnitStats, unit_statistics
from qvlm.structure import Unit, find_units
from qvlm.veo_stage import StageVeo

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class BlockJob:
    """One block to search: consecutive units of one stream, all owned by one stage."""

    index: int
    stream: int
    units: tuple[int, ...]  # global unit indices
    schemes: Mapping[str, WeightScheme]  # full linear name -> weight scheme


@dataclass(frozen=True)
class BlockSummary:
    """What the driver learns of a searched block (the tensors stay with the stage or go to storage)."""

    index: int
    error_before: float
    error_after: float
    evaluations: int
    seconds: float


def summary_of(index: int, result: BlockResult) -> BlockSummary:
    return BlockSummary(index, result.error_before, result.error_after, result.evaluations, result.seconds)


def compute_device(assigned_gpus: Sequence) -> torch.device:
    """Where a stage computes: the first GPU assigned to it (a Ray actor sees its own GPUs from cuda:0 on), else
    the CPU, also when GPUs are assigned but this torch build cannot use them."""
    return torch.device("cuda", 0) if assigned_gpus and torch.cuda.is_available() else torch.device("cpu")


def to_device(model: nn.Module, device: torch.device) -> None:
    """Move every real (non-meta) parameter and buffer of ``model`` to ``device``, in place."""
    for module in model.modules():
        for registry in (module._parameters, module._buffers):
            for name, tensor in registry.items():
                if tensor is not None and not tensor.is_meta and tensor.device != device:
                    moved = tensor.to(device)
                    registry[name] = nn.Parameter(moved, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else moved


def _units_ahead(model: nn.Module, units: Sequence[Unit]) -> list[Unit]:
    """The units after the last of ``units`` in its layer list (owned by later stages). Found by module name: a
    job's units are numbered among the units it quantizes (``targets``, ``ignore``), not among all the model's."""
    everything = find_units(model)
    last = [u.name for u in everything].index(units[-1].name)
    parent = units[-1].name.rsplit(".", 1)[0]
    return [u for u in everything[last + 1:] if u.name.rsplit(".", 1)[0] == parent]


class Stage:
    def __init__(self, model: nn.Module, units: Sequence[Unit], first: bool, device: torch.device | str = "cpu",
                 keep_on: torch.device | str | None = None):
        self.model, self.units, self.first = model.eval(), list(units), first
        self.device = torch.device(device)
        self.keep_on = torch.device(keep_on) if keep_on is not None else self.device
        self._on_host: set[int] = set()  # units whose captures stay in host memory though keep_on is the device
        to_device(self.model, self.device)
        self.captures = {u.index: UnitCapture(u) for u in self.units}
        self.results: dict[int, BlockResult] = {}  # searched or loaded blocks, by block index
        self._carried: list[torch.Tensor] | None = None
        self.ahead = _units_ahead(self.model, self.units) if first else []
        self._originals: dict[str, nn.Module] = {}  # linears as loaded, before apply() swapped in quantized ones
        self._quantized: dict[str, FakeQuantLinear] = {}  # the evaluation's quantized linears (not in the model)
        self.comparison: Comparison | None = None  # the first stage's held-out batches and tally
        self._veo: StageVeo | None = None  # visual-encoder optimisation's state, while it runs

    def keep_captures_on(self, where: str) -> None:
        """Keep what is captured from now on on the stage's ``device``, in ``host`` memory (when it does not fit
        the GPU: each batch then moves to the device when it is used), or ``split``: the vision tower's and the
        projector's in host memory, the language units' on the device (cluster/memory.py's fit)."""
        self.keep_on = self.device if where in ("device", "split") else torch.device("cpu")
        self._on_host = {u.index for u in self.units if u.segment != "language"} if where == "split" else set()

    def keeps_on_host(self) -> bool:
        """Whether any capture lives in host memory (then a hidden state arriving from another stage is copied
        out of the object store rather than kept as a view of it)."""
        return self.keep_on.type == "cpu" or bool(self._on_host)

    def _keep_for(self, unit_index: int) -> torch.device:
        """Where a unit's captures, and a block's input and output starting or ending at it, are kept."""
        return torch.device("cpu") if unit_index in self._on_host else self.keep_on

    def module(self, unit_index: int) -> nn.Module:
        return self.model.get_submodule(self.captures[unit_index].unit.name)

    # --- capture ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def capture(self, item: Batch | Handover, hand_over: bool = True) -> Handover | None:
        """Capture one calibration batch; returns what continues the stream in the next stage (None without
        ``hand_over``: the last stage)."""
        if self.first:
            batch = {k: v.to(self.device) for k, v in item.items()}
            new = capture_units(self.model, self.units, [batch], stop_after_last=True, ahead=self.ahead)
            new, ahead = new[: len(self.units)], new[len(self.units) :]
            item = handover(new[-1].outputs[-1], new[-1].calls[-1].mask, ahead)
        else:
            item = item.to(self.device)
            new = self._run_units(item)
        memos: dict = {}  # per place, one kept copy of a tensor that is both an output and the next unit's input
        for cap in new:
            mine, place = self.captures[cap.unit.index], self._keep_for(cap.unit.index)
            memo = memos.setdefault(place, {})
            mine.calls += [c.to(place, memo) for c in cap.calls]
            mine.outputs += [move(o, place, memo) for o in cap.outputs]
        last = self.captures[self.units[-1].index]
        return item.with_hidden(last.outputs[-1]) if hand_over else None

    def _run_units(self, item: Handover) -> list[UnitCapture]:
        captures, hidden = [], item.hidden
        for unit in self.units:
            call = item.call_for(unit.name, hidden)
            hidden = call_unit(self.module(unit.index), call)
            captures.append(UnitCapture(unit, [call], [hidden]))
        return captures

    def reset_captures(self) -> None:
        self.captures = {u.index: UnitCapture(u) for u in self.units}

    # --- statistics -------------------------------------------------------------------------------------

    @torch.no_grad()
    def statistics(self, base: WeightScheme) -> list[UnitStats]:
        return [unit_statistics(self.module(u.index), u, u.linears, self.captures[u.index].calls, base) for u in self.units]

    def dependencies(self, bits: Mapping[int, int], previous: Mapping[int, int | None], max_rows: int = 4096):
        """Entropy of each own unit and D(prev, unit) for each own unit with a predecessor in its stream.

        The predecessor's output is another own unit's output or, for the first own unit, the hidden state this
        stage received (the previous stage's last output)."""
        rows = {i: unit_rows(c.outputs, [k.mask for k in c.calls], max_rows) for i, c in self.captures.items()}
        entropy = {i: unit_entropy(r, bits[i]) for i, r in rows.items()}
        deps = {}
        for i, cap in self.captures.items():
            prev = previous.get(i)
            if prev is None:
                continue
            prev_rows = rows.get(prev)
            if prev_rows is None:
                prev_rows = unit_rows([k.hidden for k in cap.calls], [k.mask for k in cap.calls], max_rows)
            # a split stage keeps the tower's rows in host memory; a stream is computed where its later unit's are
            deps[i] = pair_dependency(prev_rows.to(rows[i].device), rows[i], bits[prev], bits[i])
        return entropy, deps

    # --- search -----------------------------------------------------------------------------------------

    def block_data(self, job: BlockJob, config: QuantConfig, inputs: list[torch.Tensor] | None) -> BlockData:
        caps = [self.captures[i] for i in job.units]
        calls = [list(c.calls) for c in caps]
        if inputs is not None:
            calls[0] = [c.with_hidden(h) for c, h in zip(calls[0], inputs)]
        return BlockData([self.module(i) for i in job.units], [c.unit.name for c in caps], [c.unit.linears for c in caps],
                         calls, caps[-1].outputs, dict(job.schemes), config.activations)

    def search_block(self, job: BlockJob, config: QuantConfig, source: str = "captured",
                     upstream: list[torch.Tensor] | None = None, needs_out: bool = False,
                     done: bool = False, release: bool = False) -> BlockSummary | None:
        """Search one block of this stage (or, when ``done``, take an earlier run's result); returns its summary
        (None when done). The block's input: ``captured`` full-precision inputs, the quantized output this
        stage ``carried`` from the block before, or ``upstream`` from the stage before (Eq. 3 propagation).
        With ``needs_out`` the block's quantized output is carried to the next block. With ``release`` (the
        method's search phase, which sends a stage its blocks in order, each unit in one block) the block's
        captured hidden states go as soon as nothing reads them: its input before the search when it starts
        from another, the rest after it."""
        inputs = {"captured": None, "carried": self._carried, "upstream": upstream}[source]
        if inputs is not None:
            inputs = [move(h, self._keep_for(job.units[0])) for h in inputs]
            if release:
                self._release_hidden(job.units[:1])
        if done:
            if needs_out:
                self.results[job.index] = self.load_result(job)
            self._carried = self.block_outputs(job, config, inputs) if needs_out else None
            if release:
                self.release_captures(job)
            return None
        data = self.block_data(job, config, inputs)
        if needs_out:  # the search's own last forward pass is the quantized output (no second pass)
            result, outputs = search_block_with_outputs(data, config.search_config())
        else:
            result, outputs = search_block(data, config.search_config()), None
        self.results[job.index] = result
        self.keep_result(job, result, config)
        self._carried = None if outputs is None else [move(o, self._keep_for(job.units[-1])) for o in outputs]
        if release:
            self.release_captures(job)
        return summary_of(job.index, result)

    def release_captures(self, job: BlockJob) -> None:
        """Let a finished block's captured hidden states go (see ``search_block``; the search phase also calls it for
        a block it skips)."""
        self._release_hidden(job.units, outputs=True)

    def _release_hidden(self, units: Sequence[int], outputs: bool = False) -> None:
        """Drop this stage's references to the captured hidden-state inputs (and ``outputs``) of ``units``; the
        other arguments of each call stay. A block reads only its first unit's captured input and its last unit's
        output (its target), so once it is searched no later block reads these; the last unit's output lives on
        as the next unit's input while that unit's block may still start from it."""
        for i in units:
            capture = self.captures[i]
            capture.calls = [c.with_hidden(None) for c in capture.calls]  # a released input is None
            if outputs:
                capture.outputs = []

    def carried(self) -> list[torch.Tensor] | None:
        """The quantized output of the last block searched with ``needs_out`` (for the next stage)."""
        return self._carried

    def load_result(self, job: BlockJob) -> BlockResult:
        """An earlier run's result of a finished block (a worker reads it from the block's shard)."""
        if job.index not in self.results:
            raise KeyError(f"block {job.index} is marked finished but this stage holds no result for it")
        return self.results[job.index]

    def keep_result(self, job: BlockJob, result: BlockResult, config: QuantConfig) -> None:
        """Called after each search (a worker writes the block's shard here); in memory nothing more to do."""

    @torch.no_grad()
    def block_outputs(self, job: BlockJob, config: QuantConfig, inputs: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """The block's quantized output per batch (kept where the captures are)."""
        data = self.block_data(job, config, inputs)
        return [move(o, self._keep_for(job.units[-1])) for o in quantized_block_outputs(data, self.results[job.index])]

    def apply(self, results: Sequence[BlockResult], act) -> None:
        """Run this stage's model with the given blocks' quantizers from here on (fake-quant linears)."""
        linears = [r for b in results for r in b.linears]
        for r in linears:
            self._originals.setdefault(r.name, self.model.get_submodule(r.name))
        apply_linear_results(swap_in_fake_quant(self.model, [r.name for r in linears]), linears, act)

    # --- evaluation -------------------------------------------------------------------------------------

    def prepare_evaluation(self, results: Sequence[BlockResult], act, comparison: Comparison | None = None) -> None:
        """Hold the quantized linears of this stage's blocks beside the full-precision ones, to switch between
        them per forward pass; the first stage also holds the held-out batches (``comparison``). The quantized
        linears hold the integers and dequantize as a forward pass reaches them, as a search's do, so the stage
        holds no second dense copy of its weights. The captures are dropped first: the searches are over."""
        self.reset_captures()
        self._carried = None
        linears = [r for b in results for r in b.linears]
        self._quantized = {r.name: FakeQuantLinear.from_linear(self._original(r.name), share=True) for r in linears}
        apply_linear_results(self._quantized, linears, act, dense=False)
        self.comparison = comparison if self.first else None

    def _original(self, name: str) -> nn.Module:
        """The linear ``name`` as loaded (also when apply() has put a quantized one in its place)."""
        return self._originals[name] if name in self._originals else self.model.get_submodule(name)

    @contextmanager
    def _linears(self, quantized: bool):
        """The model with this stage's quantized linears, or with every linear as loaded, for one pass."""
        chosen = self._quantized if quantized else {name: self._original(name) for name in self._quantized}
        replaced = put_modules(self.model, chosen)
        try:
            yield
        finally:
            put_modules(self.model, replaced)

    @torch.no_grad()
    def evaluate_forward(self, item: int | Handover, quantized: bool) -> Handover:
        """One held-out batch (the first stage: its index) through this stage's units; what the next stage
        takes, or, from the last stage, the final hidden state for :meth:`evaluate_head`."""
        with self._linears(quantized):
            if not self.first:
                item = item.to(self.device)
                return item.with_hidden(self._run_units(item)[-1].outputs[-1])
            batch = {k: v.to(self.device) for k, v in self.comparison.batches[item].items()}
            new = capture_units(self.model, self.units, [batch], stop_after_last=True, ahead=self.ahead)
            return handover(new[len(self.units) - 1].outputs[-1], None, new[len(self.units) :])

    @torch.no_grad()
    def evaluate_head(self, index: int, last: Handover, quantized: bool) -> None:
        """Finish batch ``index``'s forward pass (the first stage holds the model's glue: final norm, head) from
        the last stage's hidden state, and tally its logits."""
        batch = {k: v.to(self.device) for k, v in self.comparison.batches[index].items()}
        layer_list = self.units[-1].name.rsplit(".", 1)[0]
        with self._linears(quantized):
            logits = finish_forward(self.model, layer_list, batch, last.hidden.to(self.device))
        self.comparison.add(index, logits, quantized)

    def evaluation(self) -> EvalResult:
        return self.comparison.result()

    def end_evaluation(self) -> None:
        """Let the quantized linears (their integers) and the held-out batches go."""
        self._quantized, self.comparison = {}, None

    # --- visual-encoder optimisation --------------------------------------------------------------------

    def veo(self, step: str, *args: Any) -> Any:
        """One step of VEO's part in this stage (``qvlm.veo.veo_phase`` calls them in order): ``begin`` with
        the arguments of :class:`qvlm.veo_stage.StageVeo`, then its methods by name, ending with ``end``."""
        if step == "begin":
            self._veo = StageVeo(self, *args)
            return None
        if self._veo is None:
            raise RuntimeError(f"VEO step {step!r} before 'begin'")
        result = getattr(self._veo, step)(*args)
        if step == "end":
            self._veo = None
        return result
