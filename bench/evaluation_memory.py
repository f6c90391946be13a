"""Memory of a stage's held-out evaluation (issue 16): one 13B-wide decoder layer as the first stage holds it.

    .venv/bin/python bench/evaluation_memory.py [--tokens 512] [--batch 8]

The first stage of bench/memory.py's wide float16 Llama cut in 4 (its first decoder layer and the glue, loaded
as a stage actor loads it: ``workers.model_shard.ModelShard``), in a process that gives freed pages back as a
stage actor does (workers/host_memory.py). Its seven linears get an RTN W4 g128 result, then
``Stage.prepare_evaluation`` and one held-out batch of ``--batch`` x ``--tokens`` through the full-precision and
the quantized pass, finished by the head as the job does. Prints the peak RSS above the RSS before the
evaluation (the kernel's high-water mark reset before it), what the preparation left held, and the figures.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from _common import CACHE, MIB
from cluster.plan import make_plan
from memory import WIDE, PhaseMeter, ensure_model, write_calibration
from qvlm.batches import calibration_batches
from qvlm.config import CalibrationSettings, QuantConfig
from qvlm.evaluate import Comparison
from qvlm.quant import WeightScheme, quantize_weight
from qvlm.search import BlockResult, LinearResult
from qvlm.stage import Stage
from workers.host_memory import return_freed_memory
from workers.model_shard import ModelShard
from workers.safetensors_reader import CheckpointIndex
from workers.storage import LocalStorage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    return_freed_memory()  # as a stage actor does
    torch.set_num_threads(1)
    model_dir = ensure_model(CACHE / "llama-wide-4", 4, WIDE, 0)
    with tempfile.TemporaryDirectory() as folder:
        cal = CalibrationSettings(str(write_calibration(Path(folder), args.batch, args.tokens)), args.batch, 0,
                                  args.tokens, args.batch, 0)
        batches = calibration_batches(str(model_dir), cal)
    quant = QuantConfig(method="rtn")
    plan = make_plan(str(model_dir), CheckpointIndex.open(LocalStorage(model_dir)), quant, 4, args.tokens)
    units = [plan.units[i] for i in plan.stages[0]]
    shard = ModelShard(LocalStorage(model_dir), [u.name for u in units], True, [u.name for u in plan.units])
    stage = Stage(shard.model, units, first=True)
    names = [f"{u.name}.{n}" for u in units for n in u.linears]
    linears = tuple(LinearResult(n, quantize_weight(shard.model.get_submodule(n).weight.detach(), WeightScheme()),
                                 None, 1.0, None) for n in names)
    result = BlockResult(tuple(u.name for u in units), linears, 0.0, 0.0, 1, 0.0)
    weights = sum(shard.model.get_submodule(n).weight.numel() for n in names)
    meter = PhaseMeter()
    meter.mark("before")  # resets the high-water mark
    start = time.perf_counter()
    stage.prepare_evaluation([result], quant.activations, Comparison(batches[:1], [[None] * args.batch]))
    meter.mark("prepare_evaluation")
    for quantized in (False, True):
        stage.evaluate_head(0, stage.evaluate_forward(0, quantized), quantized)
    meter.mark("one batch, full precision and quantized")
    seconds = time.perf_counter() - start
    before = meter.rows[0][2]
    prepared, passes = meter.rows[1], meter.rows[2]
    peak = max(prepared[1], passes[1])
    print(f"one 13B-wide layer as stage 0 of 4 ({weights / 1e6:.0f} M linear weights, float16, W4 g128; one batch of "
          f"{args.batch} x {args.tokens} tokens): prepare_evaluation holds {(prepared[2] - before) / MIB:+.0f} MiB "
          f"(peak {(prepared[1] - before) / MIB:+.0f}); the evaluation peaks {(peak - before) / MIB:+.0f} MiB over the "
          f"RSS before it; {seconds:.1f} s; {stage.evaluation()}")


if __name__ == "__main__":
    main()
