"""Peak memory of the stage actors (and the driver) for a ~1 GB random-weight Llama, by worker count.

    .venv/bin/python bench/memory.py [--workers 1 2 4] [--layers 12] [--samples 8]

Each run is a ``method: rtn`` job (no search, so the stages' memory is what matters) on its own fresh
local Ray with 4 logical CPUs, so no Ray worker process (and its ru_maxrss) carries over between runs.
The baseline (Python + torch + transformers + Ray in one stage actor) is the stage RSS of the tiny LLaVA.
"""

from __future__ import annotations

import argparse
import multiprocessing
from pathlib import Path

import ray

from _common import CACHE, MIB, init_ray, own_peak_rss, table, timed_job
from qvlm.config import CalibrationSettings, QuantConfig
from qvlm.batches import calibration_batches


def build_llama(path: Path, layers: int, seed: int) -> None:
    """Random bf16 Llama (hidden 2048, MLP 5504, 16 heads, vocab 32000) with the shapes tokenizer beside it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qvlm.tiny import build_shapes_tokenizer

    tok = build_shapes_tokenizer()
    config = LlamaConfig(hidden_size=2048, intermediate_size=5504, num_hidden_layers=layers, num_attention_heads=16,
                         num_key_value_heads=16, vocab_size=32000, max_position_embeddings=256,
                         tie_word_embeddings=False, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    model.save_pretrained(path, max_shard_size="200MB")
    tok.save_pretrained(path)


def ensure_model(path: Path, layers: int, seed: int) -> Path:
    """Build in a child process so the driver's own peak RSS does not include the whole model."""
    if not (path / "config.json").exists():
        print(f"building the random Llama at {path} (once) ...", flush=True)
        child = multiprocessing.get_context("spawn").Process(target=build_llama, args=(path, layers, seed))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"building the model failed (exit {child.exitcode})")
    return path


def ensure_tiny(path: Path) -> Path:
    from qvlm.tiny import build_tiny_llava

    if not (path / "config.json").exists():
        build_tiny_llava(path, seed=0)
    return path


def one_run(model_dir: Path, cal: CalibrationSettings, workers: int, cpus: int) -> dict:
    init_ray(cpus)
    try:
        return timed_job(model_dir, cal, QuantConfig(method="rtn"), workers)
    finally:
        ray.shutdown()


def stage_rows(workers: int, run: dict, baseline: int) -> list[list]:
    plan = run["plan"]
    total = sum(s["weight_bytes"] for s in plan["stage_memory"])
    rows = []
    for i, s in enumerate(plan["stage_memory"]):
        rss = s["peak_rss_bytes"]
        rows.append([workers if i == 0 else "", i, len(plan["stages"][i]), f"{rss / MIB:.0f}", f"{s['weight_bytes'] / MIB:.0f}",
                     f"{total / MIB:.0f}", f"{rss / total:.2f}", f"{(rss - baseline) / MIB:.0f}",
                     f"{(rss - baseline) / max(s['weight_bytes'], 1):.2f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=CACHE / "llama-1gb")
    parser.add_argument("--tiny-dir", type=Path, default=CACHE / "tiny-llava")
    parser.add_argument("--layers", type=int, default=12, help="decoder layers of the random Llama (when built)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs given to each local Ray")
    args = parser.parse_args()
    model_dir = ensure_model(args.model_dir, args.layers, args.seed)
    cal = CalibrationSettings(samples=args.samples, eval_samples=0, max_length=64, batch_size=4, seed=args.seed)
    batches = calibration_batches(model_dir, cal)
    print(f"model {model_dir}; calibration builtin:shapes, {args.samples} samples in {len(batches)} batches of "
          f"input_ids {tuple(batches[0]['input_ids'].shape)}; method rtn; each run on a fresh local Ray with "
          f"{args.num_cpus} logical CPUs (the machine has {multiprocessing.cpu_count()} cores)")
    base_run = one_run(ensure_tiny(args.tiny_dir), cal, 1, args.num_cpus)
    baseline = base_run["plan"]["stage_memory"][0]["peak_rss_bytes"]
    tiny_w = base_run["plan"]["stage_memory"][0]["weight_bytes"]
    print(f"baseline: stage 0 of the tiny LLaVA (1 worker, {tiny_w / MIB:.1f} MiB of weights) peaks at "
          f"{baseline / MIB:.0f} MiB RSS: Python + torch + transformers + Ray runtime + calibration captures")
    print(f"driver peak RSS before the runs: {own_peak_rss() / MIB:.0f} MiB\n")
    rows, drivers = [], []
    for w in args.workers:
        run = one_run(model_dir, cal, w, args.num_cpus)
        rows += stage_rows(w, run, baseline)
        drivers.append([w, f"{run['wall']:.1f}", f"{own_peak_rss() / MIB:.0f}"])
    print(table(["workers", "stage", "units", "peak RSS MiB", "stage weights MiB", "model MiB", "RSS/model",
                 "RSS-baseline MiB", "(RSS-base)/stage w"], rows))
    print("\nRSS includes the runtime baseline above; subtract it to compare with the weights.\n")
    print(table(["workers", "job wall s", "driver peak RSS MiB (cumulative)"], drivers))


if __name__ == "__main__":
    main()
