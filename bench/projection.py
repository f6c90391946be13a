"""Projection of LLaVA-13B W4A16 at 128 x 2048 on 8 x H100 80GB and on ray_config.yaml's 8 x A10G, for the
stage-local data path (issue 16): does each stage fit its GPU, and how long does each method take.

    .venv/bin/python bench/gpu.py --device cpu ... --json bench/gpu-cpu.json   # the CPU figures it is calibrated by
    .venv/bin/python bench/projection.py [--measured bench/gpu-cpu.json] [--samples 128 --tokens 2048 --batch 8]
        [--depth 3] [--iters 100]   # the job's own defaults
        [--gptq-columns OUT/gptq-columns.json]   # GPTQ's launch time as bench/gptq_columns.py measured it on a GPU

Nothing here runs on a GPU and no figure it prints is a GPU measurement. What it uses:

1. The plan, from the product's own code: a header-only LLaVA-1.5-13B checkpoint (config.json and
   safetensors headers; the data regions are sparse files, no weights are written) goes through
   ``cluster.plan.make_plan`` for 8 workers (stages balanced by compute), and each stage's weights,
   captures and search workspace come from ``cluster.memory.stage_memory``; ``cluster.memory.check_memory``
   says whether the job is accepted on each GPU and where each stage keeps its captures. Next to it, an
   estimate of what that model leaves out (learned rounding's autograd activations, GPTQ's float64
   Cholesky work, the statistics' float64 copy of a weight).
2. The cost of each method, from qvlm/search.py and qvlm/learned.py as they stand: a number of forwards of
   the unit over the whole calibration set (``evaluations`` plus the forwards that are not counted), learned
   rounding's steps (forward + backward on one batch), and work that scales with the weights, not the tokens
   (copies, RTN and clipping grids, GPTQ's column loop, the soft weights of each step). The forward counts
   are checked against ``BlockResult.evaluations`` of bench/gpu.py's run. The weight-proportional work gets
   two estimates: calibrated on that run (what is left of each method's seconds after its forwards, moved to
   the GPU by the ratio of memory bandwidths), and analytic (the bytes per weight read off the code at the
   GPU's bandwidth). GPTQ's column loop is bound by kernel launches in both: its looped columns x the operators
   a column dispatches (bench/gptq_columns.py counts them) x the seconds of a launch, calibrated on the run's GPTQ
   when it ran on a GPU. The forward the counts multiply is the run's plain forward (or, for runs that did not
   time one, rtn's search, which bounds it). Times are printed as the range between the two, smaller first:
   calibrated on a CPU run the calibrated one is the larger, on a GPU run it can be the smaller.
3. The job: stage start, ranged reads, the pipelined capture, statistics, the searches (``propagation:
   fp``: stages in parallel; ``quantized``, the default: one chain down the pipeline, so every block of
   the model one after another) and the export.

Every assumption is a field of ``Assume`` or ``GPUS`` and is printed; everything modelled is labelled so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from _common import table
from qvlm.search import SearchConfig

GB, GIB = 1e9, 2**30
METHODS = ("rtn", "gptq", "clip", "learned", "best")
PROPAGATIONS = ("fp", "stage", "quantized")
LAYER_13B = (5120, 13824)  # hidden and MLP width of a LLaVA-13B (Llama-2-13B) decoder layer


def layer_weights(hidden: int, intermediate: int) -> int:
    """Linear weights of a Llama decoder layer (q, k, v, o; gate, up, down) without grouped-query attention."""
    return 4 * hidden**2 + 3 * hidden * intermediate


LAYER_13B_WEIGHTS = layer_weights(*LAYER_13B)


@dataclass(frozen=True)
class Gpu:
    name: str
    fp16: float  # dense tensor-core peak, FLOP/s
    fp32: float  # FP32 (no TF32: torch's default for matmul), FLOP/s
    hbm: float  # memory bandwidth, bytes/s
    memory: int  # bytes the device reports (torch.cuda.mem_get_info total, as nvidia-smi shows it)
    pcie: float  # host <-> device copies from pageable memory (captures kept in host memory), bytes/s
    per_node: int  # GPUs per node
    host: int  # host memory per node, bytes
    storage: float  # model and output storage (S3) per node, bytes/s, shared by the node's stages
    network: float  # object transfers between nodes, bytes/s


GPUS = {
    "H100": Gpu("8 x H100 80GB SXM (one node, p5.48xlarge-like)", 989e12, 67e12, 3.35e12, 81559 * 2**20, 25e9, 8,
                2048 * GIB, 5e9, 25e9),
    "A10G": Gpu("8 x A10G 24 GB (ray_config.yaml: 2 x g5.12xlarge, 4 GPUs each)", 70e12, 31.2e12, 600e9, 23028 * 2**20,
                10e9, 4, 192 * GIB, 1.5e9, 4e9),
}


@dataclass(frozen=True)
class Assume:
    efficiency: float = 0.4  # sustained share of the fp16 peak in a unit's forward (matmuls, attention)
    bw_efficiency: float = 0.7  # sustained share of memory bandwidth for weight-proportional work
    fwd_bwd: float = 3.0  # forward + backward = this many forwards (the old CPU measurement: 2.97)
    launch_s: float = 1e-5  # one small operator launched from PyTorch on a GPU, when the run measured none
    stats_bytes_per_weight: float = 80.0  # kurtosis in float64 + sensitivity's float32 fake quant: passes over a weight
    stage_start_s: float = 30.0  # a stage actor: process, imports, CUDA context
    iters: int = SearchConfig.iters  # learned rounding steps: the job's default (bench/gpu.py measures 200)
    checkpoints: int = 8  # learn_rounding's evaluations on the whole calibration set during training
    causal_attention: float = 1.0  # share of the full T x T attention square computed (1.0: no causal saving)
    # The analytic estimate of weight-proportional work: bytes read + written per linear weight if every such kernel
    # ran at the GPU's memory bandwidth, read off the code (float32 passes of 8 bytes read + write): a search's copies
    # and RTN ~48; clip's 21-point shrink grid ~72 per point (~1560); GPTQ's column loop ~120 (and its launch floor);
    # best = RTN + clip + GPTQ with the shrink grid (~3300); learned's soft weights forward + backward ~16 passes
    # per step (128).
    analytic_bytes_rtn: float = 48.0
    analytic_bytes_clip: float = 1560.0
    analytic_bytes_gptq: float = 170.0
    analytic_bytes_best: float = 3300.0
    analytic_bytes_step: float = 128.0
    # A search's fake-quant linears dequantize their integers at every batch of a forward (since 2026-12-05, instead
    # of holding a dense copy): int8 read, the weight written, then scaled in place (read + written), in float16.
    dequant_bytes: float = 7.0


# ---- 1. the plan: a header-only LLaVA-1.5-13B through the product's make_plan ------------------------------------

def llava13b_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, vocab_size=32064, max_position_embeddings=4096,
                       tie_word_embeddings=False, rms_norm_eps=1e-5)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, image_seq_length=576,
                       vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
                       architectures=["LlavaForConditionalGeneration"], dtype="float16")


def write_header_only(folder: Path, max_file: int = 5 * 10**9) -> int:
    """config.json and float16 safetensors files whose headers are a real LLaVA-1.5-13B's and whose data
    regions are holes (sparse files: nothing is written); returns the checkpoint's tensor bytes."""
    from qvlm.loading import build_skeleton

    config = llava13b_config()
    config.save_pretrained(folder)
    entries = [(n, list(t.shape), t.numel() * 2) for n, t in build_skeleton(config).state_dict().items()
               if t.is_floating_point()]
    files, current, size = [], [], 0
    for e in entries:
        if current and size + e[2] > max_file:
            files.append(current)
            current, size = [], 0
        current.append(e)
        size += e[2]
    files.append(current)
    weight_map = {}
    for k, chunk in enumerate(files, start=1):
        name = f"model-{k:05d}-of-{len(files):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for n, shape, nbytes in chunk:
            header[n] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + nbytes]}
            weight_map[n] = name
            offset += nbytes
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / name, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)
    total = sum(e[2] for e in entries)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))
    return total


@dataclass(frozen=True)
class Job13B:
    plan: object
    index: object
    samples: int
    tokens: int
    batch: int
    depth: int  # quantization.qvlm.max_block_depth of clip, learned and best (rtn and gptq search single units)


def plan_13b(folder: Path, workers: int, samples: int, tokens: int, batch: int, depth: int) -> Job13B:
    from cluster.plan import make_plan
    from qvlm.config import QuantConfig
    from workers.safetensors_reader import CheckpointIndex
    from workers.storage import LocalStorage

    write_header_only(folder)
    index = CheckpointIndex.open(LocalStorage(folder))
    return Job13B(make_plan(str(folder), index, QuantConfig(), workers, tokens), index, samples, tokens, batch,
                  depth)


def quant_for(method: str, depth: int):
    from qvlm.config import QuantConfig

    if method in ("rtn", "gptq"):
        return QuantConfig(method=method)
    return QuantConfig(method="qvlm", search=method, max_block_depth=depth)


# ---- 2. per unit: forwards, learned steps and weight-proportional work ------------------------------------------

def offers(iters: int, checkpoints: int = 8) -> int:
    """Whole-calibration-set evaluations of learn_rounding: the start, then every ``iters // checkpoints`` steps
    and the last step."""
    every = max(iters // max(checkpoints, 1), 1)
    return 1 + sum(1 for step in range(iters) if (step + 1) % every == 0 or step + 1 == iters)


def evaluations(method: str, iters: int, improved: bool = True, earlier: bool = False) -> int:
    """``BlockResult.evaluations`` (each one forward of the block over every batch), read off qvlm/search.py:
    every search starts with one (``_start``); clip refreshes once more in ``_coordinate_search``; gptq's pass
    that feeds each unit the one before it quantized is its evaluation; best measures its clipped-RTN candidate,
    GPTQ's feeding pass and learn_rounding's offers, the start's among them (a 13B layer's weights halfway
    between two integers keep learned rounding from reproducing its start exactly; one fewer where it does);
    learned rounding from RTN reproduces its start, so learned counts the offers less the start's, and one more
    when learning did not help. ``earlier``: the code before 2026-12-05, which measured learned rounding's
    start and its result once more each (a run that does not record ``uncounted_forwards``)."""
    n = offers(iters)
    if earlier:
        return {"rtn": 1, "clip": 2, "gptq": 2, "learned": 2 + n + (0 if improved else 1), "best": 4 + n}[method]
    return {"rtn": 1, "clip": 2, "gptq": 2, "learned": n + (0 if improved else 1), "best": 3 + n}[method]


# The forwards outside ``evaluations`` before 2026-12-05: clip's and best's input-power pass ran each unit twice
# (once hooked, once to feed the next), and gptq's feeding pass was not counted.
EARLIER_UNCOUNTED = {"rtn": 0, "clip": 2, "gptq": 2, "learned": 0, "best": 4}


# GPTQ's column loop on a GPU is bound by launching its small kernels, not by bytes: its time is the columns it
# loops over x the operators each column dispatches x the seconds of one launch. The operators per column are the
# code's own, counted by bench/gptq_columns.py on LLaVA-13B's layer in float16 (each linear alone before
# 2026-12-05; since then the linears that read one input loop their columns together, SHARED_INPUTS here).
OPS_PER_COLUMN = 11.1
EARLIER_OPS_PER_COLUMN = 16.1
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # LLaVA's (the search finds them by a run)


def looped_columns(linears: list[tuple[str, int]], earlier: bool = False) -> int:
    """Columns GPTQ loops over for one unit's ``(name, input width)`` linears."""
    if earlier:
        return sum(width for _, width in linears)
    inputs = {next((g for g in SHARED_INPUTS if name.rsplit(".", 1)[-1] in g), name): width for name, width in linears}
    return sum(inputs.values())


def layer_linears(hidden: int, intermediate: int) -> list[tuple[str, int]]:
    return [(n, hidden) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")] + [
        ("down_proj", intermediate)]


def uncounted(method: str, earlier: bool = False) -> int:
    """Forwards over every batch that ``evaluations`` does not count (``qvlm.search.UNCOUNTED_FORWARDS``, which
    tests/test_search.py checks against the forwards a search runs)."""
    from qvlm.search import UNCOUNTED_FORWARDS

    return (EARLIER_UNCOUNTED if earlier else UNCOUNTED_FORWARDS)[method]


def steps(method: str, iters: int) -> int:
    """Forward + backward steps on one calibration batch (learn_rounding)."""
    return iters if method in ("learned", "best") else 0


@dataclass(frozen=True)
class Unit:
    segment: str
    params: int  # linear weights
    looped: int  # columns GPTQ loops over (the linears that read one input together)
    tokens: int  # per sample
    width: int  # hidden width of its input
    out_width: int
    widest: int  # widest linear output
    heads_attention: bool  # has self-attention (T x T)
    quant_bytes: int  # packed W4 g128 linears in the checkpoint


def units_of(job: Job13B) -> list[Unit]:
    from qvlm.quant import WeightScheme

    plan, scheme = job.plan, WeightScheme(4, 128, True)
    out = []
    for u in plan.units:
        shapes = [plan.linear_shapes[u.linear_name(n)] for n in u.linears]
        tokens = plan.image_tokens if u.segment in ("vision", "projector") else job.tokens
        looped = looped_columns([(n, i) for n, (_, i) in zip(u.linears, shapes)])
        out.append(Unit(u.segment, sum(o * i for o, i in shapes), looped, tokens, shapes[0][1],
                        shapes[-1][0], max(o for o, _ in shapes), u.segment != "projector",
                        sum(scheme.storage_bits(o, i) for o, i in shapes) // 8))
    return out


def forward_flops(u: Unit, samples: int, causal: float) -> float:
    attention = 4 * u.tokens**2 * u.width * causal if u.heads_attention else 0
    return samples * (2 * u.params * u.tokens + attention)


# ---- calibration on bench/gpu.py's CPU run ----------------------------------------------------------------------

@dataclass(frozen=True)
class Calibration:
    """Weight-proportional seconds per weight on this CPU, per method (learned: per weight and step)."""

    rows: list
    per_weight: dict  # method -> seconds per linear weight (learned and best: the part that does not scale with iters)
    per_weight_step: float  # learned rounding: seconds per weight per step
    cpu_bandwidth: float  # bytes/s of a large copy on the CPU of the run (measured by bench/gpu.py then)
    forward: float  # seconds of one forward of the layer over the run's calibration set
    forward_from: str  # what that figure is
    launch_s: float  # GPTQ's column loop: seconds per operator launched
    launch_from: str


def cpu_bandwidth() -> float:
    x = torch.empty(64 * 2**20, dtype=torch.float32).fill_(1.0)
    y = torch.empty_like(x)
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        y.copy_(x)
        best = min(best, time.perf_counter() - t)
    return 2 * x.numel() * 4 / best  # read + write


def calibrate(measured: dict, a: Assume) -> Calibration:
    args = measured["args"]
    h, i = args["hidden"], args["intermediate"]
    weights = 4 * h * h + 3 * h * i
    batches = args["samples"] // args["batch"]
    f, forward_from = forward_seconds(measured)
    rows, fixed = [], {}
    earlier = "uncounted_forwards" not in measured
    for m, fig in measured["methods"].items():
        improved = fig["error_ratio"] < 1.0 or m not in ("learned",)
        formula = evaluations(m, args["iters"], improved, earlier)
        forwards = fig["evaluations"] + uncounted(m, earlier)
        token_s = forwards * f + steps(m, args["iters"]) * a.fwd_bwd * f / batches
        fixed[m] = max(fig["seconds"] - token_s, 0.0)
        reproduced = m == "best" and not earlier and formula - 1 == fig["evaluations"]  # learned's start not run
        check = "ok" if formula == fig["evaluations"] else "ok (start reproduced)" if reproduced else "MISMATCH"
        rows.append([m, fig["evaluations"], formula, check, forwards,
                     steps(m, args["iters"]), f"{fig['seconds']:.2f}", f"{token_s:.2f}", f"{fixed[m]:.2f}",
                     f"{fixed[m] / weights * 1e9:.1f}"])
    learned_step = fixed.get("learned", 0.0) / max(args["iters"], 1) / weights
    per_weight = {m: fixed[m] / weights for m in fixed}
    per_weight["learned"] = 0.0  # all of learned's weight work is counted per step
    if "best" in fixed:  # best's own weight work besides its learned steps
        per_weight["best"] = max(fixed["best"] - learned_step * args["iters"] * weights, 0.0) / weights
    bandwidth = measured["copy_gbps"] * GB if "copy_gbps" in measured else cpu_bandwidth()
    launch_s, launch_from = a.launch_s, "assumed (the run measured no GPTQ on a GPU)"
    if "gptq" in fixed and measured["device"] != "CPU":
        before = "forward" not in measured  # runs that time no plain forward predate the joint column loop
        ops = EARLIER_OPS_PER_COLUMN if before else OPS_PER_COLUMN
        launches = looped_columns(layer_linears(h, i), before) * ops
        launch_s = fixed["gptq"] / launches
        launch_from = (f"GPTQ's measured weight work on {measured['device']} ({fixed['gptq']:.2f} s) / its "
                       f"{launches:.0f} launches ({ops:g} per column{', each linear alone' if before else ''})")
    return Calibration(rows, per_weight, learned_step, bandwidth, f, forward_from, launch_s, launch_from)


def with_measured_launches(cal: Calibration, columns: dict) -> Calibration:
    """GPTQ's seconds per launch from bench/gptq_columns.py's timing of today's code (the linears that read one
    input together) on a GPU."""
    together = columns.get("ways", {}).get("together", {})
    if columns.get("device_name", "cpu") == "cpu" or together.get("seconds") is None:
        raise SystemExit("--gptq-columns: the run must be bench/gptq_columns.py on a GPU with its timed runs "
                         "(--repeats 1 or more) of today's code")
    return replace(cal, launch_s=together["seconds"] / together["ops"],
                   launch_from=f"measured by bench/gptq_columns.py on {columns['device_name']} "
                               f"({together['seconds']:.2f} s for {together['ops']} operators)")


def forward_seconds(measured: dict) -> tuple[float, str]:
    """One forward of the measured layer over its calibration set: bench/gpu.py times it since 2026-12-05; before
    that, rtn's search (one forward and the rounding) bounds it from above, and the capture (the first pass, with
    the device warming up and the inputs copied) from further above."""
    if "forward" in measured:
        return measured["forward"]["seconds"], "the run's plain forward"
    if "rtn" in measured["methods"]:
        return measured["methods"]["rtn"]["seconds"], "rtn's search: one forward and the rounding (an upper bound)"
    return measured["capture"]["seconds"], "the capture (an upper bound)"


# ---- the cost of a unit's search on a GPU --------------------------------------------------------------------

@dataclass(frozen=True)
class Where:
    gpu: Gpu
    host_captures: bool  # captures in host memory: every use moves them over PCIe


def forward_s(u: Unit, job: Job13B, w: Where, a: Assume) -> float:
    """One forward of the unit over every batch: compute at the assumed efficiency, plus moving its inputs and
    targets from host memory when the captures live there."""
    compute = forward_flops(u, job.samples, a.causal_attention) / (w.gpu.fp16 * a.efficiency)
    moved = 2 * job.samples * u.tokens * u.width * 2 / w.gpu.pcie if w.host_captures else 0.0
    return compute + moved


def weight_work_s(u: Unit, method: str, cal: Calibration, w: Where, a: Assume, bound: str) -> float:
    """Weight-proportional work on a GPU, ``calibrated``: its seconds per weight on the measured run times the ratio
    of that device's copy bandwidth to the GPU's (x bw_efficiency), which carries over the measured device's own
    overheads (Python, float16 conversions, kernels far below its bandwidth); ``analytic``: the bytes per weight of
    ``Assume`` at the GPU's bandwidth. GPTQ's column loop (gptq, and best's GPTQ candidate) is launch-bound in both:
    its looped columns x operators per column x the seconds of a launch."""
    gpu_bw = w.gpu.hbm * a.bw_efficiency
    loop = u.looped * OPS_PER_COLUMN * cal.launch_s if method in ("gptq", "best") else 0.0
    if bound == "analytic":
        per = {"rtn": a.analytic_bytes_rtn, "clip": a.analytic_bytes_clip, "gptq": a.analytic_bytes_gptq,
               "learned": a.analytic_bytes_rtn, "best": a.analytic_bytes_best}[method]
        return (per + steps(method, a.iters) * a.analytic_bytes_step) * u.params / gpu_bw + loop
    scale = cal.cpu_bandwidth / gpu_bw
    gptq = cal.per_weight.get("gptq", 0.0) if method in ("gptq", "best") else 0.0  # the loop, counted above
    other = max(cal.per_weight.get(method, 0.0) - gptq, 0.0)
    return (other + steps(method, a.iters) * cal.per_weight_step) * u.params * scale + loop


def search_s(u: Unit, method: str, job: Job13B, cal: Calibration, w: Where, a: Assume,
             bound: str = "calibrated") -> tuple[float, float, float]:
    """(forwards, learned steps, weight work) of one unit's search, seconds."""
    batches = -(-job.samples // job.batch)
    f = forward_s(u, job, w, a)  # a learned step runs with the soft weights, made once a step
    dequant = batches * u.params * a.dequant_bytes / (w.gpu.hbm * a.bw_efficiency)
    fwd = (evaluations(method, a.iters) + uncounted(method)) * (f + dequant)
    step = steps(method, a.iters) * (a.fwd_bwd * f / batches + (2 * job.batch * u.tokens * u.width * 2 / w.gpu.pcie
                                                                 if w.host_captures else 0.0))
    return fwd, step, weight_work_s(u, method, cal, w, a, bound)


def block_write_s(u: Unit, w: Where) -> float:
    """The stage writes each finished block's packed file itself, sharing its node's storage bandwidth."""
    return u.quant_bytes / (w.gpu.storage / w.gpu.per_node)


# ---- memory ----------------------------------------------------------------------------------------------------

def memory_rows(job: Job13B, gpu: Gpu, method: str) -> tuple[list, str]:
    """cluster/memory.py per stage for ``method`` on ``gpu``, and check_memory's verdict."""
    from cluster.memory import CalibrationSize, check_memory, stage_memory
    from qvlm.config import CalibrationSettings
    from qvlm.errors import QvlmError

    quant = quant_for(method, job.depth)
    size = CalibrationSize(job.samples, job.batch, job.tokens, job.plan.image_tokens)
    cal = CalibrationSettings(samples=job.samples, max_length=job.tokens, batch_size=job.batch)
    host = gpu.host // gpu.per_node * len(job.plan.stages)
    try:
        fits = check_memory(job.plan, cal, quant, True, gpu.memory, host)
        words = {"device": "captures on device", "host": "captures on host", "split": "the tower's captures on host"}
        verdict = "accepted: " + ", ".join(f"stage {s} {words[f.keep_captures]}" for s, f in enumerate(fits))
    except QvlmError as exc:
        fits, verdict = None, f"refused (exit 2): {exc}"
    rows = []
    for s in range(len(job.plan.stages)):
        m = stage_memory(job.plan, s, size, quant)
        where = fits[s].keep_captures if fits else "-"
        on_gpu = {"device": m.total, "split": replace(m, captures=m.captures - m.tower).total}.get(
            where, m.weights + max(m.workspace, m.evaluation))
        rows.append([s, len(job.plan.stages[s]), f"{m.weights / GIB:.1f}", f"{m.captures / GIB:.1f}",
                     f"{m.workspace / GIB:.1f}", f"{m.total / GIB:.1f}", where, f"{on_gpu / GIB:.1f}",
                     f"{0.9 * gpu.memory / GIB:.1f}"])
    return rows, verdict


def unmodelled_rows() -> list:
    """What a decoder-layer stage holds beyond cluster/memory.py's model, estimated (GiB)."""
    from qvlm.mixed_precision import KURTOSIS_CHUNK
    from qvlm.quant import ROW_SLICE_ELEMENTS

    statistics = 3 * 8 * KURTOSIS_CHUNK + 3 * 4 * ROW_SLICE_ELEMENTS
    return [["statistics: kurtosis's float64 chunks and the sensitivity's float32 slice of rows",
             f"{statistics / GIB:.2f}", "transient, before the searches", "not counted"]]


def _decoder_unit(job: Job13B):
    return next(u for u in job.plan.units if u.segment == "language")


def modelled_and_measured(job: Job13B, measured: dict, method: str) -> tuple[int, int]:
    """cluster/memory.py's search workspace of one LLaVA-13B decoder layer at bench/gpu.py's calibration size, and
    what bench/gpu.py measured (its peak above the memory before it: the captures and the weights are counted
    apart in both), bytes; a run on a smaller layer is scaled by the 13B layer's weights over its own."""
    from cluster.memory import CalibrationSize, block_workspace_bytes, search_cost

    args = measured["args"]
    size = CalibrationSize(args["samples"], args["batch"], args["tokens"], 0)
    cost = replace(search_cost(quant_for(method, job.depth)), depth=1)
    fig = measured["methods"][method]
    scale = LAYER_13B_WEIGHTS / layer_weights(args["hidden"], args["intermediate"])
    seen = round((fig["peak_gib"] - fig["before_gib"]) * GIB * scale)
    return block_workspace_bytes(job.plan, [_decoder_unit(job)], size, cost), seen


def estimated_peak_rows(job: Job13B, measured: dict) -> list:
    """Per GPU and method: the model's bytes on the GPU for the largest decoder stage, plus what bench/gpu.py
    measured beyond the model's count for one layer (x block depth; 0 where the model counts more)."""
    rows = []
    for key, gpu in GPUS.items():
        for method in (m for m in METHODS if m in measured["methods"]):
            quant = quant_for(method, job.depth)
            depth = quant.max_block_depth if quant.method == "qvlm" else 1
            table_rows, _ = memory_rows(job, gpu, method)
            on_gpu = max(float(r[7]) for r in table_rows[1:]) * GIB  # a decoder-only stage
            modelled, seen = modelled_and_measured(job, measured, method)
            extra = depth * max(seen - modelled, 0)
            total = on_gpu + extra
            rows.append([key, method, depth, f"{on_gpu / GIB:.1f}", f"{extra / GIB:.1f}", f"{total / GIB:.1f}",
                         f"{0.9 * gpu.memory / GIB:.1f}", "yes" if total <= 0.9 * gpu.memory else "NO"])
    return rows


# ---- 3. the job ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Phases:
    start: float
    load: float
    capture: float
    statistics: float
    search: dict  # propagation -> seconds of the search phase
    export: float
    search_parts: tuple  # (forwards, steps, weight work, writes) summed over every unit

    def total(self, propagation: str) -> float:
        return self.start + self.load + self.capture + self.statistics + self.export + self.search[propagation]


def stage_searches(job: Job13B, method: str, units: list[Unit], cal: Calibration, wheres: list[Where], a: Assume,
                   bound: str):
    """Per stage, the seconds of its blocks' searches with ``propagation: fp`` and with a chain of blocks
    (``stage`` and ``quantized``: a chained block hands on the output of its search's last forward pass, so only
    learned and best may run its units once more over every batch, when what they keep is not what they measured
    last; counted here for every block, an upper bound); and (forwards, steps, weight work, writes) summed over
    the model."""
    fp, quantized, parts = [], [], [0.0, 0.0, 0.0, 0.0]
    for s, stage in enumerate(job.plan.stages):
        total = extra = 0.0
        for k in stage:
            f, st, wk = search_s(units[k], method, job, cal, wheres[k], a, bound)
            wr = block_write_s(units[k], wheres[k])
            total += f + st + wk + wr
            extra += forward_s(units[k], job, wheres[k], a) if method in ("learned", "best") else 0.0
            for j, v in enumerate((f, st, wk, wr)):
                parts[j] += v
        fp.append(total)
        quantized.append(total + extra)
    return fp, quantized, tuple(parts)


def phases(job: Job13B, method: str, units: list[Unit], cal: Calibration, gpu: Gpu, measured: dict, a: Assume,
           keep: list[str], bound: str) -> Phases:
    plan = job.plan
    n = len(plan.stages)
    batches = -(-job.samples // job.batch)
    wheres = {k: Where(gpu, on_host(keep[s], units[k])) for s in range(n) for k in plan.stages[s]}  # by unit
    per_stage_storage = gpu.storage / gpu.per_node
    load = max(plan.stage_bytes(s) for s in range(n)) / per_stage_storage
    per_batch = [sum(forward_s(units[k], job, Where(gpu, False), a) for k in plan.stages[s]) / batches
                 + captured_bytes(job, units, plan.stages[s], keep[s]) / batches / gpu.pcie
                 for s in range(n)]
    hop = job.batch * job.tokens * 5120 * 2
    store = min(measured["object_store_gbps"].values()) * GB  # put into the store, get in another process
    crossings = -(-n // gpu.per_node) - 1  # boundaries between nodes (stages fill nodes in order)
    hop_s = hop / store + (hop / gpu.network if crossings else 0.0)
    capture = (batches + n - 1) * max(max(per_batch), hop_s)
    stats = max(sum(forward_s(units[k], job, wheres[k], a) + units[k].params * a.stats_bytes_per_weight /
                    (gpu.hbm * a.bw_efficiency) for k in plan.stages[s]) for s in range(n))
    fp, quantized, parts = stage_searches(job, method, units, cal, wheres, a, bound)
    carried = batches * hop * ((n - 1) / store + crossings / gpu.network)
    rest = sum(job.index.total_bytes(chunk) for chunk in plan.rest_chunks)
    export = 2 * rest / per_stage_storage
    search = {"fp": max(fp), "stage": max(quantized), "quantized": sum(quantized) + carried}
    return Phases(a.stage_start_s, load, capture, stats, search, export, parts)


def captured_bytes(job: Job13B, units: list[Unit], stage, keep: str) -> int:
    """What a stage keeps of the capture in host memory (each unit's input and the last one's output), float16."""
    kept = sum(job.samples * units[k].tokens * units[k].width * 2 for k in stage if on_host(keep, units[k]))
    return kept + (job.samples * units[stage[-1]].tokens * units[stage[-1]].out_width * 2 if keep == "host" else 0)


def on_host(keep: str, u: Unit) -> bool:
    """Whether a unit's captures live in host memory, by cluster/memory.py's fit of its stage (``keep``)."""
    return keep == "host" or (keep == "split" and u.segment != "language")


def fmt_s(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


# ---- printing ----------------------------------------------------------------------------------------------------

def print_assumptions(a: Assume, job: Job13B, measured: dict, path: Path | None, cal: Calibration) -> None:
    print("ASSUMPTIONS (bench/projection.py: Assume and GPUS; none is measured on a GPU)")
    print("  " + ", ".join(f"{f.name}={getattr(a, f.name):g}" for f in fields(a)))
    for key, g in GPUS.items():
        print(f"  {key}: {g.name}: fp16 {g.fp16 / 1e12:g} TFLOP/s dense, fp32 {g.fp32 / 1e12:g}, memory "
              f"{g.hbm / 1e9:g} GB/s, {g.memory / GIB:.1f} GiB per GPU, host<->GPU {g.pcie / 1e9:g} GB/s (pageable), "
              f"{g.per_node} GPUs and {g.host / GIB:.0f} GiB host memory per node, storage {g.storage / 1e9:g} GB/s "
              f"per node, network {g.network / 1e9:g} GB/s")
    print(f"  calibration: {job.samples} samples x {job.tokens} tokens (decoder), {job.plan.image_tokens} tokens per "
          f"image (vision tower, projector), batch {job.batch}; W4 g128 symmetric; "
          f"max_block_depth {job.depth} for clip/learned/best (memory); a block's time is the sum of its units' "
          "(every count below is per unit)")
    a_ = measured["args"]
    shown = os.path.relpath(path) if path else "no --measured file"
    print(f"  measured: {shown}: bench/gpu.py on {measured['device']}, "
          f"{measured['threads']} threads, layer {a_['hidden']}/{a_['intermediate']}, {a_['heads']} heads, "
          f"{a_['dtype']}, {a_['samples']} x {a_['tokens']} tokens in batches of {a_['batch']}, iters {a_['iters']}; "
          f"copy bandwidth {cal.cpu_bandwidth / 1e9:.1f} GB/s " + ("(measured in that run)\n" if "copy_gbps" in measured
                                                               else "(measured now: the run did not record it)\n"))


def print_plan(job: Job13B) -> None:
    from cluster.plan import memory_lines

    plan = job.plan
    print(f"1. PLAN (cluster.plan.make_plan on a header-only LLaVA-1.5-13B, {plan.total_bytes / GB:.1f} GB of float16 "
          f"tensors): {len(plan.units)} units in {len(plan.streams)} streams, {len(plan.stages)} stages balanced by "
          "compute (weights x tokens)")
    for s, st in enumerate(plan.stages):
        segs = {}
        for k in st:
            segs[plan.units[k].segment] = segs.get(plan.units[k].segment, 0) + 1
        print(f"  stage {s}: units {st[0]}..{st[-1]} ({', '.join(f'{v} {k}' for k, v in segs.items())}), "
              f"{plan.stage_bytes(s) / GIB:.2f} GiB of weights" + (" with the glue" if s == 0 else ""))
    print(f"  `qvlm plan` prints (cluster/plan.py memory_lines, method qvlm, depth {job.depth}):")
    for line in memory_lines(plan, quant_for("best", job.depth), job.samples, job.tokens, job.batch):
        print("    " + line)


def print_memory(job: Job13B, a: Assume) -> dict:
    verdicts = {}
    for key, gpu in GPUS.items():
        for method in ("gptq", "best"):
            rows, verdict = memory_rows(job, gpu, method)
            verdicts[key, method] = verdict
            depth = "depth 1" if method == "gptq" else f"depth {job.depth}"
            print(f"\n  {key}, method {method} ({depth}, Hessians counted): {verdict}")  # best runs GPTQ too
            print(table(["stage", "units", "weights GiB", "captures GiB", "workspace GiB", "total GiB", "captures on",
                         "on the GPU GiB", "90% of GPU GiB"], rows))
    print("\n  Not in cluster/memory.py's model (estimated here from the code, per stage):")
    print(table(["what", "GiB", "scales", "in the model"], unmodelled_rows()))
    return verdicts


def print_measured_memory(job: Job13B, measured: dict) -> None:
    a_ = measured["args"]
    scaled = (a_["hidden"], a_["intermediate"]) != LAYER_13B
    print(f"\n  One decoder layer's search workspace: cluster/memory.py's count at bench/gpu.py's calibration "
          f"({a_['samples']} x {a_['tokens']} tokens, batches of {a_['batch']}) against what bench/gpu.py measured on "
          f"{measured['device']} (layer {a_['hidden']}/{a_['intermediate']}"
          + ("; scaled to the 13B layer by its weights, so its token-proportional part is over-stated"
             if scaled else "")
          + "; peak above the memory before it, the captures and weights apart in both):")
    rows = []
    for method in measured["methods"]:
        modelled, seen = modelled_and_measured(job, measured, method)
        rows.append([method, f"{modelled / GIB:.1f}", f"{seen / GIB:.1f}", f"{seen / modelled:.2f}"])
    print(table(["method", "counted GiB", "measured GiB", "measured / counted"], rows))
    print("\n  Estimated peak on the GPU of a decoder stage: the model's bytes on the GPU + what the layer measured "
          "beyond the count above (x block depth):")
    print(table(["GPU", "method", "depth", "model on GPU GiB", "measured beyond it GiB", "estimated peak GiB",
                 "90% of GPU GiB", "fits"], estimated_peak_rows(job, measured)))


def print_counts(cal: Calibration, measured: dict, a: Assume) -> None:
    a_ = measured["args"]
    print(f"\n2. COST PER UNIT. Forwards over the whole calibration set per method (qvlm/search.py, qvlm/learned.py), "
          f"checked on bench/gpu.py's run on {measured['device']} (iters {a_['iters']}); the rest of each method's measured seconds is "
          "weight-proportional work")
    print(table(["method", "evaluations measured", "formula", "check", "forwards incl. uncounted", "learned steps",
                 "s measured", "s forwards+steps", "s rest", "rest ns per weight"], cal.rows))
    missing = [m for m in METHODS if m not in measured["methods"]]
    if missing:
        print(f"  The run did not measure {', '.join(missing)}: below, their calibrated weight work is taken as none "
              "(only the analytic estimate has it) and their measured memory is left out.")
    if "uncounted_forwards" not in measured:
        print("  The run predates 2026-12-05's search code (it records no uncounted_forwards): its counts are checked "
              "against that code's, and the job below is modelled with today's, two forwards fewer for learned and best.")
    print(f"  forwards: {cal.forward_from} ({cal.forward:.2f} s) x count; steps: {a.fwd_bwd:g} x a "
          f"forward of one batch. At {a.iters} iters: " + ", ".join(
              f"{m} {evaluations(m, a.iters) + uncounted(m)} forwards + {steps(m, a.iters)} steps" for m in METHODS))
    h100 = GPUS["H100"]
    scale = cal.cpu_bandwidth / (h100.hbm * a.bw_efficiency)
    calibrated = a.iters * cal.per_weight_step * LAYER_13B_WEIGHTS * scale
    analytic = a.iters * 16 * 2 * 4 * LAYER_13B_WEIGHTS / (h100.hbm * a.bw_efficiency)
    print(f"  The weight-proportional work on a GPU has two estimates. Calibrated: the measured run's seconds per "
          f"weight x its device's copy bandwidth / the GPU's x {a.bw_efficiency:g}; it carries that device's own "
          "overheads (Python, float16 conversions, elementwise kernels far below its bandwidth) over to the GPU. Analytic: "
          "Assume's bytes per weight at the GPU's bandwidth. E.g. learned's soft weights, "
          f"{a.iters} steps of one 13B decoder layer on an H100: {fmt_s(calibrated)} calibrated, {fmt_s(analytic)} "
          f"analytic. GPTQ's column loop: looped columns x {OPS_PER_COLUMN:g} operators x {cal.launch_s * 1e6:.1f} "
          f"us a launch either way, the launch {cal.launch_from}.")


def span(one: float, other: float) -> str:
    """Two estimates of one time as a range, the smaller first."""
    low, high = sorted((one, other))
    return fmt_s(low) if fmt_s(low) == fmt_s(high) else f"{fmt_s(low)} - {fmt_s(high)}"


def print_units(job: Job13B, units: list[Unit], cal: Calibration, a: Assume) -> None:
    rows = []
    for seg in ("vision", "projector", "language"):
        u = next(x for x in units if x.segment == seg)
        count = sum(1 for x in units if x.segment == seg)
        for key, gpu in GPUS.items():
            for host in ((False, True) if key == "A10G" and seg == "language" else (False,)):
                w = Where(gpu, host)
                cells = [span(*(sum(search_s(u, m, job, cal, w, a, bound)) for bound in ("analytic", "calibrated")))
                         for m in METHODS]
                rows.append([f"{seg} x {count}", f"{u.params / 1e6:.1f}",
                             f"{forward_flops(u, job.samples, a.causal_attention) / 1e12:.1f}",
                             key + (" (captures on host)" if host else ""), fmt_s(forward_s(u, job, w, a)), *cells])
    print(f"\n  One unit's search, modelled ({a.iters} learned steps; the range between the analytic and the calibrated "
          "weight-proportional work):")
    print(table(["unit", "linear params M", "TFLOP per forward", "GPU", "one forward", *METHODS], rows))


def host_captures(job: Job13B, gpu: Gpu, method: str) -> list[str]:
    """Where each stage keeps its captures ("device", "host", "split"): cluster/memory.py's fit for this GPU and
    method."""
    from cluster.memory import CalibrationSize, fit, stage_memory

    quant = quant_for(method, job.depth)
    size = CalibrationSize(job.samples, job.batch, job.tokens, job.plan.image_tokens)
    return [fit(stage_memory(job.plan, s, size, quant), gpu.memory, gpu.host // gpu.per_node,
                True).keep_captures for s in range(len(job.plan.stages))]


def print_job(job: Job13B, units: list[Unit], cal: Calibration, measured: dict, a: Assume) -> None:
    print(f"\n3. THE JOB, modelled (LLaVA-13B, {job.samples} x {job.tokens}, W4A16 g128, {len(job.plan.stages)} stage "
          "actors, one GPU each); where two figures stand, they are the range between the "
          "analytic and the calibrated estimate of the weight-proportional work, smaller first")
    rows, refusals = [], []
    for key, gpu in GPUS.items():
        for m in METHODS:
            host = host_captures(job, gpu, m)
            analytic, calibrated = (phases(job, m, units, cal, gpu, measured, a, host, bound)
                                    for bound in ("analytic", "calibrated"))
            parts = calibrated.search_parts
            _, verdict = memory_rows(job, gpu, m)
            accepted = verdict.startswith("accepted")
            if not accepted:
                refusals.append(f"{key} {m}: {verdict.rsplit('; ', 1)[-1]}")
            rows.append([key, m, "accepted" if accepted else "REFUSED",
                         *(fmt_s(getattr(calibrated, phase)) for phase in ("start", "load", "capture", "statistics")),
                         *(span(analytic.search[p], calibrated.search[p]) for p in PROPAGATIONS),
                         fmt_s(calibrated.export),
                         *(span(analytic.total(p), calibrated.total(p)) for p in PROPAGATIONS),
                         f"{sum(k == 'host' for k in host)}/{len(host)}"
                         + (f" ({sum(k == 'split' for k in host)} split)" if "split" in host else ""),
                         " / ".join(f"{v / sum(parts):.0%}" for v in parts)])
    print(table(["GPUs", "method", "memory check", "start", "load", "capture", "statistics",
                 *(f"search {p}" for p in PROPAGATIONS),
                 "export", *(f"TOTAL {p}" for p in PROPAGATIONS), "host captures",
                 "calibrated: fwd / steps / weights / writes"], rows))
    print("  search fp: stages search their own blocks in parallel (the slowest stage); search stage: the same, each "
          "block handing its quantized output to the next block of its stage (its search's last forward; learned and best: "
          "one more forward, counted for every block, an upper bound); search quantized (the default "
          "propagation): each block waits for the quantized output of the block before it in its stream, across stages "
          "too, so the whole model's blocks run one after another (learned and best: one more forward each, as for stage), plus the "
          "carried outputs between stages. Host captures: stages whose captures cluster/memory.py "
          "puts in host memory (split: only the vision tower's and the projector's); each use moves them over PCIe. "
          "load: the largest stage's weights at the node's storage "
          "rate / its GPUs; capture: (batches + stages - 1) x the slowest stage's batch or the hop through the object "
          "store (bench/gpu.py's put and get), whichever is slower; export: the unquantized tensors read and written once.")
    if refusals:
        print("  REFUSED: cluster/memory.py's check (section 1) refuses the job at this calibration size and block "
              "depth, so its times above are of a job that would not start; what the refusal names instead:\n"
              + "\n".join(f"    {line}" for line in refusals)
              + "\n  A block's time is the sum of its units' here, so a shallower block changes none of them, only "
                "where the captures live; rerun with --depth D --batch N to model the setting named.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measured", type=Path, default=Path(__file__).parent / "gpu-cpu.json",
                        help="bench/gpu.py --json output (default: the CPU run recorded in BENCHMARKS.md)")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--depth", type=int, default=3, help="quantization.qvlm.max_block_depth (the job's default: 3)")
    parser.add_argument("--efficiency", type=float, default=Assume.efficiency)
    parser.add_argument("--iters", type=int, default=Assume.iters)
    parser.add_argument("--gptq-columns", type=Path, default=None,
                        help="bench/gptq_columns.py --json output on a GPU: GPTQ's launch time from it")
    args = parser.parse_args()
    a = replace(Assume(), efficiency=args.efficiency, iters=args.iters)
    measured = json.loads(args.measured.read_text())
    folder = Path(tempfile.mkdtemp(prefix="qvlm-llava13b-headers-"))
    try:
        job = plan_13b(folder, args.workers, args.samples, args.tokens, args.batch, args.depth)
        cal = calibrate(measured, a)
        if args.gptq_columns:
            cal = with_measured_launches(cal, json.loads(args.gptq_columns.read_text()))
        units = units_of(job)
        print(f"Every time below is modelled, calibrated by bench/gpu.py's run on {measured['device']} (no job ran on "
              "a GPU); every memory figure is cluster/memory.py's model or an estimate named as one.\n")
        print_assumptions(a, job, measured, args.measured, cal)
        print_plan(job)
        print_memory(job, a)
        print_measured_memory(job, measured)
        print_counts(cal, measured, a)
        print_units(job, units, cal, a)
        print_job(job, units, cal, measured, a)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
