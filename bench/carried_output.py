"""The forward pass Eq. 3 propagation no longer runs: a chained block's quantized output taken from its search.

    .venv/bin/python bench/carried_output.py [--methods rtn gptq learned best] [--iters 100] [--layers 12]

With ``propagation: quantized`` (the default) or ``stage`` each block but a chain's last hands its quantized
output to the next block. A stage used to get it by running the block again with the result
(``quantized_block_outputs``); it now takes the output of the search's own last forward pass
(``search_block_with_outputs``), which only ``best`` may still have to run again (when it keeps a candidate it did
not measure last). This runs both on the trained text Llama (``bench/trained.py``), one block per decoder layer,
chained as a job's stage chains them, the two ways in turn on every block of the same run; it checks that they give
the same integers and the same output, bit for bit, and prints each way's seconds and their ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from qvlm.config import QuantConfig
from qvlm.driver import layout_of, local_pipeline
from qvlm.method import Block, block_jobs
from qvlm.quant import WeightScheme
from qvlm.search import quantized_block_outputs, search_block, search_block_with_outputs
from quality import text_subject


def _old_way(data, cfg):
    result = search_block(data, cfg)
    return result, quantized_block_outputs(data, result)


def chain(subject, method: str, iters: int) -> tuple[float, float, int, int]:
    """Seconds of the chain searched the old way and the new way, and how many blocks ran a pass again."""
    scheme = WeightScheme(4, 128, True)
    searches = ("clip", "learned", "best")
    config = QuantConfig(method="qvlm" if method in searches else method, weights=scheme, iters=iters,
                         search=method if method in searches else "best")
    layout = layout_of(subject.fp, config)
    stage = local_pipeline(subject.fp, layout).stages[0]
    for batch in subject.batches:
        stage.capture(batch, hand_over=False)
    blocks = [Block(i, 0, (u.index,)) for i, u in enumerate(layout.units)]
    jobs = block_jobs(blocks, layout, {u.linear_name(n): scheme for u in layout.units for n in u.linears})
    old = new = 0.0
    again = 0
    inputs = None
    for k, job in enumerate(jobs):
        data = stage.block_data(job, config, inputs)
        cfg = config.search_config()
        ways = [("old", _old_way), ("new", search_block_with_outputs)]
        found = {}
        for name, way in (ways if k % 2 == 0 else ways[::-1]):  # alternate which goes first
            t = time.perf_counter()
            found[name] = way(data, cfg)
            seconds = time.perf_counter() - t
            old, new = (old + seconds, new) if name == "old" else (old, new + seconds)
        (r_old, out_old), (r_new, out_new) = found["old"], found["new"]
        assert all(torch.equal(a.weight.qweight, b.weight.qweight) for a, b in zip(r_old.linears, r_new.linears))
        assert all(torch.equal(a, b) for a, b in zip(out_old, out_new)), f"block {k}: outputs differ"
        again += method == "best" and r_new.chosen != "learned"
        inputs = out_new
    return old, new, again, len(jobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq", "learned", "best"])
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    subject = text_subject(args.layers)
    print(f"{subject.name}: {len(subject.batches)} calibration batches; W4 g128; one block per decoder layer, "
          f"chained (propagation quantized); learned/best {args.iters} steps; torch threads {args.threads}")
    print(f"{'method':8} {'blocks':>6} {'search + pass again s':>22} {'from the search s':>18} {'new/old':>8} "
          f"{'blocks run again':>17}")
    for method in args.methods:
        old, new, again, blocks = chain(subject, method, args.iters)
        print(f"{method:8} {blocks:>6} {old:>22.2f} {new:>18.2f} {new / old:>8.3f} {again:>17}")
    print("same integers and the same carried output, bit for bit, on every block (checked)")


if __name__ == "__main__":
    main()
