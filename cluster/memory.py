"""What one stage worker holds, in bytes, at the job's calibration size, and whether it fits the worker.

A stage holds its units' weights; the captures of its units (each unit's input for every calibration sample,
plus the last unit's output: a unit's output is the next unit's input, kept once) and the extra arguments its
layer list takes per batch (an attention mask of batch x tokens x tokens); and, while it searches a block, a
workspace: a copy of the block's weights, the block's cached unit outputs for every sample, GPTQ's Hessians,
and one batch's intermediate activations. Everything is in the model's dtype, as the stage computes.

With a GPU the captures stay on the GPU when everything fits there, else in the worker's host memory (moved to
the GPU one batch at a time); the weights and the workspace must fit the GPU. Without a GPU everything is in
host memory.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GIB = 2**30
HEADROOM = 0.9  # of a device's memory a stage plans to use: the CUDA context, allocator slack, fragmentation


@dataclass(frozen=True)
class CalibrationSize:
    samples: int
    batch_size: int
    tokens: int  # text tokens per sample (calibration.max_length)
    image_tokens: int  # tokens per image in the vision tower and projector (0 for a text model)


@dataclass(frozen=True)
class StageMemory:
    weights: int
    captures: int
    workspace: int

    @property
    def total(self) -> int:
        return self.weights + self.captures + self.workspace


def _unit_width(plan, unit) -> int:
    """Width of a unit's hidden-state input: the input width of its first linear."""
    return plan.linear_shapes[unit.linear_name(unit.linears[0])][1]


def _unit_out_width(plan, unit) -> int:
    return plan.linear_shapes[unit.linear_name(unit.linears[-1])][0]


def unit_tokens(unit, size: CalibrationSize) -> int:
    """Tokens a unit sees per sample: image tokens in the vision tower and the projector, text tokens after."""
    return size.image_tokens if unit.segment in ("vision", "projector") and size.image_tokens else size.tokens


def capture_bytes(plan, stage: int, size: CalibrationSize) -> int:
    element = plan.weight_element_bytes
    units = [plan.units[i] for i in plan.stages[stage]]
    hidden = sum(size.samples * unit_tokens(u, size) * _unit_width(plan, u) * element for u in units)
    last = units[-1]
    hidden += size.samples * unit_tokens(last, size) * _unit_out_width(plan, last) * element
    batches = -(-size.samples // size.batch_size)
    masks = batches * size.batch_size * size.tokens**2 * element if any(u.segment == "language" for u in units) else 0
    return hidden + masks


def workspace_bytes(plan, stage: int, size: CalibrationSize, depth: int, gptq: bool) -> int:
    """The largest block search of the stage: ``depth`` consecutive units with the most weights."""
    element = plan.weight_element_bytes
    own = list(plan.stages[stage])
    windows = [own[k:k + depth] for k in range(max(1, len(own) - depth + 1))]
    best = 0
    for window in windows:
        units = [plan.units[i] for i in window]
        weights = 2 * sum(plan.unit_bytes[i] for i in window)  # the search's copy + the full-precision reference
        outputs = sum(size.samples * unit_tokens(u, size) * _unit_out_width(plan, u) * element for u in units)
        widest = max(out for u in units for n in u.linears for out, _ in [plan.linear_shapes[u.linear_name(n)]])
        transient = 4 * size.batch_size * max(unit_tokens(u, size) for u in units) * widest * element
        hessians = 4 * sum(inp**2 for u in units for n in u.linears
                           for _, inp in [plan.linear_shapes[u.linear_name(n)]]) if gptq else 0
        best = max(best, weights + outputs + transient + hessians)
    return best


def stage_memory(plan, stage: int, size: CalibrationSize, depth: int, gptq: bool) -> StageMemory:
    return StageMemory(plan.stage_bytes(stage), capture_bytes(plan, stage, size),
                       workspace_bytes(plan, stage, size, depth, gptq))


@dataclass(frozen=True)
class Fit:
    """Where a stage keeps its captures ("device" or "host"), or None when the stage does not fit."""

    keep_captures: str | None
    need_device: int  # bytes the stage needs on its device (GPU, or host memory without a GPU)
    need_host: int


def fit(memory: StageMemory, device_bytes: int | None, host_bytes: int | None, gpu: bool) -> Fit:
    """Whether a stage fits a worker with ``device_bytes`` of GPU memory (``gpu``) or ``host_bytes`` of host memory;
    None for either means unknown (assumed to fit)."""
    def room(limit: int | None, need: int) -> bool:
        return limit is None or need <= HEADROOM * limit

    if not gpu:
        return Fit("device" if room(host_bytes, memory.total) else None, memory.total, memory.total)
    if room(device_bytes, memory.total):
        return Fit("device", memory.total, 0)
    on_device = memory.weights + memory.workspace
    if room(device_bytes, on_device) and room(host_bytes, memory.captures):
        return Fit("host", on_device, memory.captures)
    return Fit(None, on_device, memory.captures)


def calibration_size(plan, cal) -> CalibrationSize:
    return CalibrationSize(cal.samples, cal.batch_size, cal.max_length, plan.image_tokens)


def runs_gptq(quant) -> bool:
    """Whether the job's block searches build GPTQ Hessians: method gptq, or search best (GPTQ is a candidate)."""
    return quant.method == "gptq" or (quant.method == "qvlm" and quant.search == "best")


def _stage_fits(plan, size: CalibrationSize, quant, gpu: bool, device: int | None, host: int | None) -> list[Fit]:
    depth = quant.max_block_depth if quant.method == "qvlm" else 1
    per_host = None if host is None else host // len(plan.stages)  # a local run's stages share this host
    return [fit(stage_memory(plan, s, size, depth, runs_gptq(quant)), device, per_host, gpu)
            for s in range(len(plan.stages))]


def plan_fits(plan, size: CalibrationSize, quant, gpu: bool, device: int | None, host: int | None) -> bool:
    return all(f.keep_captures is not None for f in _stage_fits(plan, size, quant, gpu, device, host))


def check_memory(plan, cal, quant, gpu: bool, device_bytes: int | None, host_bytes: int | None) -> list[Fit]:
    """Where each stage keeps its captures; InputError naming the stage that does not fit, what it needs against
    what a worker has, and how many samples or workers would fit."""
    from qvlm.errors import InputError

    size = calibration_size(plan, cal)
    fits = _stage_fits(plan, size, quant, gpu, device_bytes, host_bytes)
    bad = next((s for s, f in enumerate(fits) if f.keep_captures is None), None)
    if bad is None:
        return fits
    memory = stage_memory(plan, bad, size, quant.max_block_depth if quant.method == "qvlm" else 1, runs_gptq(quant))
    has = (f"{device_bytes / GIB:.1f} GiB of GPU memory" if gpu and device_bytes else "") + \
          (f"{' and ' if gpu and device_bytes else ''}{host_bytes / GIB:.1f} GiB of host memory" if host_bytes else "")
    samples = _most_samples(plan, size, quant, gpu, device_bytes, host_bytes)
    workers = next((w for w in range(len(plan.stages) + 1, len(plan.streams[-1]) + 1)
                    if plan_fits(plan.with_workers(w), size, quant, gpu, device_bytes, host_bytes)), None)
    fixes = ([f"calibration.samples: {samples} would fit"] if samples else []) + \
            ([f"resources.workers: {workers} would fit"] if workers else [])
    raise InputError(f"stage {bad} of {len(plan.stages)} does not fit its worker: it needs {memory.weights / GIB:.2f} GiB "
                     f"of weights, {memory.captures / GIB:.2f} GiB of captures and {memory.workspace / GIB:.2f} GiB "
                     f"of search workspace ({size.samples} samples x {size.tokens} tokens), against {has}; "
                     + ("; ".join(fixes) if fixes else "give the workers more memory (resources.gpus_per_worker, "
                                                       "resources.gpu_memory_gb)"))


def _most_samples(plan, size: CalibrationSize, quant, gpu: bool, device: int | None, host: int | None) -> int:
    """The most calibration samples (a multiple of the batch size, at least one batch) that fit, 0 if none."""
    lo, hi = 0, size.samples // size.batch_size
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if plan_fits(plan, replace(size, samples=mid * size.batch_size), quant, gpu, device, host):
            lo = mid
        else:
            hi = mid - 1
    return lo * size.batch_size
