"""How far a search's integer codes move when the model's floats move by the size of a change of device.

    .venv/bin/python bench/float_noise.py                  # the bundled example's quantization and VEO, ~3 min

A GPU sums in another order than a CPU, and cuDNN runs float32 convolutions in TF32 unless told not to, so the
same job computes slightly different activations on each. This runs the bundled example's quantization (its
job file, in one process, the job's blocks and stages) on the tiny LLaVA as loaded, then with every floating
weight multiplied by (1 + eps * N(0, 1)) for each eps, and prints per run the share of integer codes that
differ from the first run, the largest difference in steps, the largest relative change of a float (scales,
ranges) and the change of the block errors; then the same for VEO's tuned tower. The thresholds of the
cross-device tests (tests/test_stage.py, tests/test_veo.py) are read off these tables.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eps", type=float, nargs="+", default=[0.0, 1e-7, 1e-6, 1e-5, 1e-3],
                        help="relative size of the noise; 0 repeats the first run (the search is deterministic)")
    parser.add_argument("--job", type=Path, default=ROOT / "examples/tiny-llava.yaml")
    return parser.parse_args()


def perturbed_llava(model_dir: Path, eps: float):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + eps * torch.randn(p.shape, generator=generator))
    torch.manual_seed(0)
    return model


def job_run(model_dir: Path, job, eps: float) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Every block's quantized tensors and block-output errors: the job's quantization in one process."""
    from qvlm.batches import calibration_batches
    from qvlm.driver import quantize
    from qvlm.search import linear_tensors

    _, result = quantize(perturbed_llava(model_dir, eps), calibration_batches(model_dir, job.calibration), job.quant)
    return linear_tensors([r for b in result.block_results for r in b.linears]), [b.error_after for b in result.block_results]


def veo_run(model_dir: Path, job, eps: float) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The VEO-tuned tower's tensors and its error, tuned as tests/test_veo.py's GPU test does: W4A4 with a
    per-tensor static range, 2 epochs, through two stages (the tower and the first decoder layer; the rest)."""
    from qvlm.batches import calibration_batches
    from qvlm.config import QuantConfig, VeoConfig
    from qvlm.driver import optimize_vision_encoder
    from qvlm.method import select_units, unit_bits
    from qvlm.quant import ActScheme, WeightScheme
    from qvlm.search import linear_tensors

    config = QuantConfig(weights=WeightScheme(4, 128), activations=ActScheme(4, "tensor", False), epochs=1,
                         veo=VeoConfig(enabled=True, epochs=2))
    model = perturbed_llava(model_dir, eps)
    units = select_units(model, config)
    language = [u.index for u in units if u.segment == "language"]
    stages = [[u.index for u in units if u.segment != "language"] + language[:1], language[1:]]
    schemes = {u.linear_name(n): config.weights for u in units for n in u.linears}
    bits = {u.index: unit_bits(u, schemes, config) for u in units}
    result = optimize_vision_encoder(model, calibration_batches(model_dir, job.calibration), config, schemes, bits,
                                     stages=stages)
    return linear_tensors(result.block.linears), [result.block.error_after]


def table(title: str, run, eps_values: list[float]) -> None:
    print(f"\n{title}")
    print(f"{'eps':>8}{'codes moved':>14}{'largest move':>14}{'float rel. change':>19}{'error':>12}{'error change':>14}"
          f"{'seconds':>9}")
    t = time.perf_counter()
    base, base_errors = run(0.0)
    print(f"{'-':>8}{'':>14}{'':>14}{'':>19}{sum(base_errors):>12.4g}{'':>14}{time.perf_counter() - t:>9.1f}")
    ints = [n for n in base if n.endswith(".qweight")]
    floats = [n for n in base if base[n].is_floating_point()]
    for eps in eps_values:
        t = time.perf_counter()
        tensors, errors = run(eps)
        moved = torch.cat([(tensors[n].long() - base[n].long()).abs().flatten() for n in ints])
        change = max(float(((tensors[n] - base[n]).abs() / base[n].abs().clamp_min(1e-6)).max()) for n in floats)
        error_change = max(abs(a - b) / b for a, b in zip(errors, base_errors))
        print(f"{eps:>8.0e}{float((moved > 0).float().mean()):>14.2%}{int(moved.max()):>14}{change:>19.1e}"
              f"{sum(errors):>12.4g}{error_change:>14.1%}{time.perf_counter() - t:>9.1f}")


def main() -> None:
    args = arguments()
    from jobs.spec import load_job
    from qvlm.tiny import build_tiny_llava

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_llava(Path(tmp) / "tiny-llava")
        job = load_job(args.job, [f"model.path={model_dir}"]).compile()
        q = job.quant
        table(f"{args.job.name} ({q.search}, propagation {q.propagation}, iters {q.iters}, W{q.weights.bits} "
              f"g{q.weights.group_size}): its blocks (error: block-output MSE, change: the largest of a block)",
              lambda eps: job_run(model_dir, job, eps), args.eps)
        table("VEO, W4A4 per-tensor static, 2 epochs, two stages (error: the tuned tower's)",
              lambda eps: veo_run(model_dir, job, eps), args.eps)


if __name__ == "__main__":
    main()
