"""Side by side with the tool users pick today: llm-compressor's GPTQ and qvlm's default, on one model.

    .venv/bin/python bench/peer.py [--text-layers 4] [--dtype float32] [--iters 100]

The same trained tiny text Llama, calibration windows and held-out windows as bench/quality.py; W4A16 g128
(int4 symmetric, group 128; lm_head left in full precision). Rows: qvlm's default configuration
(``QuantConfig()``: search best, propagation quantized), qvlm's GPTQ with act-order, and, when llm-compressor is
importable, its ``oneshot`` with ``GPTQModifier(scheme="W4A16")`` with static act-order (its default) and
without. KL and top-1 agreement are against the full-precision model on the held-out windows, in one process.

llm-compressor is an optional extra, never a test dependency, and it does not install beside the lock
(llmcompressor 0.14.0.1 wants transformers <= 5.17, the lock has 5.24.0). Run it from a throwaway venv that
keeps the CPU torch and takes the newest set both allow (transformers 5.17.0, compressed-tensors 0.19.0)::

    python3 -m venv /tmp/peer-venv && /tmp/peer-venv/bin/pip install torch==2.13.0
    echo torch==2.13.0 > /tmp/torch.txt && /tmp/peer-venv/bin/pip install -c /tmp/torch.txt -e . llmcompressor
    /tmp/peer-venv/bin/python bench/peer.py
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from quality import DTYPES, text_subject
from qvlm.config import QuantConfig
from qvlm.driver import quantize
from qvlm.quant import WeightScheme
from trained import TEXT_RECIPE

W4A16 = WeightScheme(4, 128, True)


def qvlm_model(subject, config: QuantConfig) -> torch.nn.Module:
    model, _ = quantize(copy.deepcopy(subject.fp), subject.batches, config)
    return model


def llmcompressor_model(subject, actorder: str | None) -> torch.nn.Module:
    """llm-compressor's GPTQ on the same calibration windows (one dataset row per window)."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    rows = [{"input_ids": ids.tolist(), "attention_mask": [1] * len(ids)}
            for batch in subject.batches for ids in batch["input_ids"]]
    model = copy.deepcopy(subject.fp)
    recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"], actorder=actorder)
    oneshot(model=model, dataset=Dataset.from_list(rows), recipe=recipe, num_calibration_samples=len(rows),
            max_seq_length=TEXT_RECIPE.seq_len)
    return model


def row(name: str, subject, make) -> list:
    t = time.perf_counter()
    model = make()
    seconds = time.perf_counter() - t
    q = subject.quality(model)
    return [name, f"{q['score']:.4f}", f"{q['kl']:.5f}", f"{q['top1']:.4f}", f"{seconds:.1f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text-layers", type=int, default=TEXT_RECIPE.layers)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--iters", type=int, default=QuantConfig().iters)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    subject = text_subject(args.text_layers)
    subject.fp = subject.fp.to(DTYPES[args.dtype])
    fp = subject.quality(subject.fp)
    rows = [["full precision", f"{fp['score']:.4f}", "0", "1.0000", "-"],
            row("qvlm default (best, quantized)", subject,
                lambda: qvlm_model(subject, QuantConfig(weights=W4A16, iters=args.iters))),
            row("qvlm gptq, act-order", subject,
                lambda: qvlm_model(subject, QuantConfig(method="gptq", weights=W4A16, act_order=True)))]
    try:
        import llmcompressor
    except ImportError:
        note = ("llm-compressor is not importable here (it needs transformers <= 5.17; install it in a separate "
                "venv, see bench/peer.py): its rows are left out")
    else:
        note = f"llm-compressor {llmcompressor.__version__}"
        rows += [row(f"llm-compressor GPTQ, actorder {a}", subject, lambda a=a: llmcompressor_model(subject, a))
                 for a in ("static", None)]
    print(f"{subject.name}, {args.dtype}, W4A16 g128; {note}")
    print(_table(["method", subject.score_name, "KL", "top-1", "sec"], rows))


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(headers), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]])


if __name__ == "__main__":
    main()
