"""The job plan, computed from the model's config and safetensors headers only (no weights are loaded).

Stage layout rule: the first stage owns every stream but the last (the vision tower and projector of a
LLaVA, which are small next to its language model) plus the start of the last stream, because only the
first stage can run the model's glue between streams; the remaining stages split the rest of the last
stream. Stage boundaries are chosen to balance parameter bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from qvlm.method import Layout, linear_shapes, select_units
from qvlm.loading import ModelError, build_skeleton, checkpoint_key_map, glue_names, load_config, owned_names
from qvlm.structure import SEGMENTS, Unit, check_supported, closest_module_names, find_units, segments_of
from workers.model_shard import fetch_small_files
from workers.safetensors_reader import CheckpointIndex

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class JobPlan:
    model_class: str
    units: tuple[Unit, ...]
    streams: tuple[tuple[int, ...], ...]
    stages: tuple[tuple[int, ...], ...]  # unit indices per stage
    unit_bytes: tuple[int, ...]
    glue_bytes: int
    total_bytes: int  # all tensors of the checkpoint
    linear_shapes: dict = field(default_factory=dict)
    weight_element_bytes: int = 2  # bytes per element of the source linears' weights
    rest_chunks: tuple[tuple[str, ...], ...] = ()  # checkpoint keys of the unquantized tensors, per output file
    pixel_bytes: int = 0  # one image's pixel values as the model takes them (fp32), 0 for a text model
    image_tokens: int = 0  # tokens per image in the vision tower, 0 for a text model
    tokens: int = 512  # text tokens per calibration sample the stages were balanced for
    vocab_size: int = 0  # the language model's vocabulary (the evaluation's logits), 0 when it has none

    def stage_bytes(self, s: int) -> int:
        return sum(self.unit_bytes[i] for i in self.stages[s]) + (self.glue_bytes if s == 0 else 0)

    def with_workers(self, workers: int) -> "JobPlan":
        """The same model cut into ``workers`` stages (to say how many would fit)."""
        costs = unit_costs(self.units, self.unit_bytes, self.tokens, self.image_tokens)
        return replace(self, stages=tuple(split_stages(costs, self.streams, workers)))

    @property
    def layout(self) -> Layout:
        return Layout(self.units, self.streams, self.stages)

    def n_files(self, n_blocks: int) -> int:
        """Files of the checkpoint: one per block of quantized linears, then the unquantized tensors'."""
        return n_blocks + len(self.rest_chunks)


def _param_bytes(model, names) -> int:
    sd = model.state_dict()
    return sum(sd[n].numel() * sd[n].element_size() for n in names)


def split_stages(costs: Sequence[float], streams: Sequence[tuple[int, ...]], workers: int) -> list[tuple[int, ...]]:
    """Contiguous stages, the first holding all streams but the last, balanced by ``costs`` (per unit)."""
    last = list(streams[-1])
    head = [i for s in streams[:-1] for i in s]
    n_stages = max(1, min(workers, len(last)))
    target = sum(costs) / n_stages
    stages, current, acc = [], list(head), sum(costs[i] for i in head)
    for pos, i in enumerate(last):
        remaining_units = len(last) - pos
        remaining_stages = n_stages - len(stages) - 1
        if current and remaining_stages > 0 and (acc + costs[i] / 2 > target or remaining_units == remaining_stages) and any(u in last for u in current):
            stages.append(tuple(current))
            current, acc = [], 0
        current.append(i)
        acc += costs[i]
    stages.append(tuple(current))
    return stages


def unit_costs(units: Sequence[Unit], unit_bytes: Sequence[int], tokens: int, image_tokens: int) -> list[float]:
    """What a unit costs a stage to capture and search: its weights times the tokens it sees per sample (image
    tokens in the vision tower and the projector, text tokens after)."""
    return [b * (image_tokens if u.segment in ("vision", "projector") and image_tokens else tokens)
            for u, b in zip(units, unit_bytes)]


def image_tokens_of(config) -> int:
    """Tokens per image in the vision tower (patches, plus a class token), 0 for a model without one."""
    vision = getattr(config, "vision_config", None)
    size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    if not isinstance(size, int) or not isinstance(patch, int) or patch <= 0:
        return 0
    return (size // patch) ** 2 + 1


def check_weights(model, index: CheckpointIndex, source: str) -> None:
    """Every parameter of the skeleton has a checkpoint tensor of its shape (the config fits the weights)."""
    try:
        keymap = checkpoint_key_map(model, index.names)
    except NotImplementedError as exc:
        raise ModelError(f"{source}: unsupported checkpoint layout: {exc}") from None
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    missing = [n for n, _ in model.named_parameters() if n not in keymap and n not in tied]
    if missing:
        raise ModelError(f"{source}: the safetensors files hold no tensor for {len(missing)} parameters of the "
                         f"{type(model).__name__} that config.json describes (e.g. {missing[0]}); use the config.json "
                         "saved with these weights")
    expected = model.state_dict()
    for name, key in keymap.items():
        loc = index.location(key)
        if tuple(loc.shape) != tuple(expected[name].shape):
            raise ModelError(f"{source}/{loc.file}: tensor {key!r} has shape {list(loc.shape)} but config.json "
                             f"implies {list(expected[name].shape)}; use the config.json saved with these weights")


def check_ignore(model, quant) -> None:
    """Every ``quantization.ignore`` entry names a module of the model (a typo would ignore nothing, silently)."""
    names = [n for n, _ in model.named_modules() if n]
    for pattern in quant.unmatched_ignore(names):
        if pattern.startswith("re:"):
            hint = "fix the pattern (it is matched from the start of full module names, e.g. re:model\\.vision_tower\\..*)"
        else:
            close = closest_module_names(model, pattern)
            hint = f"closest module names: {', '.join(close)}" if close else "no module name is close"
        raise ModelError(f"quantization.ignore: {pattern!r} matches no module of this {type(model).__name__} ({hint}); "
                         "fix the entry or remove it")


def units_to_quantize(model, quant, source: str) -> list[Unit]:
    """``select_units``, with errors that name the config (no units at all) or the job fields (none selected)."""
    try:
        check_supported(model)
        found = find_units(model)
    except ValueError as exc:
        raise ModelError(f"{source}/config.json: unsupported architecture: {exc}") from None
    check_ignore(model, quant)
    try:
        return select_units(model, quant)
    except ValueError:
        present = [s for s in SEGMENTS if any(u.segment == s for u in found)]
        raise ModelError(f"quantization.targets {list(quant.targets)} and quantization.ignore {list(quant.ignore)} "
                         f"leave nothing to quantize in this {type(model).__name__} (its units are {present}); "
                         "target one of those and ignore fewer linears") from None


def make_plan(config_dir: str, index: CheckpointIndex, quant, workers: int, tokens: int = 512) -> JobPlan:
    """The plan of a model for a job of ``workers`` stages whose calibration samples have ``tokens`` tokens."""
    source = index.storage.uri.rstrip("/")
    model = build_skeleton(load_config(config_dir, f"{source}/config.json"))
    check_weights(model, index, source)
    units = units_to_quantize(model, quant, source)
    streams = [tuple(u.index for u in run) for run in segments_of(units)]
    unit_bytes = [_param_bytes(model, owned_names(model, [u.name])) for u in units]
    glue = _param_bytes(model, glue_names(model, [u.name for u in units]))
    image_tokens = image_tokens_of(model.config)
    stages = split_stages(unit_costs(units, unit_bytes, tokens, image_tokens), streams, workers)
    first = units[0]
    element = model.get_submodule(first.linear_name(first.linears[0])).weight.element_size()
    shapes = linear_shapes(model, units)
    return JobPlan(type(model).__name__, tuple(units), tuple(streams), tuple(stages), tuple(unit_bytes), glue,
                   index.total_bytes(), shapes, element, rest_chunks(model, index, shapes), _pixel_bytes(model.config),
                   image_tokens, tokens, _vocab_size(model.config))


def _vocab_size(config) -> int:
    return int(getattr(config.get_text_config(), "vocab_size", 0) or 0)


MAX_FILE_BYTES = 5 * 10**9  # the checkpoint's unquantized tensors go into files of at most this size


def rest_chunks(model, index: CheckpointIndex, quantized: dict, max_bytes: int = MAX_FILE_BYTES) -> tuple[tuple[str, ...], ...]:
    """The checkpoint keys of every tensor the blocks do not write (all but the quantized linears' weights), in
    key order, grouped into files of at most ``max_bytes``."""
    keymap = checkpoint_key_map(model, index.names)
    done = {keymap[f"{name}.weight"] for name in quantized}
    chunks, current, size = [], [], 0
    for key in (k for k in index.names if k not in done):
        nbytes = index.total_bytes([key])
        if current and size + nbytes > max_bytes:
            chunks.append(tuple(current))
            current, size = [], 0
        current.append(key)
        size += nbytes
    return tuple(chunks) + ((tuple(current),) if current else ())


def _pixel_bytes(config) -> int:
    """fp32 pixel values of one image at the vision tower's resolution (3 channels), 0 for a text model."""
    vision = getattr(config, "vision_config", None) or config
    size = getattr(vision, "image_size", 0) or 0
    height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
    return 3 * height * width * 4


def inspect_model(job) -> tuple[JobPlan, Path]:
    """The plan of ``job``'s model from its config and safetensors headers (and the local folder of its small
    files: config, tokenizer, processor)."""
    model_store = job.where.model()
    config_dir = fetch_small_files(model_store)
    index = CheckpointIndex.open(model_store)
    return make_plan(str(config_dir), index, job.quant, job.resources.workers, job.calibration.max_length), config_dir


_PLACEMENT_WORDS = {"pack": "PACK (stage workers share as few nodes as possible)",
                    "spread": "SPREAD (each stage worker on a different node where the cluster has enough)"}


def quantized_bytes(plan: JobPlan, quant) -> int:
    """Checkpoint bytes at the base scheme: packed linears plus every other tensor unchanged."""
    linear_fp = sum(out * inp for out, inp in plan.linear_shapes.values()) * plan.weight_element_bytes
    packed = sum(quant.weights.storage_bits(out, inp) for out, inp in plan.linear_shapes.values()) // 8
    return plan.total_bytes - linear_fp + packed


def image_units(plan: JobPlan) -> list[Unit]:
    """The units that only images reach: the vision tower's layers and the projector."""
    return [u for u in plan.units if u.segment in ("vision", "projector")]


# ---- memory of the calibration data ----------------------------------------------------------------------


def host_memory() -> int:
    """This host's physical memory, in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def record_bytes(plan: JobPlan, tokens: int) -> int:
    """Memory one calibration record takes on the host that builds its batch: token ids and attention mask
    (int64) and the image's pixel values, counted twice (the record and its batch are held together)."""
    return 2 * (tokens * 16 + plan.pixel_bytes)


def memory_lines(plan: JobPlan, quant, samples: int, tokens: int, batch_size: int) -> list[str]:
    """Per stage: weights + captures + search workspace, in the model's dtype (cluster/memory.py)."""
    from cluster.memory import CalibrationSize, stage_memory

    size = CalibrationSize(samples, batch_size, tokens, plan.image_tokens)
    lines = [f"memory per stage worker ({samples} samples x {tokens} tokens"
             + (f", {plan.image_tokens} per image" if plan.image_tokens else "")
             + f", {plan.weight_element_bytes}-byte activations as the model's dtype):"]
    for s in range(len(plan.stages)):
        m = stage_memory(plan, s, size, quant)
        lines.append(f"  stage {s}: {_size(m.weights)} weights + {_size(m.captures)} captures + "
                     f"{_size(m.workspace)} search workspace = {_size(m.weights + m.captures + m.workspace)}; "
                     + (f"VEO before it {_size(m.veo)}" + (f" (+ {_size(m.host)} in host memory)" if m.host else "") + "; "
                        if m.veo else "")
                     + f"then {_size(m.evaluation)} for the evaluation")
    return lines


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def describe(plan: JobPlan, quant, placement: str = "pack", samples: int = 0, tokens: int = 0,
             batch_size: int = 8) -> list[str]:
    """Human-readable plan lines for ``qvlm plan``; ``placement`` is ``resources.placement``."""
    mib = 1 / 2**20
    lines = [f"model: {plan.model_class}, {len(plan.units)} units in {len(plan.streams)} streams, "
             f"{plan.total_bytes * mib:.1f} MiB of tensors"]
    for s, stage in enumerate(plan.stages):
        names = [plan.units[i].name for i in stage]
        lines.append(f"stage {s}: units {stage[0]}..{stage[-1]} ({names[0]} .. {names[-1]}), "
                     f"{plan.stage_bytes(s) * mib:.1f} MiB of weights" + (" + glue" if s == 0 else ""))
    largest = max(plan.stage_bytes(s) for s in range(len(plan.stages)))
    lines.append(f"peak weights per stage worker: {largest * mib:.1f} MiB "
                 f"({largest / max(plan.total_bytes, 1):.0%} of the model)")
    if samples and tokens:
        lines += memory_lines(plan, quant, samples, tokens, batch_size)
    lines.append(f"bytes to read: {plan.total_bytes * mib:.1f} MiB, each tensor once, by the stage that holds it; "
                 f"to write: about {quantized_bytes(plan, quant) * mib:.1f} MiB of checkpoint (each block's file by "
                 "its stage, the rest by the export)")
    lines.append(f"placement: {len(plan.stages)} stage workers in one placement group, strategy "
                 f"{_PLACEMENT_WORDS.get(placement, placement.upper())}")
    lines.append(f"method {quant.method}" + (f"/{quant.search}, blocks of depth <= {quant.max_block_depth} "
                 "chosen after capture (entropy-guided)" if quant.method == "qvlm" else ", one block per unit"))
    lines.append(serving_line(plan, quant))
    return lines


def serving_line(plan: JobPlan, quant) -> str:
    """Whether the checkpoint this job writes can be served, at its base scheme (mixed precision may raise some
    layers' bits). No qvlm checkpoint has yet been seen to serve in vLLM (no GPU has run it), so it says so."""
    from qvlm.export import servability

    verdict = servability({name: quant.weights for name in plan.linear_shapes}, quant.activations)
    if not verdict.servable:
        return f"serving: {verdict.note}"
    return (f"serving: {verdict.note} as the formats go; warning: no qvlm checkpoint has been seen to load in vLLM "
            "yet (tested with transformers' from_pretrained only)")
