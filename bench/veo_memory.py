"""What VEO holds, measured against what the plan counts for it (cluster/memory.py ``veo_bytes`` + ``veo_host_bytes``).

    .venv/bin/python bench/veo_memory.py [--hidden 1024] [--layers 2] [--vocab 32064] [--dtype bfloat16 float32]

A LLaVA with the tiny CLIP tower and a wider random Llama decoder (``--hidden``, MLP 2.75 x, ``--layers``,
``--vocab`` rows of embeddings and head; built once into ``~/.cache/qvlm/bench/``) runs VEO alone in this process
on one stage (``qvlm.driver.optimize_vision_encoder``: the first stage holds everything, as one worker would),
W4A4, on ``--samples`` calibration questions. Measured: the process's peak RSS during VEO above its RSS before
(the high-water mark reset first through ``/proc/self/clear_refs``), after a warm-up run on one batch (the first
backward pass of a process sets up autograd's own memory, which is the runtime's, not VEO's); counted: the plan's figures for that stage,
at the batches' real token count (the plan uses ``calibration.max_length``, an upper bound).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import time
from pathlib import Path

import torch
import yaml

from _common import CACHE, table
from cluster.memory import CalibrationSize, veo_bytes, veo_host_bytes
from cluster.plan import inspect_model
from jobs.spec import load_job
from qvlm.batches import calibration_answer_masks, calibration_batches
from qvlm.config import CalibrationSettings, QuantConfig, VeoConfig
from qvlm.driver import optimize_vision_encoder
from qvlm.method import select_units, unit_bits
from qvlm.quant import ActScheme, WeightScheme

MIB = 2**20


def build(hidden: int, layers: int, vocab: int) -> Path:
    from qvlm.tiny import make_tiny_llava

    path = CACHE / f"llava-veo-h{hidden}-l{layers}-v{vocab}"
    if (path / "config.json").exists():
        return path
    model, processor = make_tiny_llava(0)
    config = model.config
    config.text_config.update(dict(hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
                                   num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                   num_key_value_heads=hidden // 64, vocab_size=vocab))
    torch.manual_seed(0)
    wide = type(model)(config).eval()
    wide.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _status(field: str) -> int:
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))
    return int(line.split()[1]) * 1024


def measure(path: Path, dtype: torch.dtype, cal: CalibrationSettings, quant: QuantConfig) -> dict:
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
    batches, answers = calibration_batches(path, cal), calibration_answer_masks(path, cal)
    units = select_units(model, quant)
    schemes = {u.linear_name(n): quant.weights for u in units for n in u.linears}
    bits = {u.index: unit_bits(u, schemes, quant) for u in units}
    optimize_vision_encoder(model, batches[:1], quant, schemes, bits, answers[:1])  # warm-up: autograd's first use
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS
    before = _status("VmRSS:")
    t = time.perf_counter()
    optimize_vision_encoder(model, batches, quant, schemes, bits, answers)
    seconds = time.perf_counter() - t
    peak = _status("VmHWM:") - before
    tokens = max(b["input_ids"].shape[1] for b in batches)
    return {"peak": peak, "seconds": seconds, "tokens": tokens}


def counted(path: Path, dtype: str, cal: CalibrationSettings, quant: QuantConfig, tokens: int, tmp: Path) -> tuple[int, int]:
    spec = {"name": "veo-memory", "model": {"path": str(path)}, "output": {"uri": str(tmp / "out")},
            "quantization": {"qvlm": {"veo": {"enabled": True}}}, "resources": {"workers": 1}}
    (tmp / "job.yaml").write_text(yaml.safe_dump(spec))
    job = load_job(tmp / "job.yaml").compile()
    plan = inspect_model(job)[0]
    plan = plan.with_workers(1)
    element = torch.finfo(getattr(torch, dtype)).bits // 8
    from dataclasses import replace

    plan = replace(plan, weight_element_bytes=element)
    size = CalibrationSize(cal.samples, cal.batch_size, tokens, plan.image_tokens)
    return veo_bytes(plan, 0, size, quant), veo_host_bytes(plan, 0, size, quant)


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, nargs="+", default=[1024, 32064, 64128])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    cal = CalibrationSettings(samples=args.samples, eval_samples=0, max_length=64, batch_size=args.batch)
    quant = QuantConfig(weights=WeightScheme(4, 128), activations=ActScheme(4, "channel", False),
                        veo=VeoConfig(enabled=True, epochs=1))
    rows, figures = [], {}
    for dtype in args.dtype:
        for vocab in args.vocab:
            path = build(args.hidden, args.layers, vocab)
            got = measure(path, getattr(torch, dtype), cal, quant)
            with tempfile.TemporaryDirectory() as tmp:
                device, host = counted(path, dtype, cal, quant, got["tokens"], Path(tmp))
            figures[dtype, vocab] = (got["peak"], device + host)
            rows.append([dtype, vocab, got["tokens"], f"{got['peak'] / MIB:.0f}", f"{device / MIB:.0f}",
                         f"{host / MIB:.0f}", f"{(device + host) / MIB:.0f}", f"{got['peak'] / (device + host):.2f}",
                         f"{got['seconds']:.1f}"])
    print(f"LLaVA, tiny CLIP tower, decoder hidden {args.hidden}, {args.layers} layers; {args.samples} calibration "
          f"questions in batches of {args.batch}, W4A4, 1 VEO epoch, one stage, 1 torch thread")
    print(table(["dtype", "vocab", "tokens", "measured MiB", "veo_bytes MiB", "veo_host_bytes MiB", "counted MiB",
                 "measured/counted", "VEO s"], rows))
    lo, hi = min(args.vocab), max(args.vocab)
    for dtype in args.dtype:
        (m0, c0), (m1, c1) = figures[dtype, lo], figures[dtype, hi]
        print(f"{dtype}: from vocabulary {lo} to {hi}, measured +{(m1 - m0) / MIB:.0f} MiB against counted "
              f"+{(c1 - c0) / MIB:.0f} MiB ({(m1 - m0) / (c1 - c0):.2f})")


if __name__ == "__main__":
    main()
