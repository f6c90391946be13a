"""Quantize the bundled tiny LLaVA in one process with the Q-VLM method and print what was done.

    python examples/quantize_tiny_llava.py [--bits 4] [--act-bits 16] [--search clip|learned]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from qvlm.calibration import load_records, make_batches
from qvlm.config import QuantConfig
from qvlm.driver import quantize
from qvlm.quant import ActScheme, WeightScheme
from qvlm.tiny import build_tiny_llava


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/tiny-llava")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--act-bits", type=int, default=16)
    parser.add_argument("--search", choices=["clip", "learned"], default="clip")
    args = parser.parse_args()
    if not Path(args.model, "config.json").exists():
        build_tiny_llava(args.model)
    model = LlavaForConditionalGeneration.from_pretrained(args.model).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    records = load_records("builtin:shapes", 32, seed=0)
    batches = make_batches(records, processor, max_length=64, batch_size=8)
    with torch.no_grad():
        fp_logits = [model(**b).logits for b in batches]
    act = ActScheme(args.act_bits, "channel", symmetric=False) if args.act_bits < 16 else ActScheme()
    config = QuantConfig(weights=WeightScheme(args.bits, 128), activations=act, search=args.search)
    qmodel, result = quantize(model, batches, config)
    for block, res in zip(result.blocks, result.block_results):
        print(f"block {block.index:2d} units {list(block.units)}: error {res.error_before:.3e} -> {res.error_after:.3e}")
    with torch.no_grad():
        kl = sum(
            torch.nn.functional.kl_div(qmodel(**b).logits.log_softmax(-1), fp.log_softmax(-1), log_target=True, reduction="batchmean")
            for b, fp in zip(batches, fp_logits)
        ) / len(batches)
    print(f"mean KL(FP || quantized) on the calibration batches: {float(kl):.4f}; seconds {result.seconds}")


if __name__ == "__main__":
    main()
