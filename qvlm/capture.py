"""Capture each unit's inputs and outputs from full-precision forward passes, and replay units alone.

A unit is called by its model as ``unit(hidden_states, *args, **kwargs)`` where the extra arguments
(attention mask, position embeddings, ...) are the same for every unit of one layer list. We record
them once per call so that a unit, or a block of consecutive units, can later run on its own.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from transformers import Cache, PretrainedConfig

from qvlm.structure import Unit

# Flags that only steer a forward pass's bookkeeping; a replayed unit must not receive them.
_DROPPED_KWARGS = ("use_cache", "output_attentions", "output_hidden_states", "return_dict")


@dataclass
class UnitCall:
    """One captured invocation of a unit: its hidden-state input and the rest of its arguments."""

    hidden: torch.Tensor
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    mask: torch.Tensor | None = None  # [batch, tokens] bool of positions that count in errors, None = all

    def with_hidden(self, hidden: torch.Tensor) -> "UnitCall":
        return UnitCall(hidden, self.args, self.kwargs, self.mask)

    def to(self, device: torch.device | str, memo: dict | None = None) -> "UnitCall":
        """The call with every tensor on ``device``; tensors shared between calls stay shared through ``memo``."""
        memo = {} if memo is None else memo
        return UnitCall(*(move(v, device, memo) for v in (self.hidden, self.args, self.kwargs, self.mask)))

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the call holds (hidden state first)."""
        return tensors_in((self.hidden, self.args, self.kwargs, self.mask))


@dataclass
class Handover:
    """What a stage hands the next one per calibration batch: the stream's hidden state and token mask, and the
    arguments each unit ahead takes. Units of one layer list may take different ones (Gemma 3's sliding and
    global layers get different masks and rotary tables, Mllama's cross-attention layers the vision states), so
    each unit gets the arguments the model's own forward pass gave it; sets shared by several units travel once."""

    hidden: torch.Tensor
    mask: torch.Tensor | None
    arguments: list[tuple[tuple, dict]]  # distinct (args, kwargs) after the hidden state
    unit_arguments: dict[str, int]  # unit (module) name -> its entry in ``arguments``

    def call_for(self, unit_name: str, hidden: torch.Tensor) -> UnitCall:
        args, kwargs = self.arguments[self.unit_arguments[unit_name]]
        return UnitCall(hidden, args, kwargs, self.mask)

    def with_hidden(self, hidden: torch.Tensor) -> "Handover":
        return Handover(hidden, self.mask, self.arguments, self.unit_arguments)

    def to(self, device: torch.device | str, memo: dict | None = None) -> "Handover":
        memo = {} if memo is None else memo
        return Handover(move(self.hidden, device, memo), move(self.mask, device, memo),
                        move(self.arguments, device, memo), dict(self.unit_arguments))


def handover(hidden: torch.Tensor, mask: torch.Tensor | None, ahead: Sequence["UnitCapture"]) -> Handover:
    """The hand-over of ``hidden`` to the units ``ahead`` (their captured arguments, the same set once)."""
    arguments, index, unit_arguments = [], {}, {}
    for cap in ahead:
        call = cap.calls[-1]
        key = _identity((call.args, call.kwargs))
        if key not in index:
            index[key] = len(arguments)
            arguments.append((call.args, call.kwargs))
        unit_arguments[cap.unit.name] = index[key]
    return Handover(hidden, mask, arguments, unit_arguments)


def _identity(value: Any) -> str:
    """A key equal for two argument sets made of the same tensor objects and the same other values."""
    if isinstance(value, torch.Tensor):
        return f"T{id(value)}"
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(_identity(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_identity(v)}" for k, v in sorted(value.items())) + "}"
    return repr(value)


def move(value: Any, device: torch.device | str, memo: dict | None = None) -> Any:
    """``value`` with every tensor inside it (tuples, lists, dicts) moved to ``device``; a tensor met twice is
    moved once (``memo`` maps id -> moved copy), so the hidden state a layer returns and the next layer takes
    stay one tensor on the new device too."""
    memo = {} if memo is None else memo
    if isinstance(value, torch.Tensor):
        if value.device == torch.device(device):
            return value
        if id(value) not in memo:
            memo[id(value)] = (value, value.to(device, non_blocking=True))  # keep the source alive: ids are reused
        return memo[id(value)][1]
    if isinstance(value, (tuple, list)):
        return type(value)(move(v, device, memo) for v in value)
    if isinstance(value, dict):
        return {k: move(v, device, memo) for k, v in value.items()}
    return value


def tensors_in(value: Any) -> list[torch.Tensor]:
    """Every tensor inside ``value`` (tuples, lists, dicts), each occurrence, in a fixed traversal order."""
    found: list[torch.Tensor] = []
    _collect(value, found)
    return found


def replace_tensors(value: Any, new: Sequence[torch.Tensor]) -> Any:
    """``value`` with its k-th tensor occurrence (in :func:`tensors_in`'s order) replaced by ``new[k]``."""
    supply = iter(new)

    def walk(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return next(supply)
        if isinstance(v, (tuple, list)):
            return type(v)(walk(x) for x in v)
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        return v

    return walk(value)


def _collect(value: Any, found: list[torch.Tensor]) -> None:
    if isinstance(value, torch.Tensor):
        found.append(value)
    elif isinstance(value, (tuple, list)):
        for v in value:
            _collect(v, found)
    elif isinstance(value, dict):
        for v in value.values():
            _collect(v, found)


@dataclass
class UnitCapture:
    unit: Unit
    calls: list[UnitCall] = field(default_factory=list)  # one per calibration batch
    outputs: list[torch.Tensor] = field(default_factory=list)


def unit_output(out: Any) -> torch.Tensor:
    """Layers return a tensor or a tuple whose first item is the hidden state."""
    return out[0] if isinstance(out, (tuple, list)) else out


def device_of(module: nn.Module) -> torch.device:
    """Where a module computes: its first parameter's device (CPU for a module without parameters)."""
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def call_unit(module: nn.Module, call: UnitCall, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Run one unit on a captured call (its hidden state replaced by ``hidden`` when given), on the unit's
    device: captures may be kept elsewhere (host memory) and are moved one call at a time."""
    device = device_of(module)
    if call.hidden.device != device:
        call = call.to(device)
    x = call.hidden if hidden is None else hidden.to(device, non_blocking=True)
    return unit_output(module(x, *call.args, **call.kwargs))


def _configs(config: PretrainedConfig) -> Iterator[PretrainedConfig]:
    """A config and every sub-config inside it (LLaVA's text_config and vision_config, ...)."""
    yield config
    for value in vars(config).values():
        if isinstance(value, PretrainedConfig):
            yield from _configs(value)


def disable_kv_cache(model: nn.Module) -> dict[int, tuple[PretrainedConfig, Any]]:
    """Set ``use_cache=False`` on every config the model's modules read (and its generation config), so that
    no forward pass builds a KV cache whatever the release calls its cache argument. Returns what was there
    before, for :func:`restore_kv_cache`."""
    before: dict[int, tuple[Any, Any]] = {}
    roots = [getattr(m, "config", None) for m in model.modules()] + [getattr(model, "generation_config", None)]
    for root in roots:
        if root is None:
            continue
        for cfg in _configs(root) if isinstance(root, PretrainedConfig) else [root]:
            if id(cfg) not in before and hasattr(cfg, "use_cache"):
                before[id(cfg)] = (cfg, cfg.use_cache)
                cfg.use_cache = False
    return before


def restore_kv_cache(before: dict[int, tuple[Any, Any]]) -> None:
    for cfg, value in before.values():
        cfg.use_cache = value


@contextmanager
def kv_cache_disabled(model: nn.Module):
    """``use_cache=False`` for the model while the block runs, then the user's settings again."""
    before = disable_kv_cache(model)
    try:
        yield model
    finally:
        restore_kv_cache(before)


def _kept(key: str, value: Any) -> bool:
    """Whether a captured keyword argument is replayed: never a KV cache (whatever its name) or a flag."""
    return key not in _DROPPED_KWARGS and not isinstance(value, Cache)


def _split_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    kwargs = {k: v for k, v in kwargs.items() if _kept(k, v)}
    args = tuple(None if isinstance(a, Cache) else a for a in args)
    if args:
        return args[0], tuple(args[1:]), kwargs
    first = next(iter(kwargs))  # the projector is called with its single input by keyword in some models
    hidden = kwargs.pop(first)
    return hidden, (), kwargs


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    return value


class _StopForward(Exception):
    """Raised from the last captured unit's hook when the rest of the model lives in later stages."""


def capture_units(
    model: nn.Module, units: Sequence[Unit], batches: Sequence[dict[str, torch.Tensor]], stop_after_last: bool = False,
    ahead: Sequence[Unit] = (), grad: bool = False,
) -> list[UnitCapture]:
    """Run ``model`` on every batch and record every unit's inputs and outputs, in unit order.

    With ``stop_after_last`` the forward pass ends right after the last given unit, so modules after it
    may have no weights (a pipeline stage that owns only the first units). Units ``ahead`` (later units of
    the last unit's layer list, owned by later stages) are not run: each passes its input through unchanged
    and only its arguments are recorded (their captures, after the others, hold calls and no outputs); the
    forward pass then ends after the last of them. With ``grad`` the forward pass records its graph: the
    hidden states and outputs captured are detached, the extra arguments keep theirs (VEO differentiates through
    those a stage hands over, such as Mllama's cross-attention states; its taps see the outputs' graph).
    """
    args_of = (lambda v: v) if grad else _detach
    captures = [UnitCapture(u) for u in units]
    ahead_captures = [UnitCapture(u) for u in ahead]
    stop_at = ahead_captures[-1] if ahead_captures else captures[-1]
    token_mask: list[torch.Tensor | None] = [None]
    handles = []
    for cap in captures:
        module = model.get_submodule(cap.unit.name)

        def hook(_m, args, kwargs, out, cap=cap):
            hidden, rest, kw = _split_inputs(args, kwargs)
            mask = token_mask[0] if cap.unit.segment == "language" else None
            if mask is not None and tuple(mask.shape) != tuple(hidden.shape[:2]):
                mask = None
            cap.calls.append(UnitCall(hidden.detach(), args_of(rest), args_of(kw), mask))
            cap.outputs.append(unit_output(out).detach())
            if stop_after_last and cap is stop_at:
                raise _StopForward

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    passed = [_pass_through(model.get_submodule(cap.unit.name), cap, stop_after_last and cap is stop_at, args_of)
              for cap in ahead_captures]
    try:
        with kv_cache_disabled(model), torch.set_grad_enabled(grad):
            for batch in batches:
                am = batch.get("attention_mask")
                token_mask[0] = am.bool() if am is not None else None
                try:
                    model(**batch)
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
        for module in passed:
            del module.forward  # the class's forward again
    return captures + ahead_captures


def _pass_through(module: nn.Module, cap: UnitCapture, stop: bool, args_of=None) -> nn.Module:
    """Make ``module`` record its arguments into ``cap`` and return its input unchanged (its weights may be on
    the meta device), ending the forward pass when ``stop``."""
    args_of = args_of or _detach

    def forward(*args, **kwargs):
        hidden, rest, kw = _split_inputs(args, kwargs)
        cap.calls.append(UnitCall(hidden.detach(), args_of(rest), args_of(kw)))
        if stop:
            raise _StopForward
        return hidden

    module.forward = forward
    return module


def finish_forward(model: nn.Module, layer_list: str, batch: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits for ``batch`` when the layer list named ``layer_list`` outputs ``hidden`` (computed
    elsewhere, by the stages that own those layers): every layer of the list returns ``hidden`` without running
    (whichever the model skips), so only what comes before it (embeddings, vision tower) and after it (final
    norm, head, any logit capping) computes, as the model's own forward pass does it. It records a graph when
    grad mode is on (VEO's loss), as any forward pass does."""
    layers = list(model.get_submodule(layer_list))
    for layer in layers:
        layer.forward = lambda *args, **kwargs: hidden
    try:
        with kv_cache_disabled(model):
            logits = model(**batch).logits
    finally:
        for layer in layers:
            del layer.forward  # the class's forward again
    if tuple(logits.shape[:-1]) != tuple(hidden.shape[:-1]):
        raise RuntimeError(f"finishing the forward pass after {layer_list} gave logits of shape {tuple(logits.shape)} "
                           f"for hidden states of shape {tuple(hidden.shape)}: this model's layers return something "
                           "other than the hidden state, which the evaluation through the stages does not support")
    return logits


def row_counts(calls: Sequence[UnitCall]) -> list[int]:
    """Valid token rows of each call's hidden state (masked positions, or every position without a mask)."""
    return [int(c.mask.sum()) if c.mask is not None else c.hidden[..., 0].numel() for c in calls]


def row_selection(counts: Sequence[int], max_rows: int | None) -> list[torch.Tensor | None]:
    """Per batch, which of its rows an evenly strided subset of at most ``max_rows`` of all rows keeps (None =
    all). The same rows as striding the concatenation of every batch, without ever holding that concatenation."""
    total = sum(counts)
    if max_rows is None or total <= max_rows:
        return [None] * len(counts)
    idx = torch.linspace(0, total - 1, max_rows).round().long()
    selection, start = [], 0
    for count in counts:
        selection.append(idx[(idx >= start) & (idx < start + count)] - start)
        start += count
    return selection


def row_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """``mask`` as one flag per row of ``x`` [..., C] flattened to [rows, C], when it masks x's tokens; None when
    there is none or it is of another shape (the tokens of a vision tower's input are all valid)."""
    return mask.reshape(-1) if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]) else None


def valid_rows(x: torch.Tensor, mask: torch.Tensor | None, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The [rows, C] valid rows of one batch's [..., C] tensor, only the ``keep`` ones when given."""
    rows, flags = x.reshape(-1, x.shape[-1]), row_mask(x, mask)
    if flags is not None:
        rows = rows[flags.to(x.device)]
    return rows if keep is None else rows[keep.to(rows.device)]


def sampled_rows(tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None], max_rows: int | None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Evenly strided valid rows over all batches, at most ``max_rows``, gathered one batch at a time."""
    counts = [valid_rows(t[..., :1], m).shape[0] for t, m in zip(tensors, masks)]
    picks = row_selection(counts, max_rows)
    return torch.cat([valid_rows(t, m, k).to(dtype) for t, m, k in zip(tensors, masks, picks)])


@torch.no_grad()
def capture_linear_inputs(
    unit_module: nn.Module, linears: Sequence[str], calls: Sequence[UnitCall], max_rows: int | None = None,
    outputs: list | None = None,
) -> dict[str, torch.Tensor]:
    """Inputs of each named linear inside a unit over all calls, as [rows, in_features] (masked rows only).

    ``max_rows`` keeps an evenly strided subset of rows, chosen batch by batch so that memory stays bounded
    by ``max_rows`` (a linear whose input rows are not the hidden state's tokens is strided per batch). The
    unit's output of each call is appended to ``outputs`` when a list is given.
    """
    counts = row_counts(calls)
    picks = row_selection(counts, max_rows)
    per_batch_cap = None if max_rows is None else -(-max_rows // max(len(calls), 1))
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    current: list = [None, None, 0]  # mask, rows to keep, expected row count of this batch
    seen: list[tuple[weakref.ref, list[torch.Tensor]]] = []  # this call's inputs (q/k/v share one): rows kept once
    handles = []
    for name in linears:

        def hook(_m, args, name=name):
            shared = next((kept for ref, kept in seen if ref() is args[0]), None)
            if shared is not None:  # a weak reference: an input freed during the call cannot pass for a later one
                rows[name] = shared
                return
            mask, keep, expected = current
            flat = valid_rows(args[0], mask)
            if flat.shape[0] == expected:
                flat = flat if keep is None else flat[keep.to(flat.device)]
            else:
                flat = _strided(flat, per_batch_cap)
            rows[name].append(flat.detach())
            seen.append((weakref.ref(args[0]), rows[name]))

        handles.append(unit_module.get_submodule(name).register_forward_pre_hook(hook))
    try:
        for call, keep, count in zip(calls, picks, counts):
            current[:] = [call.mask, keep, count]
            seen.clear()
            output = call_unit(unit_module, call)
            if outputs is not None:
                outputs.append(output)
    finally:
        for h in handles:
            h.remove()
    joined: dict[int, torch.Tensor] = {}  # linears that share an input share its rows
    for kept in rows.values():
        if id(kept) not in joined:
            joined[id(kept)] = _strided(torch.cat(kept), max_rows)
            kept.clear()  # each list goes as it is joined: never every linear's rows twice
    return {n: joined[id(kept)] for n, kept in rows.items()}


def _strided(x: torch.Tensor, max_rows: int | None) -> torch.Tensor:
    if max_rows is None or x.shape[0] <= max_rows:
        return x
    idx = torch.linspace(0, x.shape[0] - 1, max_rows).round().long()
    return x[idx]


def shared_input_groups(unit_module: nn.Module, linears: Sequence[str], call: UnitCall) -> list[tuple[str, ...]]:
    """Group the unit's linears by the input tensor they receive (q/k/v share one, gate/up another)."""
    # Hold the input tensors so their memory cannot be reused by a later input during the call.
    seen: list[tuple[torch.Tensor, list[str]]] = []
    handles = []
    for name in linears:

        def hook(_m, args, name=name):
            for tensor, names in seen:
                if tensor is args[0]:
                    names.append(name)
                    return
            seen.append((args[0], [name]))

        handles.append(unit_module.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            call_unit(unit_module, call)
    finally:
        for h in handles:
            h.remove()
    groups = [tuple(dict.fromkeys(names)) for _, names in seen]
    return sorted(groups, key=lambda g: linears.index(g[0]))
