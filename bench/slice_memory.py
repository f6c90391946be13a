"""Memory of quantizing one 13B down_proj by slices of rows, at two slice sizes (``qvlm.quant.ROW_SLICE_ELEMENTS``).

    .venv/bin/python bench/slice_memory.py [--sizes 24 22]

One LLaVA-13B down_proj (5120 x 13824, random float16 weights, W4 g128) and 4096 x 13824 float16 inputs, on one
thread, in a process that gives freed pages back as a stage actor does. For each slice size (2^N elements): the peak
RSS above the RSS before each of RTN (``quantize_weight``), clip (``quantize_clipped``) and the sensitivity statistic
(``sensitivity_terms``), the kernel's high-water mark reset before each.
"""

from __future__ import annotations

import argparse
import time

import torch

import qvlm.quant
from _common import MIB
from memory import PhaseMeter
from qvlm.mixed_precision import sensitivity_terms
from qvlm.quant import WeightScheme, quantize_clipped, quantize_weight
from workers.host_memory import return_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[24, 22], help="slice sizes as powers of two")
    args = parser.parse_args()
    return_freed_memory()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    weight = (torch.randn(5120, 13824) * 0.02).half()
    inputs = torch.randn(4096, 13824).half()
    scheme = WeightScheme(4, 128, True)
    steps = {"quantize_weight (RTN)": lambda: quantize_weight(weight, scheme),
             "quantize_clipped (clip)": lambda: quantize_clipped(weight, scheme),
             "sensitivity_terms": lambda: sensitivity_terms(weight, inputs, scheme)}
    meter = PhaseMeter()
    for power in args.sizes:
        qvlm.quant.ROW_SLICE_ELEMENTS = 1 << power
        for name, step in steps.items():
            meter.mark("before")
            start = time.perf_counter()
            result = step()
            seconds = time.perf_counter() - start
            meter.mark(name)
            (_, _, before), (_, peak, _) = meter.rows[-2], meter.rows[-1]
            print(f"slices of 2^{power}: {name:24s} peak +{(peak - before) / MIB:5.0f} MiB  {seconds:5.1f} s", flush=True)
            del result


if __name__ == "__main__":
    main()
