"""Wall time per phase of one tiny-LLaVA job at 1, 2 and 4 workers, and run_job vs one process.

    .venv/bin/python bench/scaling.py [--workers 1 2 4] [--search clip learned] [--samples 32] [--epochs 4]

All runs share one local Ray with ``--num-cpus`` logical CPUs (4 by default, so 4 workers can be placed
even on a 2-core machine). ``--modes capped`` also holds the CPUs beyond ``workers`` so the block searches can use only ``workers`` CPUs.
A warm-up job (rtn, max workers) runs first so Ray's task workers have
imported torch before any timed run.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager
from pathlib import Path

import ray
import torch
from transformers import LlavaForConditionalGeneration

from _common import CACHE, init_ray, table, timed_job
from qvlm.config import CalibrationSettings, QuantConfig
from qvlm.batches import calibration_batches
from qvlm.driver import quantize
from qvlm.quant import WeightScheme
from qvlm.tiny import build_tiny_llava

PHASES = ("load", "capture", "statistics", "search", "export", "total")


def quant_config(search: str, epochs: int, iters: int) -> QuantConfig:
    return QuantConfig(method="qvlm", weights=WeightScheme(4, 128), search=search, epochs=epochs, iters=iters)


def one_process(model_dir: Path, cal: CalibrationSettings, quant: QuantConfig, threads: int) -> dict:
    """qvlm.driver.quantize in this process: load + batches + quantize, with ``threads`` torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t = time.perf_counter()
        model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
        batches = calibration_batches(model_dir, cal)
        t_q = time.perf_counter()
        _, result = quantize(model, batches, quant)
        end = time.perf_counter()
    finally:
        torch.set_num_threads(before)
    return {"seconds": result.seconds, "quantize": end - t_q, "wall": end - t, "blocks": len(result.blocks)}


@contextmanager
def cpu_cap(workers: int, num_cpus: int, capped: bool):
    """Hold the Ray CPUs beyond ``workers`` in a placement group, so the job (stages, then block tasks)
    can use only ``workers`` CPUs; run_job itself does not bound the block fan-out by ``workers``."""
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([{"CPU": 1}] * (num_cpus - workers)) if capped and num_cpus > workers else None
    if pg is not None:
        ray.get(pg.ready())
    try:
        yield
    finally:
        if pg is not None:
            remove_placement_group(pg)


def capped_job(model_dir: Path, cal, quant: QuantConfig, workers: int, num_cpus: int, capped: bool) -> dict:
    with cpu_cap(workers, num_cpus, capped):
        return timed_job(model_dir, cal, quant, workers)


def scaling_rows(search: str, mode: str, runs: dict, single: dict) -> list[list]:
    base = runs[min(runs)]["seconds"]["search"]
    rows = []
    for w, r in runs.items():
        s = r["seconds"]
        rows.append([search, mode, w, r["blocks"], *(f"{s[p]:.2f}" for p in PHASES), f"{r['wall']:.2f}",
                     f"{s['search'] / base:.2f}", *(f"{r['wall'] / single[t]['wall']:.2f}" for t in sorted(single))])
    return rows


def single_rows(search: str, single: dict) -> list[list]:
    return [[search, t, r["blocks"], *(f"{r['seconds'][p]:.2f}" for p in ("capture", "statistics", "partition", "search")),
             f"{r['quantize']:.2f}", f"{r['wall']:.2f}"] for t, r in sorted(single.items())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=CACHE / "tiny-llava")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--search", nargs="+", choices=["clip", "learned"], default=["clip", "learned"])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--iters", type=int, default=50, help="learned: optimisation steps per block")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    parser.add_argument("--modes", nargs="+", choices=["shared", "capped"], default=["shared"],
                        help="shared: run_job as is (at most `workers` block searches in flight); capped: also hold the "
                             "CPUs beyond `workers` with a placement group")
    parser.add_argument("--threads", type=int, nargs="+", default=[1],
                        help="torch threads for the one-process runs (Ray gives each 1-CPU worker 1 thread)")
    args = parser.parse_args()
    if not (args.model_dir / "config.json").exists():
        build_tiny_llava(args.model_dir, seed=0)
    cal = CalibrationSettings(samples=args.samples, eval_samples=0, max_length=64, batch_size=8)
    threads = sorted(set(args.threads))
    print(f"tiny LLaVA at {args.model_dir}; W4 g128, method qvlm, epochs {args.epochs}, iters {args.iters}; "
          f"calibration builtin:shapes, {args.samples} samples, batch 8, max_length 64")
    print(f"one local Ray, {args.num_cpus} logical CPUs on {os.cpu_count()} cores, 1 CPU per worker/task "
          f"(Ray runs each worker with 1 torch thread); one-process runs at torch threads {threads}")
    print("mode shared: run_job as is (at most `workers` block searches in flight); mode capped: the CPUs beyond "
          "`workers` are also held by a placement group during the run\n")
    init_ray(args.num_cpus)
    try:
        timed_job(args.model_dir, cal, QuantConfig(method="rtn"), max(args.workers))  # warm-up, not reported
        scaling, singles = [], []
        for search in args.search:
            quant = quant_config(search, args.epochs, args.iters)
            single = {t: one_process(args.model_dir, cal, quant, t) for t in threads}
            for mode in args.modes:
                runs = {w: capped_job(args.model_dir, cal, quant, w, args.num_cpus, mode == "capped") for w in args.workers}
                scaling += scaling_rows(search, mode, runs, single)
            singles += single_rows(search, single)
    finally:
        ray.shutdown()
    print("run_job, seconds per phase (outcome.seconds: 'load' = starting the stage actors, each reading its weights; "
          "'export' = writing the checkpoint; 'total' also has planning and evaluation (off here); 'wall' = the whole "
          "run_job call)")
    print(table(["search", "mode", "workers", "blocks", *PHASES, "wall", "search/1w",
                 *(f"wall/1proc@{t}t" for t in threads)], scaling))
    print("\nqvlm.driver.quantize in one process, seconds (wall = load model + calibration batches + quantize)")
    print(table(["search", "threads", "blocks", "capture", "statistics", "partition", "search", "quantize", "wall"], singles))


if __name__ == "__main__":
    main()
