"""What one stage worker holds, in bytes, at the job's calibration size, and whether it fits the worker.

A stage holds its units' weights; the captures of its units (each unit's input for every calibration sample,
plus the last unit's output: a unit's output is the next unit's input, kept once) and the extra arguments its
layer list takes per batch (an attention mask of batch x tokens x tokens); when blocks chain (``propagation``
``quantized`` or ``stage``), beside them the quantized output of the block before, the input of the block it
searches (one more hidden state per sample, counted with the captures: it is kept where they are); and, while it
searches a block, a
workspace: per weight of the block what its search holds (``SEARCH_BYTES_PER_WEIGHT``), the block's cached unit
outputs for every sample, GPTQ's Hessians (one unit's at a time), one batch's intermediate activations
and, for learned rounding, what autograd keeps of one batch through the block. Activations are in the
model's dtype, as the stage computes. After the searches the captures go, and the held-out evaluation holds the
integers of the stage's linears beside the full-precision weights (one linear dequantized at a time), one batch's
activations and, in the first stage, the float32 logits of both passes of one batch (cluster/evaluation.py).
Visual-encoder optimisation, when on, runs before the searches beside the captures: each stage keeps one batch's
graph through its units, and the first stage also the tower's trainable quantizers and one batch's logits with
their gradient (qvlm/veo.py), and in host memory the full-precision logits of every calibration batch
(``StageMemory.host``).

With a GPU the captures stay on the GPU when everything fits there; else, in a stage that holds the vision tower
and language layers, the tower's (and the projector's) go to the worker's host memory when that is enough; else
all of them (moved to the GPU one batch at a time). The weights and the workspace must fit the GPU. Without a GPU
everything is in host memory.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from qvlm.quant import ROW_SLICE_ELEMENTS, held_two_a_byte
from qvlm.veo_stage import ACT_ROWS

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
    workspace: int  # the largest block search
    evaluation: int = 0  # after the searches, when the captures are gone
    veo: int = 0  # before the searches, beside the captures
    host: int = 0  # kept in host memory whatever the device: VEO's full-precision logits (first stage)
    tower: int = 0  # the captures of the stage's vision and projector units when it has language units too

    @property
    def total(self) -> int:
        return self.weights + max(self.captures + max(self.workspace, self.veo), self.evaluation)


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


# Bytes a block search holds per weight element of the block, besides the stage's own weights.
# "plain" (rtn, clip, gptq): the int8 candidates it compares, two at once (the round-to-nearest start and the
# clipped or GPTQ weights), one byte a weight each; integers of 4 bits and fewer are held two a byte
# (qvlm.quant.QuantizedWeight), which this does not take off, so there it is an upper bound. Beside them a plain
# search holds one linear's weight dequantized as the forward reaches it, and the quantizer's float32 temporaries
# of one slice of rows (``QUANTIZER_SLICES``, ``_plain_search_extra_bytes``). Measured as the allocator's peak of
# live tensors (BENCHMARKS.md, "The plan's count of a plain search"). It was 8, measured as RSS before the
# quantizer worked a slice of rows at a time and before integers were held two a byte.
# "learned": also its float32 rounding offsets and their gradients, the int8 best-so-far and one linear's soft
# weight recomputed in the backward: measured on the CPU with bench/gpu.py on one decoder layer of 51M weights in
# float32 and in bfloat16, the larger of the two (BENCHMARKS.md, "Search workspace per weight"), less what the
# dense copy had held (BENCHMARKS.md, "No dense copy in the search workspace").
SEARCH_BYTES_PER_WEIGHT = {"plain": 2, "learned": 22}
# Float32 temporaries of ``ROW_SLICE_ELEMENTS`` each that the quantizer may hold at once (the clipping grid's
# grouped weight, integers, error and their intermediates): at most 5 were seen, in bfloat16.
QUANTIZER_SLICES = 8
# `best` runs its candidates one after another (qvlm.search.search_best): clipped RTN, then GPTQ with the RTN
# candidate kept (its int8 codes), then learned rounding with both kept and its int16 shifts from the GPTQ start.
# Its peak is the larger of its GPTQ and learned phases plus what each keeps, not their sum.
BEST_KEEPS_PER_WEIGHT = {"plain": 1, "learned": 4}
# GPTQ's work on one input grows with its width squared, not with its weights: the damped Hessian, its Cholesky
# factor, the inverse and the inverse's factor, alive at once (8 bytes each), beside two float32 copies of the
# weights of the linears that read that input, quantized together (the original and its act-order permutation),
# and their rows joined in the model's dtype. On an H200 a GPTQ search of LLaVA-13B's layer took 5 GiB more than
# the per-weight figure said: down_proj's 13824 inputs. One copy more is counted for what the CPU's RSS showed beyond
# the tensors torch's allocator recorded (319 MiB at a 51M-weight layer whose widest input is 5632, one such copy is
# 242 MiB: BENCHMARKS.md, "The plan's count of a plain search").
GPTQ_FLOAT64_COPIES = 5
GPTQ_FLOAT32_COPIES = 2


@dataclass(frozen=True)
class SearchCost:
    """What sizes a stage's largest block search: units per block, the kind of search ("plain", "learned" or
    "best"), GPTQ's Hessians or not."""

    depth: int
    kind: str
    hessians: bool


def search_cost(quant) -> SearchCost:
    if quant.method != "qvlm":
        return SearchCost(1, "plain", quant.method == "gptq")
    kind = quant.search if quant.search in ("learned", "best") else "plain"
    return SearchCost(quant.max_block_depth, kind, quant.search == "best")  # best has a GPTQ candidate


def workspace_bytes(plan, stage: int, size: CalibrationSize, cost: SearchCost) -> int:
    """The largest block search of the stage: ``cost.depth`` consecutive units with the most weights."""
    own = list(plan.stages[stage])
    windows = [own[k:k + cost.depth] for k in range(max(1, len(own) - cost.depth + 1))]
    return max(block_workspace_bytes(plan, [plan.units[i] for i in window], size, cost) for window in windows)


def block_workspace_bytes(plan, units, size: CalibrationSize, cost: SearchCost) -> int:
    """What the search of one block of ``units`` holds besides the stage's weights and captures."""
    element = plan.weight_element_bytes
    n_weights = sum(plan.unit_bytes[u.index] for u in units) // element
    unit_shapes = [[plan.linear_shapes[u.linear_name(n)] for n in u.linears] for u in units]  # (out, in) per linear
    shapes = [shape for per_unit in unit_shapes for shape in per_unit]
    outputs = sum(size.samples * unit_tokens(u, size) * _unit_out_width(plan, u) * element for u in units)
    transient = 4 * size.batch_size * max(unit_tokens(u, size) for u in units) * max(o for o, _ in shapes) * element
    plain = SEARCH_BYTES_PER_WEIGHT["plain"] * n_weights + _plain_search_extra_bytes(shapes, element)
    if cost.hessians:  # a unit's Hessians (float32) while GPTQ quantizes it, and one input's work
        plain += max(4 * sum(inp**2 for _, inp in per_unit) for per_unit in unit_shapes)
        plain += max(_gptq_input_bytes(per_unit, element) for per_unit in unit_shapes)
    learned = SEARCH_BYTES_PER_WEIGHT["learned"] * n_weights + sum(_autograd_bytes(plan, u, size) for u in units)
    search = {"plain": plain, "learned": learned,
              "best": max(plain + BEST_KEEPS_PER_WEIGHT["plain"] * n_weights,
                          learned + BEST_KEEPS_PER_WEIGHT["learned"] * n_weights)}[cost.kind]
    return search + outputs + transient


def _plain_search_extra_bytes(shapes, element: int) -> int:
    """What a plain search holds besides its candidates, whatever the block's size: its largest linear (``shapes``:
    (out, in) each) dequantized, and the quantizer's float32 temporaries of one slice of rows
    (qvlm.quant.row_slices: at most ``ROW_SLICE_ELEMENTS`` elements, and no more than the linear has)."""
    largest = max(out * inp for out, inp in shapes)
    return _dequantized_linear_bytes(shapes, element) + QUANTIZER_SLICES * 4 * min(largest, ROW_SLICE_ELEMENTS)


def _dequantized_linear_bytes(shapes, element: int) -> int:
    """The largest of ``shapes`` ((out, in) each) dequantized in the model's dtype: what a fake-quant linear holding
    integers makes as a forward pass reaches it (qvlm.fakequant.FakeQuantLinear), one linear at a time."""
    return max(out * inp for out, inp in shapes) * element


def _gptq_input_bytes(shapes, element: int) -> int:
    """GPTQ's largest working set on one input of a unit's linears (``shapes``: (out, in) each). The plan does not
    know which linears read one input, so every linear of an input width is counted as reading the same one: q/k/v
    and o_proj of Llama, of which only q/k/v do (an upper bound; down_proj's width decides at 13B)."""
    rows: dict[int, int] = {}
    for out, inp in shapes:
        rows[inp] = rows.get(inp, 0) + out
    return max(GPTQ_FLOAT64_COPIES * 8 * inp**2 + (GPTQ_FLOAT32_COPIES * 4 + element) * inp * n
               for inp, n in rows.items())


def _autograd_bytes(plan, unit, size: CalibrationSize) -> int:
    """What one learned-rounding step keeps for its backward through ``unit`` on one batch: every linear's input
    and output in the model's dtype (the weights train, so each input is saved) and the float32 copies that the
    norms make of the hidden state (about 16 bytes per channel)."""
    widths = sum(out + inp for n in unit.linears for out, inp in [plan.linear_shapes[unit.linear_name(n)]])
    per_token = widths * plan.weight_element_bytes + 16 * _unit_width(plan, unit)
    return size.batch_size * unit_tokens(unit, size) * per_token


def evaluation_bytes(plan, stage: int, size: CalibrationSize, quant) -> int:
    """The held-out evaluation: the integers of the stage's quantized linears with their scales, one linear's weight
    dequantized as a forward pass reaches it (qvlm.stage.Stage.prepare_evaluation), one batch's activations through
    its widest linear, and in the first stage one batch's logits three times in float32 (the full-precision pass's,
    kept for the quantized one, the quantized pass's, and the model's output before its float32 copy; the
    log-softmax is taken a few rows at a time, qvlm.evaluate.ROWS_AT_ONCE)."""
    units = [plan.units[i] for i in plan.stages[stage]]
    shapes = [plan.linear_shapes[u.linear_name(n)] for u in units for n in u.linears]
    integers = sum(_held_integer_bytes(out, inp, quant) for out, inp in shapes)
    dequantized = _dequantized_linear_bytes(shapes, plan.weight_element_bytes)
    widest = max(out for out, _ in shapes)
    transient = 4 * size.batch_size * max(unit_tokens(u, size) for u in units) * widest * plan.weight_element_bytes
    logits = 3 * 4 * size.batch_size * size.tokens * plan.vocab_size if stage == 0 else 0
    return integers + dequantized + transient + logits


def _held_integer_bytes(out_features: int, in_features: int, quant) -> int:
    """One quantized linear as qvlm.quant.QuantizedWeight holds it: its integers (two a byte where
    ``held_two_a_byte``, else one; mixed precision may raise any linear above 4 bits) and a scale, and a zero point
    when asymmetric, per group (counted at 4 bytes each, the widest they are held in)."""
    scheme = quant.weights
    packed = held_two_a_byte(scheme.bits, in_features) and quant.mixed_precision.metric == "none"
    groups = out_features * (1 if scheme.group_size == -1 else -(-in_features // scheme.group_size))
    return out_features * in_features // (2 if packed else 1) + groups * 4 * (1 if scheme.symmetric else 2)


# One batch's logits in VEO's first stage, per logit: the logits, their float32 copies in the loss (the error
# against the reference, the cross-entropy's softmax) and their gradient; measured with bench/veo_memory.py as about
# 10 bytes in bfloat16 and 15-21 in float32 models (BENCHMARKS.md, "VEO's memory against what the plan counts").
VEO_BYTES_PER_LOGIT = 20


def veo_bytes(plan, stage: int, size: CalibrationSize, quant) -> int:
    """Visual-encoder optimisation's step on one batch: the graph through the stage's units (what learned rounding
    keeps, an upper bound: here the weights are frozen), each language unit's strided rows with their gradients,
    and in the first stage the tower's quantizers (learned rounding's state per weight), one batch's logits
    (``VEO_BYTES_PER_LOGIT``), every language unit's rows with their gradients (the loss is taken there) and,
    for static activation ranges, the rows of the tower's inputs they are calibrated on. 0 when VEO is off."""
    if not quant.veo.enabled:
        return 0
    units = [plan.units[i] for i in plan.stages[stage]]
    graph = sum(_autograd_bytes(plan, u, size) for u in units)
    rows = sum(3 * 4 * quant.veo.max_rows * _unit_out_width(plan, u) for u in units if u.segment == "language")
    if stage:
        return graph + rows
    vision = sum(plan.unit_bytes[u.index] for u in plan.units if u.segment == "vision")
    quantizers = SEARCH_BYTES_PER_WEIGHT["learned"] * vision // plan.weight_element_bytes
    logits = VEO_BYTES_PER_LOGIT * size.batch_size * size.tokens * plan.vocab_size
    head_rows = sum(2 * 4 * quant.veo.max_rows * _unit_out_width(plan, u) for u in plan.units if u.segment == "language")
    inputs = 0
    if quant.activations.enabled and quant.activations.static:  # the tower's input rows its ranges come from
        widths = [plan.linear_shapes[u.linear_name(n)][1] for u in plan.units if u.segment == "vision" for n in u.linears]
        inputs = ACT_ROWS * plan.weight_element_bytes * sum(widths)
    return graph + rows + quantizers + logits + head_rows + inputs


def veo_host_bytes(plan, stage: int, size: CalibrationSize, quant) -> int:
    """The first stage keeps every calibration batch's full-precision logits in host memory during VEO (the
    loss compares each step's logits with them), in the model's dtype."""
    if not quant.veo.enabled or stage:
        return 0
    return size.samples * size.tokens * plan.vocab_size * plan.weight_element_bytes


def carried_bytes(plan, stage: int, size: CalibrationSize, quant) -> int:
    """The quantized output a chained block search takes as its input (from the stage's block before, or from the
    stage before): one hidden state per calibration sample at the widest input of the stage's units. 0 with
    ``propagation: fp``, where every block starts from its captured inputs."""
    if quant.propagation == "fp":
        return 0
    units = [plan.units[i] for i in plan.stages[stage]]
    return max(size.samples * unit_tokens(u, size) * _unit_width(plan, u) for u in units) * plan.weight_element_bytes


def tower_capture_bytes(plan, stage: int, size: CalibrationSize) -> int:
    """The inputs captured for the stage's vision and projector units, when the stage also holds language units
    (what a ``split`` stage keeps in host memory; its last unit, whose output is kept too, is a language one)."""
    units = [plan.units[i] for i in plan.stages[stage]]
    tower = [u for u in units if u.segment != "language"]
    if len(tower) in (0, len(units)):
        return 0
    return sum(size.samples * unit_tokens(u, size) * _unit_width(plan, u) for u in tower) * plan.weight_element_bytes


def stage_memory(plan, stage: int, size: CalibrationSize, quant) -> StageMemory:
    captures = capture_bytes(plan, stage, size) + carried_bytes(plan, stage, size, quant)
    return StageMemory(plan.stage_bytes(stage), captures, workspace_bytes(plan, stage, size, search_cost(quant)),
                       evaluation_bytes(plan, stage, size, quant), veo_bytes(plan, stage, size, quant),
                       veo_host_bytes(plan, stage, size, quant), tower_capture_bytes(plan, stage, size))


@dataclass(frozen=True)
class Fit:
    """Where a stage keeps its captures ("device", "host", or "split": the vision tower's and the projector's in host
    memory and the language units' on the device), or None when the stage does not fit."""

    keep_captures: str | None
    need_device: int  # bytes the stage needs on its device (GPU, or host memory without a GPU)
    need_host: int


def fit(memory: StageMemory, device_bytes: int | None, host_bytes: int | None, gpu: bool) -> Fit:
    """Whether a stage fits a worker with ``device_bytes`` of GPU memory (``gpu``) or ``host_bytes`` of host memory;
    None for either means unknown (assumed to fit)."""
    def room(limit: int | None, need: int) -> bool:
        return limit is None or need <= HEADROOM * limit

    if not gpu:
        need = memory.total + memory.host
        return Fit("device" if room(host_bytes, need) else None, need, need)
    if room(device_bytes, memory.total) and room(host_bytes, memory.host):
        return Fit("device", memory.total, memory.host)
    split = replace(memory, captures=memory.captures - memory.tower)
    if memory.tower and room(device_bytes, split.total) and room(host_bytes, memory.tower + memory.host):
        return Fit("split", split.total, memory.tower + memory.host)
    on_device = memory.weights + max(memory.workspace, memory.veo, memory.evaluation)
    if room(device_bytes, on_device) and room(host_bytes, memory.captures + memory.host):
        return Fit("host", on_device, memory.captures + memory.host)
    return Fit(None, on_device, memory.captures + memory.host)


def calibration_size(plan, cal) -> CalibrationSize:
    return CalibrationSize(cal.samples, cal.batch_size, cal.max_length, plan.image_tokens)


def _stage_fits(plan, size: CalibrationSize, quant, gpu: bool, device: int | None, host: int | None) -> list[Fit]:
    per_host = None if host is None else host // len(plan.stages)  # a local run's stages share this host
    return [fit(stage_memory(plan, s, size, quant), device, per_host, gpu) for s in range(len(plan.stages))]


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
    memory = stage_memory(plan, bad, size, quant)
    has = (f"{device_bytes / GIB:.1f} GiB of GPU memory" if gpu and device_bytes else "") + \
          (f"{' and ' if gpu and device_bytes else ''}{host_bytes / GIB:.1f} GiB of host memory" if host_bytes else "")
    samples = _most_samples(plan, size, quant, gpu, device_bytes, host_bytes)
    workers = next((w for w in range(len(plan.stages) + 1, len(plan.streams[-1]) + 1)
                    if plan_fits(plan.with_workers(w), size, quant, gpu, device_bytes, host_bytes)), None)
    depth = _deepest_block_that_fits(plan, size, quant, gpu, device_bytes, host_bytes)
    batch = _largest_batch_that_fits(plan, size, quant, gpu, device_bytes, host_bytes)
    fixes = ([f"calibration.samples: {samples} would fit"] if samples else []) + \
            ([f"resources.workers: {workers} would fit"] if workers else []) + \
            ([f"quantization.qvlm.max_block_depth: {depth} would fit"] if depth else []) + \
            ([f"calibration.batch_size: {batch} would fit"] if batch else [])
    if not fixes:
        both = _shallower_block_and_smaller_batch(plan, size, quant, gpu, device_bytes, host_bytes)
        fixes = [f"quantization.qvlm.max_block_depth: {both[0]} with calibration.batch_size: {both[1]} would fit"
                 ] if both else []
    raise InputError(f"stage {bad} of {len(plan.stages)} does not fit its worker: it needs {memory.weights / GIB:.2f} GiB "
                     f"of weights, {memory.captures / GIB:.2f} GiB of captures and {memory.workspace / GIB:.2f} GiB "
                     f"of search workspace ({size.samples} samples x {size.tokens} tokens), "
                     + (f"{memory.veo / GIB:.2f} GiB for VEO before the searches (and {memory.host / GIB:.2f} GiB "
                        "of its reference logits in host memory), " if memory.veo else "")
                     + f"then {memory.evaluation / GIB:.2f} GiB for the evaluation, against {has}; "
                     + ("; ".join(fixes) if fixes else "give the workers more memory (resources.gpus_per_worker, "
                                                       "resources.gpu_memory_gb)"))


def _deepest_block_that_fits(plan, size: CalibrationSize, quant, gpu: bool, device: int | None, host: int | None) -> int:
    """The largest qvlm block depth below the job's that fits (blocks of fewer units need less workspace), 0 if none."""
    if quant.method != "qvlm":
        return 0
    return next((d for d in range(quant.max_block_depth - 1, 0, -1)
                 if plan_fits(plan, size, replace(quant, max_block_depth=d), gpu, device, host)), 0)


def _largest_batch_that_fits(plan, size: CalibrationSize, quant, gpu: bool, device: int | None,
                             host: int | None) -> int:
    """The largest calibration batch below the job's that fits (a search holds one batch's activations and, for
    learned rounding, one batch's graph), 0 if none."""
    return next((b for b in range(size.batch_size - 1, 0, -1)
                 if plan_fits(plan, replace(size, batch_size=b), quant, gpu, device, host)), 0)


def _shallower_block_and_smaller_batch(plan, size: CalibrationSize, quant, gpu: bool, device: int | None,
                                       host: int | None) -> tuple[int, int] | None:
    """The deepest block below the job's with the largest batch that fits beside it, for when neither alone fits
    (learned rounding's autograd grows with both); None if none."""
    if quant.method != "qvlm":
        return None
    for depth in range(quant.max_block_depth - 1, 0, -1):
        batch = _largest_batch_that_fits(plan, size, replace(quant, max_block_depth=depth), gpu, device, host)
        if batch:
            return depth, batch
    return None


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
