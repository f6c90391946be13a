"""VEO through the stages: its time in one process (one stage, three stages) and in jobs on one and two stage
workers, on the trained tiny LLaVA, and whether every run tunes the same tower.

    .venv/bin/python bench/veo_stages.py [--samples 32] [--veo-epochs 4] [--threads 1]

In-process rows run ``qvlm.driver.optimize_vision_encoder`` (VEO alone) over stages in this process; job rows
run ``run_job`` on a fresh local Ray and read VEO's tuning time from the plan document and the tuned tower from
``_qvlm/veo.safetensors``. W4A4 (static per-channel input ranges, where VEO helps: BENCHMARKS.md "VEO"). Every
tower is compared with the one-stage in-process tower: integer codes that differ, and the largest relative
difference of a scale.
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

from _common import init_ray, quiet, settings, table
from cluster.driver import run_job
from qvlm.batches import calibration_answer_masks, calibration_batches
from qvlm.config import CalibrationSettings, QuantConfig, VeoConfig
from qvlm.driver import optimize_vision_encoder
from qvlm.method import select_units, unit_bits
from qvlm.quant import ActScheme, WeightScheme
from qvlm.search import linear_tensors
from trained import MAX_LENGTH, cached_model
from workers.shard import read_block
from workers.storage import LocalStorage
from workers.veo_record import VEO_RECORD_KEY, VeoRecord


def in_process(model_dir: Path, cal: CalibrationSettings, quant: QuantConfig, n_stages: int) -> tuple[float, dict]:
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    units = select_units(model, quant)
    schemes = {u.linear_name(n): quant.weights for u in units for n in u.linears}
    bits = {u.index: unit_bits(u, schemes, quant) for u in units}
    language = [u.index for u in units if u.segment == "language"]
    cut = [[u.index for u in units if u.segment != "language"] + language[:1]]
    cut += [list(part) for part in _split(language[1:], n_stages - 1)]
    batches, answers = calibration_batches(model_dir, cal), calibration_answer_masks(model_dir, cal)
    t = time.perf_counter()
    result = optimize_vision_encoder(model, batches, quant, schemes, bits, answers, stages=cut if n_stages > 1 else None)
    return time.perf_counter() - t, linear_tensors(result.block.linears)


def _split(items: list, parts: int) -> list[list]:
    size = -(-len(items) // max(parts, 1))
    return [items[k:k + size] for k in range(0, len(items), size)] if parts else []


def in_job(model_dir: Path, cal: CalibrationSettings, quant: QuantConfig, workers: int) -> tuple[float, dict]:
    tmp = Path(tempfile.mkdtemp(prefix="qvlm-bench-veo-"))
    out = tmp / "out"
    init_ray(max(2, workers + 1))
    try:
        run_job(settings(model_dir, out, cal, quant, workers), echo=quiet)
        storage = LocalStorage(out)
        record = VeoRecord.from_json(storage.get_bytes(VEO_RECORD_KEY))
        plan = json.loads((out / "qvlm_plan.json").read_text())
        return plan["veo"]["tuning_seconds"], linear_tensors(read_block(storage, record.block).linears)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def differences(got: dict, want: dict) -> tuple[float, float]:
    """Share of integer codes that differ, and the largest relative difference of a float tensor."""
    codes = [k for k, v in want.items() if not v.is_floating_point()]
    moved = sum(int((got[k] != want[k]).sum()) for k in codes) / sum(want[k].numel() for k in codes)
    scale = max(float(((got[k].float() - want[k].float()).abs() / want[k].float().abs().clamp_min(1e-12)).max())
                for k, v in want.items() if v.is_floating_point())
    return moved, scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--veo-epochs", type=int, default=VeoConfig.epochs)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this process (the workers use 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = cached_model("llava")
    cal = CalibrationSettings(data="builtin:shapes-hard", samples=args.samples, eval_samples=0, max_length=MAX_LENGTH,
                              batch_size=8)
    quant = QuantConfig(weights=WeightScheme(4, 128), activations=ActScheme(4, "channel", False), search="clip", epochs=1,
                        veo=VeoConfig(enabled=True, epochs=args.veo_epochs))
    runs = {f"in process, {n} stage(s)": in_process(model_dir, cal, quant, n) for n in (1, 3)}
    runs.update({f"job, {w} stage worker(s)": in_job(model_dir, cal, quant, w) for w in (1, 2)})
    base_seconds, base = runs["in process, 1 stage(s)"]
    rows = []
    for name, (seconds, tower) in runs.items():
        moved, scale = differences(tower, base)
        rows.append([name, f"{seconds:.1f}", f"{seconds / base_seconds:.2f}", f"{moved:.5f}", f"{scale:.2e}"])
    print(f"trained tiny LLaVA {model_dir}, W4A4, {args.samples} calibration questions in batches of 8, "
          f"{args.veo_epochs} VEO epochs, torch threads {args.threads} here and 1 per worker")
    print(table(["run", "VEO s", "x one stage", "codes moved", "max scale diff"], rows))


if __name__ == "__main__":
    main()
