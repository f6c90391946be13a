"""Projection of a Q-VLM job on LLaVA-13B over 8 GPUs, from per-block costs measured here (issue 5).

    .venv/bin/python bench/projection.py [--threads 2] [--search-tokens 128] [--gpu-efficiency 0.4] [--skip-search]

Four parts, each printed as a table:

1. The cost model. A block search costs (block evaluations) x (one evaluation = a forward of the block's
   remaining units over every calibration batch). The count of each ``search`` method is written as a formula
   here (``*_count`` below) and checked against ``BlockResult.evaluations`` and against the unit forwards
   counted while real ``qvlm.search.search_block`` runs on small random Llama decoder layers.
2. Measured on this CPU: one LlamaDecoderLayer at the LLaVA-13B shape (hidden 5120, MLP 13824, 40 heads,
   float32, random weights; only that one layer is built), its forward over a small calibration set, a forward
   + backward, and one ``search: clip`` block search (epochs 1, W4 g128).
3. LLaVA-13B from a meta-device skeleton (no weights): units, bytes, pipeline stages and checkpoint size with
   qvlm's and cluster/plan.py's own functions, and the FLOPs of one unit forward over the paper's calibration set.
4. The projection: time per block by method, the number of blocks, data moved and the job's phases on 8 GPUs.

Only rows and figures marked "measured" are measurements; everything else is an estimate from the cost model
and the assumptions printed with it.
"""

from __future__ import annotations

import argparse
import heapq
import os
import random
import statistics
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from _common import own_peak_rss, table

import qvlm.capture
import qvlm.gptq
import qvlm.learned
import qvlm.search
from qvlm.capture import call_unit, capture_units
from qvlm.config import QuantConfig
from qvlm.driver import Block, block_data, linear_shapes, select_units
from qvlm.partition import partition
from qvlm.quant import ActScheme, WeightScheme
from qvlm.search import SearchConfig, search_block
from qvlm.structure import segments_of

GB = 1e9
SCHEME = WeightScheme(4, 128)
PERCENTILES = SearchConfig().percentiles
P = len(PERCENTILES)

# The paper's calibration set (method.md 1.8): 64 image-text pairs, batch 8; a LLaVA-1.5 prompt is 576 image
# tokens + about 100 text tokens (padding to the longest prompt of a batch is taken as included in the 100).
SAMPLES, BATCH, TEXT_TOKENS, IMAGE_TOKENS, VISION_TOKENS = 64, 8, 100, 576, 577

# Datasheet dense peaks (SXM parts), FLOP/s and bytes/s.
GPUS = {
    "H100": {"bf16": 989e12, "fp32": 67e12, "fp64": 67e12, "hbm": 3.35e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12, "fp64": 19.5e12, "hbm": 2.039e12},
}


@dataclass(frozen=True)
class Assume:
    """Every number the projection assumes (printed with it)."""

    efficiency: float = 0.4  # sustained share of the dense peak for matmul-bound work (bf16, fp32, fp64)
    bw_efficiency: float = 0.7  # share of HBM bandwidth for elementwise work
    gpus: int = 8
    gpus_per_node: int = 4  # ray_config.yaml's layout: two 4-GPU nodes
    storage_gbps: float = 1.0  # model/output storage (S3) per node, GB/s, shared by the node's workers
    network_gbps: float = 2.5  # node-to-node object transfer per node, GB/s (20 Gbit/s), shared likewise
    task_start_s: float = 10.0  # per block task: process start, CUDA context, reading its inputs' metadata
    stage_start_s: float = 30.0  # stage actors: start, import torch/transformers, CUDA context
    gptq_column_s: float = 2e-4  # GPTQ's per-column Python loop (~15 small kernels), launch-bound on a GPU
    soft_weight_bytes: float = 200.0  # learned: HBM bytes per weight per step for the soft weight (fwd + bwd)
    epochs: int = 10  # clip: the paper's 10 passes (an upper bound: the search stops at a pass with no change)
    iters: int = 200  # learned: optimisation steps (the default)

    @property
    def per_task_storage(self) -> float:
        return self.storage_gbps * GB / self.gpus_per_node

    @property
    def per_task_network(self) -> float:
        return self.network_gbps * GB / self.gpus_per_node


# --------------------------------------------------------------------------------------------------------------
# The cost model: evaluations and unit forwards of one block search, from qvlm/search.py as it stands.
# A block is described by its linears per unit (in unit order); d = its depth. A "unit forward" is one unit run
# over every calibration batch; an evaluation that starts at unit u runs d - u of them (``_Workspace.run_from``).
# --------------------------------------------------------------------------------------------------------------

def coord_depths(linears: Sequence[int], acts: bool) -> list[int]:
    """Per coordinate of the clip search: how many units an evaluation of it runs (d - u)."""
    d = len(linears)
    weight = [d - u for u, n in enumerate(linears) for _ in range(n)]
    return weight + (weight if acts else [])


def clip_count(linears: Sequence[int], epochs: int, acts: bool = False) -> tuple[int, int]:
    """(evaluations, unit forwards) of ``search: clip``: 2 refreshes (``_start`` and the search's own), then per
    pass every coordinate tries the P - 1 percentiles it does not hold; static activation ranges add one
    coordinate per linear and a capture of the linears' inputs (2 forwards per unit in ``_act_rows``)."""
    d, depths = len(linears), coord_depths(linears, acts)
    return 2 + epochs * len(depths) * (P - 1), 2 * d + (2 * d if acts else 0) + epochs * (P - 1) * sum(depths)


def rtn_count(linears: Sequence[int]) -> tuple[int, int]:
    return 1, len(linears)


def learned_count(linears: Sequence[int], iters: int) -> tuple[str, int, int]:
    """(evaluations, unit forwards over all batches, unit forwards with grad on ONE batch). 2 refreshes, a third
    when the learned weights did not lower the block error; each of ``iters`` steps runs the whole block
    forward and backward on one calibration batch (``learned._batch_loss``), which ``evaluations`` does not count."""
    d = len(linears)
    return "2|3", 2 * d, iters * d


def gptq_count(linears: Sequence[int]) -> tuple[int, int, int]:
    """(evaluations, unit forwards, Hessians): 2 refreshes plus, per unit, a capture of its linears' inputs and
    a forward to the next unit (not counted as evaluations); one Hessian and one GPTQ solve per linear."""
    d = len(linears)
    return 2, 4 * d, sum(linears)


# --------------------------------------------------------------------------------------------------------------
# Instrumentation for part 1 and 2 (wraps qvlm's functions in this process only; nothing is changed on disk).
# --------------------------------------------------------------------------------------------------------------

class Tally:
    def __init__(self):
        self.calls = self.grad_calls = self.quantize_calls = self.gptq_calls = 0
        self.forward_s = self.quantize_s = 0.0


class CountingPercentiles(tuple):
    """The percentile grid; counts how often ``_coordinate_search`` loops over it (passes x coordinates)."""

    loops = 0

    def __iter__(self):
        CountingPercentiles.loops += 1
        return super().__iter__()


@contextmanager
def instrumented():
    tally = Tally()
    orig_call, orig_q, orig_g = qvlm.capture.call_unit, qvlm.search.quantize_weight, qvlm.gptq.gptq_quantize

    def counted_call(module, call, hidden=None):
        t = time.perf_counter()
        out = orig_call(module, call, hidden)
        tally.forward_s += time.perf_counter() - t
        tally.calls += 1
        tally.grad_calls += torch.is_grad_enabled()
        return out

    def counted_quantize(*a, **k):
        t = time.perf_counter()
        out = orig_q(*a, **k)
        tally.quantize_s += time.perf_counter() - t
        tally.quantize_calls += 1
        return out

    def counted_gptq(*a, **k):
        tally.gptq_calls += 1
        return orig_g(*a, **k)

    mods = (qvlm.capture, qvlm.search, qvlm.learned)
    for m in mods:
        m.call_unit = counted_call
    qvlm.search.quantize_weight, qvlm.gptq.gptq_quantize = counted_quantize, counted_gptq
    CountingPercentiles.loops = 0
    try:
        yield tally
    finally:
        for m in mods:
            m.call_unit = orig_call
        qvlm.search.quantize_weight, qvlm.gptq.gptq_quantize = orig_q, orig_g


def build_llama(hidden: int, inter: int, heads: int, layers: int, vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def captured(model, batches: int, samples: int, tokens: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    data = [{"input_ids": torch.randint(0, vocab, (samples, tokens), generator=gen),
             "attention_mask": torch.ones(samples, tokens, dtype=torch.long)} for _ in range(batches)]
    units = select_units(model, QuantConfig())
    return units, capture_units(model, units, data)


# --------------------------------------------------------------------------------------------------------------
# Part 1: formula vs measured counts on small Llama layers.
# --------------------------------------------------------------------------------------------------------------

def verify_counts(seed: int) -> tuple[list[list], dict]:
    model = build_llama(256, 768, 4, 3, 256, seed)
    n_batches = 2
    units, caps = captured(model, n_batches, 2, 32, seed)
    linears = len(units[0].linears)
    runs = [("rtn", 3, {}, False), ("clip", 1, {"epochs": 1}, False), ("clip", 2, {"epochs": 1}, False),
            ("clip", 3, {"epochs": 1}, False), ("clip", 1, {"epochs": 10}, False), ("clip", 3, {"epochs": 10}, False),
            ("clip", 2, {"epochs": 1}, True), ("learned", 1, {"iters": 20}, False), ("learned", 3, {"iters": 20}, False),
            ("gptq", 1, {}, False), ("gptq", 2, {}, False)]
    rows, observed_passes = [], []
    for method, depth, kw, acts in runs:
        act = ActScheme(4, "channel") if acts else ActScheme()
        config = QuantConfig(activations=act)
        schemes = {u.linear_name(n): SCHEME for u in units for n in u.linears}
        data = block_data(model, Block(0, 0, tuple(range(depth))), units, caps, schemes, config, None)
        cfg = SearchConfig(method, CountingPercentiles(PERCENTILES), kw.get("epochs", 10), kw.get("iters", 200), seed=seed)
        with instrumented() as tally:
            result = search_block(data, cfg)
        per_unit = [linears] * depth
        took = f"{result.seconds:.1f}"
        setting = f"epochs {cfg.epochs}" if method == "clip" else (f"iters {cfg.iters}" if method == "learned" else "-")
        run_epochs, note = "-", ""
        if method == "clip":
            coords = len(coord_depths(per_unit, acts))
            passes = CountingPercentiles.loops // coords
            ev, uf = clip_count(per_unit, passes, acts)
            run_epochs = str(passes)
            extra = result.evaluations - ev
            if cfg.epochs > 1:
                observed_passes.append(passes)
            note = "exact" if extra == 0 else f"+{extra} re-tries of a starting value, error already known"
            if passes < cfg.epochs:
                note += f"; stopped after pass {passes} (no change)"
            formula_ev, formula_uf, measured_uf = str(ev), str(uf * n_batches), str(tally.calls)
            ok = 0 <= extra <= passes * coords and tally.calls >= uf * n_batches
        elif method == "rtn":
            ev, uf = rtn_count(per_unit)
            formula_ev, formula_uf, measured_uf = str(ev), str(uf * n_batches), str(tally.calls)
            ok = result.evaluations == ev and tally.calls == uf * n_batches
            note = "exact" if ok else "MISMATCH"
        elif method == "learned":
            ev, uf, steps = learned_count(per_unit, cfg.iters)
            refreshes = result.evaluations
            formula_ev = ev
            formula_uf = f"{refreshes * depth * n_batches} + {steps} grad"
            measured_uf = f"{tally.calls - tally.grad_calls} + {tally.grad_calls} grad"
            ok = refreshes in (2, 3) and tally.grad_calls == steps and tally.calls - tally.grad_calls == refreshes * depth * n_batches
            note = ("exact" if ok else "MISMATCH") + f"; {cfg.iters} steps x {depth} units on one batch each"
        else:
            ev, uf, hessians = gptq_count(per_unit)
            formula_ev, formula_uf, measured_uf = str(ev), str(uf * n_batches), str(tally.calls)
            ok = result.evaluations == ev and tally.calls == uf * n_batches and tally.gptq_calls == hessians
            note = ("exact" if ok else "MISMATCH") + f"; {tally.gptq_calls} GPTQ solves (formula {hessians})"
        rows.append([method + (" W4A4" if acts else ""), depth, linears, setting, run_epochs, formula_ev,
                     result.evaluations, formula_uf, measured_uf, took, ("ok" if ok else "MISMATCH") + f" ({note})"])
    return rows, {"passes": observed_passes, "batches": n_batches}


# --------------------------------------------------------------------------------------------------------------
# Part 2: one LlamaDecoderLayer at the 13B shape on this CPU.
# --------------------------------------------------------------------------------------------------------------

def decoder_flops(tokens_per_sample: int, samples: int, hidden: int = 5120, inter: int = 13824) -> float:
    linears = 4 * hidden * hidden + 3 * hidden * inter
    return samples * (2 * linears * tokens_per_sample + 4 * tokens_per_sample ** 2 * hidden)


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def measure_layer(token_list: list[int], samples: int, search_tokens: int, do_search: bool, seed: int) -> dict:
    model = build_llama(5120, 13824, 40, 1, 256, seed)
    layer = model.model.layers[0]
    rows, m = [], {}
    calls = {}
    for tokens in sorted(set(token_list + [search_tokens])):
        units, caps = captured(model, 1, samples, tokens, seed)
        calls[tokens] = (units, caps)
    for tokens in token_list:
        call = calls[tokens][1][0].calls[0]
        with torch.no_grad():
            secs = timed(lambda call=call: call_unit(layer, call), 3)
        best = min(secs)
        flops = decoder_flops(tokens, samples)
        m[f"fwd_{tokens}"] = best
        rows.append([f"forward, {samples} x {tokens} tokens", "measured", f"{best:.2f}",
                     f"min of 3 ({min(secs):.2f}-{max(secs):.2f})", f"{flops / 1e9:.0f}", f"{flops / best / 1e9:.1f}"])
    lo_t, hi_t = min(token_list), max(token_list)
    if lo_t != hi_t:
        rows.append([f"  time ratio {hi_t} / {lo_t} tokens", "measured", f"{m[f'fwd_{hi_t}'] / m[f'fwd_{lo_t}']:.2f}x",
                     f"FLOP ratio {decoder_flops(hi_t, samples) / decoder_flops(lo_t, samples):.2f}x", "", ""])
    m["cpu_rate"] = decoder_flops(hi_t, samples) / m[f"fwd_{hi_t}"]
    # forward + backward with weight gradients (learned rounding trains through the weights)
    call = calls[search_tokens][1][0].calls[0]
    layer.requires_grad_(True)

    def fwd_bwd():
        with torch.enable_grad():
            call_unit(layer, call).float().pow(2).mean().backward()
        for p in layer.parameters():
            p.grad = None

    pairs = []  # a forward, then a forward + backward, back to back, so both see the same load on the shared cores
    for _ in range(3):
        with torch.no_grad():
            f = timed(lambda: call_unit(layer, call), 1)[0]
        pairs.append((f, timed(fwd_bwd, 1)[0]))
    layer.requires_grad_(False)
    ratios = [fb / f for f, fb in pairs]
    fb = min(fb for _, fb in pairs)
    m["fwd_bwd_ratio"] = statistics.median(ratios)
    flops = decoder_flops(search_tokens, samples)
    rows.append([f"forward + backward (weight grads), {samples} x {search_tokens}", "measured", f"{fb:.2f}", "min of 3",
                 f"{3 * flops / 1e9:.0f}", f"{3 * flops / fb / 1e9:.1f}"])
    rows.append(["  ratio to a forward run just before it", "measured", f"{m['fwd_bwd_ratio']:.2f}x",
                 "median of 3 (" + ", ".join(f"{r:.2f}" for r in ratios) + ")", "3x assumed", ""])
    # the same matmul in 16-bit types (LLaVA-13B ships in float16; today's code computes on the CPU in that dtype)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x, w = torch.randn(128, 5120, dtype=dtype), torch.randn(13824, 5120, dtype=dtype)
        torch.nn.functional.linear(x, w)
        s = min(timed(lambda x=x, w=w: torch.nn.functional.linear(x, w), 2))
        f = 2 * 128 * 5120 * 13824
        rows.append([f"one linear 128 x 5120 -> 13824, {str(dtype).split('.')[1]}", "measured", f"{s:.3f}", "min of 2",
                     f"{f / 1e9:.0f}", f"{f / s / 1e9:.1f}"])
        m[f"linear_{str(dtype).split('.')[1]}"] = f / s
        del x, w
    if do_search:
        units, caps = calls[search_tokens]
        schemes = {u.linear_name(n): SCHEME for u in units for n in u.linears}
        data = block_data(model, Block(0, 0, (0,)), units, caps, schemes, QuantConfig(), None)
        cfg = SearchConfig("clip", CountingPercentiles(PERCENTILES), epochs=1, seed=seed)
        with instrumented() as tally:
            result = search_block(data, cfg)
        ev, _ = clip_count([len(units[0].linears)], 1)
        other = result.seconds - tally.forward_s - tally.quantize_s
        m.update(search_s=result.seconds, search_evals=result.evaluations, search_fwd_s=tally.forward_s,
                 search_quant_s=tally.quantize_s, search_other_s=other, search_quant_calls=tally.quantize_calls)
        rows.append([f"search_block clip, epochs 1, W4 g128, {samples} x {search_tokens}", "measured",
                     f"{result.seconds:.1f}", f"{result.evaluations} evaluations (formula {ev})",
                     f"{result.evaluations * flops / 1e9:.0f}", f"{result.evaluations * flops / max(tally.forward_s, 1e-9) / 1e9:.1f}"])
        rows.append(["  of which unit forwards", "measured", f"{tally.forward_s:.1f}",
                     f"{tally.forward_s / result.evaluations:.2f} s each", "", ""])
        rows.append([f"  of which candidate weights ({tally.quantize_calls} quantize_weight)", "measured",
                     f"{tally.quantize_s:.1f}", "fixed per layer", "", ""])
        rows.append(["  other (copies, errors, dequantize on apply)", "measured", f"{other:.1f}", "", "", ""])
        del data, result
    m["rss"] = own_peak_rss()
    return {"rows": rows, **m}


# --------------------------------------------------------------------------------------------------------------
# Part 3: LLaVA-13B from a meta skeleton.
# --------------------------------------------------------------------------------------------------------------

def llava13b():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from qvlm.loading import build_skeleton

    text = LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, vocab_size=32064, max_position_embeddings=4096,
                       tie_word_embeddings=False, rms_norm_eps=1e-5)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, image_seq_length=576,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", architectures=["LlavaForConditionalGeneration"],
                         dtype=torch.float16)
    return build_skeleton(config)


@dataclass(frozen=True)
class UnitCost:
    segment: str
    linears: int
    params: int  # linear weights
    bytes: int  # all tensors the unit owns (16-bit)
    width: int  # hidden width at the unit's output
    in_width: int  # hidden width at the unit's input
    tokens: int  # per sample
    flops: float  # one unit forward over the calibration set
    quant_bytes: int  # the unit's linears in the checkpoint at W4 g128
    columns: int  # input columns over its linears (GPTQ's loop)
    hessian_flops: float  # fp64: X^T X per linear over the calibration set + Cholesky/inverse (~1.3 in^3)
    gptq_flops: float  # fp32 lazy-batch updates, ~out in^2 per linear


def plan_llava13b(workers: int):
    from cluster.plan import JobPlan, activation_bytes, quantized_bytes, split_stages
    from qvlm.loading import glue_names, owned_names

    model = llava13b()
    quant = QuantConfig(weights=SCHEME)
    units = select_units(model, quant)
    shapes = linear_shapes(model, units)
    sd = model.state_dict()
    nbytes = lambda names: sum(sd[n].numel() * sd[n].element_size() for n in names)
    unit_bytes = [nbytes(owned_names(model, [u.name])) for u in units]
    glue = nbytes(glue_names(model, [u.name for u in units]))
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    streams = [tuple(u.index for u in run) for run in segments_of(units)]
    stages = split_stages(units, unit_bytes, streams, workers, glue)
    plan = JobPlan(type(model).__name__, tuple(units), tuple(streams), tuple(stages), tuple(unit_bytes), glue, total,
                   shapes, 2)
    costs = []
    for u, ub in zip(units, unit_bytes):
        ls = [shapes[u.linear_name(n)] for n in u.linears]
        params = sum(o * i for o, i in ls)
        tokens = {"vision": VISION_TOKENS, "projector": IMAGE_TOKENS, "language": IMAGE_TOKENS + TEXT_TOKENS}[u.segment]
        width = ls[-1][0]
        attention = 0 if u.segment == "projector" else 4 * tokens ** 2 * width
        flops = SAMPLES * (2 * params * tokens + attention)
        qbytes = sum(SCHEME.storage_bits(o, i) for o, i in ls) // 8
        costs.append(UnitCost(u.segment, len(ls), params, ub, width, ls[0][1], tokens, flops, qbytes, sum(i for _, i in ls),
                              sum(2 * SAMPLES * tokens * i * i + 1.3 * i ** 3 for _, i in ls), sum(o * i * i for o, i in ls)))
    return plan, quant, costs, activation_bytes, quantized_bytes


def typical_blocks(streams: Sequence[Sequence[int]], draws: int, seed: int) -> list[list[tuple[int, ...]]]:
    """Partitions (max depth 3, auto h0 = the series mean) of ``draws`` iid uniform dependency series per stream."""
    rng = random.Random(seed)
    out = []
    for _ in range(draws):
        blocks = []
        for stream in streams:
            dep = [rng.random() for _ in range(len(stream) - 1)]
            blocks += [tuple(stream[j] for j in b) for b in partition(dep, len(stream), 3).blocks]
        out.append(blocks)
    return out


def fixed_blocks(streams, depth: int) -> list[tuple[int, ...]]:
    return [tuple(s[i:i + depth]) for s in streams for i in range(0, len(s), depth)]


# --------------------------------------------------------------------------------------------------------------
# Part 4: per-block times and the job's phases.
# --------------------------------------------------------------------------------------------------------------

class Device:
    def __init__(self, name: str, a: Assume, cpu_rate: float | None = None):
        self.name, self.a = name, a
        if cpu_rate is not None:  # a CPU worker at a measured FLOP rate; no GPU-only terms
            self.mm = self.fp32 = self.fp64 = cpu_rate
            self.hbm = None
        else:
            g = GPUS[name]
            self.mm, self.fp32, self.fp64 = (g[k] * a.efficiency for k in ("bf16", "fp32", "fp64"))
            self.hbm = g["hbm"] * a.bw_efficiency

    def fwd(self, c: UnitCost) -> float:
        return c.flops / self.mm


def search_seconds(method: str, block: Sequence[UnitCost], dev: Device, a: Assume, acts: bool = False) -> float:
    """Compute time of one block search on ``dev`` (no I/O), from the counts above and the unit forward times."""
    fwd = [dev.fwd(c) for c in block]
    tail = [sum(fwd[u:]) for u in range(len(block))]  # an evaluation starting at unit u
    whole = tail[0]
    lin = [c.linears for c in block]
    if method == "rtn":
        return whole
    if method == "clip":
        coords = [tail[u] for u, n in enumerate(lin) for _ in range(n)] * (2 if acts else 1)
        return (2 + (2 if acts else 0)) * whole + a.epochs * (P - 1) * sum(coords)
    if method == "learned":
        t = 2 * whole + a.iters * 3 * whole * BATCH / SAMPLES
        if dev.hbm:
            t += a.iters * a.soft_weight_bytes * sum(c.params for c in block) / dev.hbm
        if acts:  # static ranges: a clip search over the activation coordinates first
            t += 2 * whole + a.epochs * (P - 1) * sum(tail[u] for u, n in enumerate(lin) for _ in range(n))
        return t
    if method == "gptq":
        return sum(4 * f + c.hessian_flops / dev.fp64 + c.gptq_flops / dev.fp32 + c.columns * a.gptq_column_s
                   for f, c in zip(fwd, block))
    raise ValueError(method)


def out_gb(c: UnitCost) -> float:
    """A unit's output over the calibration set, 16-bit."""
    return SAMPLES * c.tokens * c.width * 2 / GB


def inputs_gb(block: Sequence[UnitCost], quantized: bool) -> float:
    """What a block task receives: its first unit's captured input and its last unit's FP output (16-bit), and
    under quantized propagation the upstream block's quantized output too."""
    first = SAMPLES * block[0].tokens * block[0].in_width * 2 / GB
    return first * (2 if quantized else 1) + out_gb(block[-1])


def block_io(block: Sequence[UnitCost], a: Assume, quantized: bool) -> float:
    """Per block task: start, read its units' weights from storage, fetch its inputs (first unit's calls and
    last unit's FP outputs; under quantized propagation also the upstream block's output), write its shard."""
    weights = sum(c.bytes for c in block) / a.per_task_storage
    inputs = inputs_gb(block, quantized) * GB / a.per_task_network
    shard = sum(c.quant_bytes for c in block) / a.per_task_storage
    return a.task_start_s + weights + inputs + shard


def schedule(blocks: list[tuple[int, ...]], stream_of: dict, cost: list[float], out_cost: list[float],
             workers: int, quantized: bool) -> float:
    """Wall time of cluster/fanout.py: blocks submitted in order, at most ``workers`` in flight (a task waiting on
    its upstream block holds a slot but not a GPU); under quantized propagation a block starts once the block
    before it in its stream has finished and produced its output."""
    running: list[tuple[float, int]] = []  # (finish, block)
    finish: dict[int, float] = {}
    now = 0.0
    for i, b in enumerate(blocks):
        if len(running) >= workers:
            now, _ = heapq.heappop(running)
        upstream = finish.get(i - 1, 0.0) if quantized and i > 0 and stream_of[blocks[i - 1][0]] == stream_of[b[0]] else 0.0
        has_next = quantized and i + 1 < len(blocks) and stream_of[blocks[i + 1][0]] == stream_of[b[0]]
        end = max(now, upstream) + cost[i] + (out_cost[i] if has_next else 0.0)
        finish[i] = end
        heapq.heappush(running, (end, i))
    return max(finish.values())


def ltable(headers: list[str], rows: list[list], left: set[int]) -> str:
    """A fixed-width table whose columns in ``left`` (and the first) are left-aligned, the rest right-aligned."""
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 or i in left else c.rjust(w)
                              for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([fmt(headers), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]])


def fmt_s(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=2, help="calibration samples for the CPU measurements")
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 256], help="tokens per sample, forward timing")
    parser.add_argument("--search-tokens", type=int, default=128, help="tokens per sample for the CPU block search")
    parser.add_argument("--skip-search", action="store_true", help="skip the 13B-shape block search (~4 min)")
    parser.add_argument("--gpu-efficiency", type=float, default=0.4)
    parser.add_argument("--draws", type=int, default=500, help="dependency series drawn for the typical block mix")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    a = Assume(efficiency=args.gpu_efficiency)
    t_all = time.perf_counter()
    print(f"torch {torch.__version__}, {args.threads} torch threads on {os.cpu_count()} cores; no GPU in this run; "
          f"percentiles {list(PERCENTILES)}; W4 g128 symmetric\n")

    # ---- part 1
    t = time.perf_counter()
    torch.set_num_threads(1)  # tiny matmuls: a second thread only waits on the shared cores; counts do not depend on it
    rows, seen = verify_counts(args.seed)
    torch.set_num_threads(args.threads)
    print(f"1. Evaluation counts: formula vs measured (random Llama, hidden 256, MLP 768, 4 heads, 7 linears per "
          f"layer; {seen['batches']} batches of 2 x 32 tokens;\n   real qvlm.search.search_block at 1 torch thread; "
          f"unit fwd = calls of a unit on one batch, counted by wrapping qvlm's call_unit; {time.perf_counter() - t:.0f} s)")
    print(ltable(["search", "depth", "linears/unit", "setting", "passes run", "evals formula", "evals measured",
                  "unit fwd formula", "unit fwd measured", "s", "check"], rows, {10}))
    print("formulas (d = block depth, L_u = linears of unit u, P = 5 percentiles, E = passes run, n = batches):\n"
          "  rtn      evaluations 1;                 unit forwards n*d\n"
          "  clip     evaluations 2 + E*C*(P-1);      unit forwards n*(2d + E*(P-1)*sum_coords(d-u)); C = sum L_u "
          "(x2 with static activation ranges, which also add 2d)\n"
          "  learned  evaluations 2 (3 if learning did not help), n*d each; plus iters steps of d units forward+"
          "backward on ONE batch, not in `evaluations`\n"
          "  gptq     evaluations 2;                 unit forwards 4*n*d (refresh, capture, next-unit input, "
          "refresh); one Hessian + GPTQ solve per linear\n")

    # ---- part 2
    t = time.perf_counter()
    m = measure_layer(args.tokens, args.samples, args.search_tokens, not args.skip_search, args.seed)
    print(f"2. Measured on this CPU: one LlamaDecoderLayer at the 13B shape (5120 / 13824 / 40 heads, float32, "
          f"random weights, 317M linear weights), torch threads {args.threads}, shared machine; "
          f"{time.perf_counter() - t:.0f} s; peak RSS {m['rss'] / 2**30:.1f} GiB")
    print(ltable(["what", "kind", "seconds", "spread / note", "GFLOP", "GFLOP/s"], m["rows"], {3}))
    cpu_rate = m["cpu_rate"]
    print(f"FLOPs: 2 x 317.2M x tokens for the linears + 4 x T^2 x 5120 per sample for attention (QK^T and AV, "
          f"full square); forward + backward with weight gradients = 3x. CPU rate used below: {cpu_rate / 1e9:.1f} "
          f"GFLOP/s (fastest forward of {args.samples} x {max(args.tokens)} tokens, float32; other processes share "
          "the 2 cores).\n")

    # ---- part 3
    plan, quant, costs, activation_bytes, quantized_bytes = plan_llava13b(a.gpus)
    streams = plan.streams
    seg_rows = []
    for seg, label in (("vision", "CLIP ViT-L/14-336 layer"), ("projector", "projector 1024->5120->5120"),
                       ("language", "Llama decoder layer 5120/13824")):
        cs = [c for c in costs if c.segment == seg]
        c = cs[0]
        h100, a100 = Device("H100", a), Device("A100", a)
        seg_rows.append([label, len(cs), c.linears, f"{c.params / 1e6:.1f}", c.tokens, f"{SAMPLES * c.tokens}",
                         f"{c.flops / 1e12:.2f}", fmt_s(c.flops / cpu_rate), f"{h100.fwd(c) * 1e3:.0f} ms",
                         f"{a100.fwd(c) * 1e3:.0f} ms"])
    q_bytes = quantized_bytes(plan, quant)
    print(f"3. LLaVA-13B (meta skeleton of LlavaForConditionalGeneration, float16, no weights): {len(plan.units)} "
          f"units in {len(streams)} streams, {plan.total_bytes / GB:.1f} GB of tensors, checkpoint at W4 g128 "
          f"{q_bytes / GB:.2f} GB (cluster.plan.quantized_bytes: WeightScheme.storage_bits of every unit linear, "
          f"lm_head ignored as by default, the rest unchanged)")
    print(f"calibration: the paper's {SAMPLES} samples, batch {BATCH}; tokens per sample: decoder {IMAGE_TOKENS} image "
          f"+ {TEXT_TOKENS} text, vision tower {VISION_TOKENS} (CLS + 576 patches), projector {IMAGE_TOKENS}")
    print(table(["unit", "count", "linears", "linear params M", "tokens/sample", "tokens", "TFLOP per unit fwd",
                 "CPU (measured rate)", f"H100 @{a.efficiency:.0%}", f"A100 @{a.efficiency:.0%}"], seg_rows))
    stage_rows = []
    for s, st in enumerate(plan.stages):
        acts32 = activation_bytes(plan, s, SAMPLES, IMAGE_TOKENS + TEXT_TOKENS)
        stage_rows.append([s, f"{st[0]}..{st[-1]}", len(st), f"{plan.stage_bytes(s) / GB:.2f}", f"{acts32 / GB:.1f}",
                           f"{acts32 / 2 / GB:.1f}"])
    print(f"\nstages for {a.gpus} workers (cluster.plan.split_stages, balanced by bytes; stage 0 also holds the glue: "
          "embeddings, lm_head, norms, vision stem)")
    print(table(["stage", "units", "n", "weights GB", "captures GB (plan.py, fp32)", "captures GB (16-bit)"], stage_rows))
    print("plan.py's activation_bytes counts fp32; a float16 model captures in float16, so the last column is what "
          "a stage would hold.\n")

    # ---- part 4: blocks
    stream_of = {i: s for s, st in enumerate(streams) for i in st}
    draws = typical_blocks(streams, args.draws, args.seed)
    mixes = {"all depth 1": [fixed_blocks(streams, 1)], "typical (iid series)": draws, "all depth 3": [fixed_blocks(streams, 3)]}
    mix_rows = []
    for name, ds in mixes.items():
        n = statistics.mean(len(d) for d in ds)
        lang = [b for d in ds for b in d if costs[b[0]].segment == "language"]
        by_depth = {k: sum(len(b) == k for b in lang) / len(ds) for k in (1, 2, 3)}
        vis = statistics.mean(sum(costs[b[0]].segment == "vision" for b in d) for d in ds)
        mix_rows.append([name, f"{n:.1f}", f"{vis:.1f}", 1,
                         " / ".join(f"{by_depth[k]:.1f}" for k in (1, 2, 3))])
    print(f"4a. Blocks (max_block_depth 3; streams: vision 24, projector 1, decoder 40). 'typical' = mean over "
          f"{args.draws} iid uniform dependency series per stream with h0 = the series mean (qvlm.partition); a "
          "series that trends with depth gives more depth-1 blocks (40 decoder layers -> 27 blocks for a linear ramp)")
    print(table(["mix", "blocks", "vision blocks", "projector", "decoder blocks of depth 1 / 2 / 3"], mix_rows))

    # ---- part 4: per-block times
    h100, a100 = Device("H100", a), Device("A100", a)
    cpu = Device("CPU", a, cpu_rate)
    lang = next(c for c in costs if c.segment == "language")
    vis = next(c for c in costs if c.segment == "vision")
    proj = next(c for c in costs if c.segment == "projector")
    methods = [("rtn", False), ("clip", False), ("clip", True), ("learned", False), ("gptq", False)]
    label = lambda meth, acts: {"clip": f"clip W4{'A4' if acts else ''} (E={a.epochs})", "learned": f"learned ({a.iters} it)"}.get(meth, meth)
    block_rows = []
    for name, block in (("decoder, depth 1", [lang]), ("decoder, depth 2", [lang] * 2), ("decoder, depth 3", [lang] * 3),
                        ("vision, depth 1", [vis]), ("vision, depth 3", [vis] * 3), ("projector", [proj])):
        for meth, acts in methods:
            if meth in ("rtn", "gptq") and len(block) > 1:
                continue  # the baselines search one unit per block
            lin = [c.linears for c in block]
            if meth == "clip":
                ev, uf = clip_count(lin, a.epochs, acts)
                count = f"{ev} / {uf}"
            elif meth == "learned":
                _, uf, steps = learned_count(lin, a.iters)
                count = f"2 / {uf} + {steps} fb on 1/8"
            elif meth == "rtn":
                count = f"1 / {rtn_count(lin)[1]}"
            else:
                count = f"2 / {gptq_count(lin)[1]} + Hessians"
            io = block_io(block, a, False)
            block_rows.append([name, label(meth, acts), count, fmt_s(search_seconds(meth, block, cpu, a, acts)),
                               fmt_s(search_seconds(meth, block, h100, a, acts)), fmt_s(search_seconds(meth, block, a100, a, acts)),
                               f"{io:.1f} s", fmt_s(search_seconds(meth, block, h100, a, acts) + io)])
    print("\nassumptions (bench/projection.py: Assume): " + ", ".join(f"{k}={v:g}" for k, v in a.__dict__.items())
          + "; GPU peaks (dense, SXM): " + "; ".join(f"{g} " + ", ".join(f"{k} {v / 1e12:g}T" for k, v in d.items())
                                                   for g, d in GPUS.items()))
    print(f"\n4b. Time per block (compute of the search on one device, from the counts of part 1 at the paper's "
          f"calibration set; I/O = task start {a.task_start_s:.0f} s + its weights from storage at "
          f"{a.per_task_storage / GB:.2f} GB/s + 2 activation tensors at {a.per_task_network / GB:.2f} GB/s + "
          "its shard)")
    print(table(["block", "search", "evals / unit fwd", "CPU (meas. rate)", "H100", "A100", "I/O",
                 "H100 + I/O"], block_rows))
    print(f"learned: each step = forward + backward (3x a forward) of the block on one batch of {BATCH} samples, plus "
          f"{a.soft_weight_bytes:.0f} B per weight of soft-weight traffic at {a.bw_efficiency:.0%} of HBM bandwidth "
          f"({fmt_s(a.iters * a.soft_weight_bytes * lang.params / h100.hbm)} per decoder layer on an H100); gptq: "
          f"fp64 Hessians ({lang.hessian_flops / 1e12:.0f} TFLOP per decoder layer) at {a.efficiency:.0%} of fp64 peak, "
          f"{lang.columns} columns x {a.gptq_column_s * 1e3:.1f} ms launch-bound loop.")

    # ---- part 4: the job on 8 GPUs
    def search_wall(meth: str, dev: Device, quantized: bool, acts: bool = False, with_io: bool = True,
                    mix=None, assume: Assume = a) -> tuple[float, float]:
        """(wall, one device's serial time) averaged over the block mix."""
        walls, serial = [], []
        depth1 = meth in ("rtn", "gptq")
        for blocks in ([fixed_blocks(streams, 1)] if depth1 else (mix or draws)):
            cost, out = [], []
            for b in blocks:
                bc = [costs[i] for i in b]
                cost.append(search_seconds(meth, bc, dev, assume, acts) + (block_io(bc, assume, quantized) if with_io else 0.0))
                out.append(sum(dev.fwd(c) for c in bc) + out_gb(bc[-1]) * GB / assume.per_task_network)
            walls.append(schedule(blocks, stream_of, cost, out, a.gpus, quantized))
            serial.append(sum(cost))
        return statistics.mean(walls), statistics.mean(serial)

    total_gb = plan.total_bytes / GB
    nodes = a.gpus // a.gpus_per_node
    largest = max(plan.stage_bytes(s) for s in range(len(plan.stages)))
    load_s = largest / a.per_task_storage
    n_batches = SAMPLES // BATCH
    hop_gb = BATCH * (IMAGE_TOKENS + TEXT_TOKENS) * 5120 * 2 / GB  # one batch's hidden state, 16-bit

    def capture_seconds(dev: Device) -> float:
        """Pipeline of n_batches through the stages: (batches + stages - 1) steps of the slowest stage's batch."""
        per_batch = max(sum(dev.fwd(costs[i]) for i in st) / n_batches for st in plan.stages)
        return (n_batches + len(plan.stages) - 1) * (per_batch + hop_gb * GB / (a.network_gbps * GB))

    capture_moved = hop_gb * n_batches * (len(plan.stages) - 1)
    typical_inputs = statistics.mean(sum(inputs_gb([costs[i] for i in b], False) for b in d) for d in draws)
    linears_q = sum(c.quant_bytes for c in costs)
    unquantized = plan.total_bytes - sum(c.params for c in costs) * 2
    export_s = (linears_q + unquantized + q_bytes) / (a.storage_gbps * GB)
    fixed = {d.name: a.stage_start_s + load_s + capture_seconds(d) + export_s for d in (h100, a100)}
    phase_rows = [
        ["stage actors start", f"assumed {a.stage_start_s:.0f} s (process, imports, CUDA context)", fmt_s(a.stage_start_s),
         fmt_s(a.stage_start_s)],
        ["load weights", (f"{total_gb:.1f} GB read once, split over {len(plan.stages)} stages (largest "
                          f"{largest / GB:.1f} GB); {a.storage_gbps:g} GB/s per node shared by its {a.gpus_per_node} "
                          "stages"), fmt_s(load_s), fmt_s(load_s)],
        ["capture", (f"one FP forward of {SAMPLES} samples pipelined in {n_batches} batches over {len(plan.stages)} "
                     f"stages; {capture_moved:.1f} GB of hidden states cross stage boundaries at {a.network_gbps:g} GB/s"),
         fmt_s(capture_seconds(h100)), fmt_s(capture_seconds(a100))],
        ["statistics, dependency, partition", "not estimated (kurtosis/sensitivity per linear, D(k,k+1) per unit)", "-", "-"],
        ["block inputs moved", (f"{typical_inputs:.1f} GB for the typical mix (per block: first unit's input + last "
                                "unit's FP output, 16-bit); in each block's I/O"), "in search", "in search"],
    ]
    totals = []
    for meth, acts, quantized in (("rtn", False, False), ("gptq", False, False), ("clip", False, False), ("clip", False, True),
                                  ("clip", True, False), ("learned", False, False), ("learned", False, True)):
        wall_h, serial_h = search_wall(meth, h100, quantized, acts)
        wall_a, _ = search_wall(meth, a100, quantized, acts)
        name = f"search: {label(meth, acts)}, propagation {'quantized' if quantized else 'fp'}"
        phase_rows.append([name, f"fanout.py's schedule on {a.gpus} GPUs; one H100 alone: {fmt_s(serial_h)}",
                           fmt_s(wall_h), fmt_s(wall_a)])
        if meth in ("clip", "learned") and not acts:
            totals.append([f"TOTAL, {label(meth, acts)}, propagation {'quantized' if quantized else 'fp'}",
                           "start + load + capture + search + export", fmt_s(fixed["H100"] + wall_h),
                           fmt_s(fixed["A100"] + wall_a)])
    phase_rows.append(["export", (f"one task reads {(linears_q + unquantized) / GB:.1f} GB (shards + unquantized "
                                  f"tensors) and writes the {q_bytes / GB:.1f} GB checkpoint at {a.storage_gbps:g} GB/s"),
                       fmt_s(export_s),
                       fmt_s(export_s)])
    phase_rows.append(["evaluation", "skipped for models over 4 GiB (workers/eval_task.py)", "-", "-"])
    phase_rows += totals
    cpu_wall, _ = search_wall("clip", cpu, False, with_io=False)
    phase_rows.append(["today's code: search clip (fp) on CPU",
                       (f"block searches compute on the CPU (README, Known limits): {a.gpus} workers x {args.threads} "
                        f"cores at the measured {cpu_rate / 1e9:.0f} GFLOP/s (float32)"),
                       fmt_s(cpu_wall), ""])
    print(f"\n4c. LLaVA-13B on {a.gpus} GPUs ({nodes} nodes x {a.gpus_per_node}), W4 g128, method qvlm, typical block mix "
          f"(search rows average {len(draws)} draws); matmuls at {a.efficiency:.0%} of dense peak "
          f"(H100 {GPUS['H100']['bf16'] / 1e12:.0f}, A100 {GPUS['A100']['bf16'] / 1e12:.0f} TFLOP/s bf16)")
    print(ltable(["phase", "H100 x8", "A100 x8", "assumption"], [[r[0], r[2], r[3], r[1]] for r in phase_rows], {3}))
    upstream = statistics.mean(sum(inputs_gb([costs[i] for i in blk], True) - inputs_gb([costs[i] for i in blk], False)
                                   for k, blk in enumerate(d) if k and stream_of[d[k - 1][0]] == stream_of[blk[0]])
                               for d in draws)
    moved = [["model weights read by the stage actors", f"{plan.total_bytes / GB:.1f}", "load"],
             ["hidden states between stages during capture", f"{capture_moved:.1f}", "capture"],
             ["block inputs, captured (typical mix)", f"{typical_inputs:.1f}", "search (block I/O)"],
             ["  + upstream outputs, propagation quantized only", f"{upstream:.1f}", "search (block I/O)"],
             ["unit weights re-read by the block tasks", f"{sum(c.bytes for c in costs) / GB:.1f}", "search (block I/O)"],
             ["block shards written", f"{linears_q / GB:.1f}", "search (block I/O)"],
             ["export reads (shards + unquantized tensors)", f"{(linears_q + unquantized) / GB:.1f}", "export"],
             ["checkpoint written", f"{q_bytes / GB:.1f}", "export"]]
    print("\ndata moved (GB, 16-bit activations)")
    print(ltable(["what", "GB", "counted in"], moved, {2}))
    lo, _ = search_wall("clip", h100, False, mix=[fixed_blocks(streams, 1)])
    hi, _ = search_wall("clip", h100, False, mix=[fixed_blocks(streams, 3)])
    print(f"clip (fp) search on H100 x8 over the block-mix range: all depth 1 {fmt_s(lo)} ... all depth 3 {fmt_s(hi)}")
    if seen["passes"]:
        early = max(seen["passes"])
        a_early = Assume(**{**a.__dict__, "epochs": early})
        wall_e, _ = search_wall("clip", Device("H100", a_early), False, assume=a_early)
        print(f"if clip stops after {early} passes, as the 10-epoch runs in part 1 did (random weights, "
              f"passes {seen['passes']}): clip (fp) search {fmt_s(wall_e)} on H100 x8")
    print(f"\nwhole script: {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
