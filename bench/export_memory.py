"""Memory to write one 13B decoder layer's block file (issue 16): what a stage actor takes after each search.

    .venv/bin/python bench/export_memory.py [--dtype float16] [--bits 4] [--group 128]

The seven linears of a LLaVA-13B decoder layer (hidden 5120, MLP 13824) with random weights, quantized with RTN,
then ``workers.shard.encode_block`` (the block's checkpoint file and sidecar as bytes, what ``write_block`` puts in
storage), in a process that gives freed pages back as a stage actor does (workers/host_memory.py). Prints the
peak RSS above the RSS before the encoding (the kernel's high-water mark reset before it).
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import MIB
from memory import PhaseMeter
from qvlm.quant import ActScheme, WeightScheme, quantize_weight
from qvlm.search import BlockResult, LinearResult
from workers.host_memory import return_freed_memory
from workers.shard import encode_block

LAYER = {"self_attn.q_proj": (5120, 5120), "self_attn.k_proj": (5120, 5120), "self_attn.v_proj": (5120, 5120),
         "self_attn.o_proj": (5120, 5120), "mlp.gate_proj": (13824, 5120), "mlp.up_proj": (13824, 5120),
         "mlp.down_proj": (5120, 13824)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=128)
    args = parser.parse_args()
    return_freed_memory()  # as a stage actor does
    torch.manual_seed(0)
    scheme = WeightScheme(args.bits, args.group, True)
    linears = []
    for name, shape in LAYER.items():
        weight = (torch.randn(shape) * 0.02).to(getattr(torch, args.dtype))
        linears.append(LinearResult(f"model.layers.0.{name}", quantize_weight(weight, scheme), None, None, None))
        del weight
    result = BlockResult(("model.layers.0",), tuple(linears), 0.0, 0.0, 1, 0.0)
    ints = sum(r.weight.shape.numel() for r in linears)
    held = sum(r.weight.codes.numel() * r.weight.codes.element_size() for r in linears)
    meter = PhaseMeter()
    meter.mark("before")  # resets the high-water mark
    start = time.perf_counter()
    blob = encode_block(result, {r.name: r.name for r in linears}, ActScheme()).file
    meter.mark("encode_block")
    before, peak = meter.rows[0][2], meter.rows[1][1]
    print(f"one 13B layer ({ints / 2**20:.0f} M weights, {args.dtype}, W{args.bits} g{args.group}, integers held "
          f"{held / MIB:.0f} MiB): encode_block peaks {(peak - before) / MIB:+.0f} MiB over the RSS before it; file "
          f"{len(blob) / MIB:.0f} MiB; {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
