"""The held-out evaluation through a job's stages against the whole-model evaluation of the same checkpoint.

    .venv/bin/python bench/evaluation.py [--workers 1 2] [--eval-samples 16] [--wide-layers 0]

For each worker count, one job (``method: rtn`` W4 g128: the search is not what is measured) on its own fresh
local Ray, whose report gives the figures and ``seconds.evaluate``: the held-out batches through the stage actors,
which already hold their weights (cluster/evaluation.py). Then, in this process, the whole-model evaluation of the
written checkpoint (workers/eval_task.py: the source and the checkpoint loaded with ``from_pretrained``, then both
run on the same batches), timed with and without the loading. Models: the trained tiny LLaVA (bench/trained.py)
with images and answers; with ``--wide-layers N`` also a random float16 Llama at LLaVA-13B's decoder width with N
layers (bench/memory.py), text only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import ray
import torch

from _common import CACHE, init_ray, settings, table
from cluster.driver import run_job
from memory import WIDE, ensure_model, write_calibration
from qvlm.batches import records_for
from qvlm.config import CalibrationSettings, QuantConfig
from qvlm.evaluate import evaluate_records
from qvlm.quant import WeightScheme
from trained import cached_model
from workers.eval_task import load_whole

QUANT = QuantConfig(method="rtn", weights=WeightScheme(4, 128))


def staged(model_dir: Path, out: Path, cal: CalibrationSettings, workers: int) -> dict:
    init_ray(max(2, workers + 1))
    try:
        run_job(settings(model_dir, out, cal, QUANT, workers), echo=lambda *a, **k: None)
    finally:
        ray.shutdown()
    report = json.loads((out / "qvlm_report.json").read_text())
    plan = json.loads((out / "qvlm_plan.json").read_text())
    return {"figures": report["evaluation"], "seconds": plan["seconds"]["evaluate"]}


def whole(model_dir: Path, out: Path, cal: CalibrationSettings) -> dict:
    """workers/eval_task.py's evaluate_folders, step by step: loading both models, then the comparison."""
    t = time.perf_counter()
    fp, q, processor = load_whole(model_dir, out)
    loaded = time.perf_counter()
    result = evaluate_records(fp, q, processor, records_for(cal)[1], cal.max_length, cal.batch_size)
    done = time.perf_counter()
    return {"figures": vars(result), "seconds": done - t, "compare": done - loaded}


def rows_for(name: str, model_dir: Path, cal: CalibrationSettings, workers: list[int]) -> list[list]:
    rows = []
    for w in workers:
        tmp = Path(tempfile.mkdtemp(prefix="qvlm-bench-eval-"))
        try:
            s = staged(model_dir, tmp / "out", cal, w)
            m = whole(model_dir, tmp / "out", cal)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        f, g = s["figures"], m["figures"]
        rows.append([f"{name}, {w} stage(s)", f["tokens"], f"{f['kl_mean']:.5g}", f"{g['kl_mean']:.5g}",
                     f"{f['top1_agreement']:.4f}", f"{g['top1_agreement']:.4f}", _acc(f), _acc(g),
                     f"{s['seconds']:.2f}", f"{m['compare']:.2f}", f"{m['seconds']:.2f}",
                     f"{m['compare'] / s['seconds']:.2f}"])
    return rows


def _acc(f: dict) -> str:
    return "-" if f["q_accuracy"] is None else f"{f['fp_accuracy']:.3f}/{f['q_accuracy']:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--wide-layers", type=int, default=0)
    parser.add_argument("--wide-tokens", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as a stage actor with cpus_per_worker 1 computes
    rows = rows_for("trained tiny LLaVA", cached_model("llava"),
                    CalibrationSettings(samples=8, eval_samples=args.eval_samples, max_length=128, batch_size=4), args.workers)
    if args.wide_layers:
        folder = CACHE / "eval-bench"
        folder.mkdir(parents=True, exist_ok=True)
        model = ensure_model(CACHE / f"llama-wide-{args.wide_layers}", args.wide_layers, WIDE, seed=0)
        data = write_calibration(folder, 4 + args.eval_samples, args.wide_tokens)
        cal = CalibrationSettings(data=str(data), samples=4, eval_samples=args.eval_samples,
                                  max_length=args.wide_tokens + 2, batch_size=4)
        rows += rows_for(f"fp16 Llama 5120 x {args.wide_layers}", model, cal, args.workers)
    print(table(["model", "positions", "KL stages", "KL whole", "top-1 stages", "top-1 whole", "acc stages",
                 "acc whole", "s stages", "s whole", "s whole+load", "whole/stages"], rows))
    print("s stages: seconds.evaluate of the job (the stages hold their weights); s whole: the same comparison of "
          "the two whole models in one process; s whole+load: with loading both with from_pretrained; "
          "whole/stages: s whole / s stages")


if __name__ == "__main__":
    main()
