"""GPTQ's column loop on one decoder layer's linears: each linear alone, or the linears that read one input together.

    .venv/bin/python bench/gptq_columns.py                                   # on a GPU: LLaVA-13B's layer, float16
    .venv/bin/python bench/gptq_columns.py --device cpu --dtype float32 --hidden 512 --intermediate 1408

GPTQ quantizes a linear's input columns one after another, a handful of small kernels each, so on a GPU its time
is the number of kernels it launches, not its bytes. This runs :func:`qvlm.gptq.gptq_quantize` on a Llama layer's
seven linears (random weights, a random Hessian per input as the search accumulates them: q/k/v share one,
gate/up another) as the block search does it (W4 g128 symmetric, act-order, the shrink grid): once with each
linear alone, once with :func:`qvlm.gptq.gptq_quantize_shared` over each shared input's linears (skipped on a
tree that predates it). Figures: seconds (best of ``--repeats``), columns looped, and the operators dispatched
per looped column (aten calls that are not views, counted by a dispatch mode in a separate run: on a GPU each
launches at least one kernel). ``--json PATH`` writes them.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def _layer(hidden: int, intermediate: int, dtype: torch.dtype, device: torch.device, tokens: int):
    """Llama's linears grouped by the input they read, each group with its Hessian ``2/n X^T X``."""
    g = torch.Generator().manual_seed(0)

    def weight(out: int, inp: int) -> torch.Tensor:
        return (torch.randn(out, inp, generator=g) * inp**-0.5).to(device=device, dtype=dtype)

    def hessian(width: int) -> torch.Tensor:
        mix = torch.randn(width, width, generator=g) * width**-0.5
        x = (torch.randn(tokens, width, generator=g) @ mix).to(device)
        return x.t() @ x * (2.0 / tokens)

    return [([weight(hidden, hidden) for _ in range(3)], hessian(hidden)),  # q, k, v
            ([weight(hidden, hidden)], hessian(hidden)),  # o
            ([weight(intermediate, hidden) for _ in range(2)], hessian(hidden)),  # gate, up
            ([weight(hidden, intermediate)], hessian(intermediate))]  # down


def _run(groups, together: bool, **kw) -> None:
    from qvlm.gptq import gptq_quantize

    for weights, h in groups:
        if together:
            from qvlm.gptq import gptq_quantize_shared

            gptq_quantize_shared(weights, h, **kw)
        else:
            for w in weights:
                gptq_quantize(w, h, **kw)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--hidden", type=int, default=5120)
    ap.add_argument("--intermediate", type=int, default=13824)
    ap.add_argument("--tokens", type=int, default=4096, help="rows of the random inputs behind each Hessian")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs after the counting one (0: count only)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from qvlm.quant import SHRINK_GRID, WeightScheme

    try:
        from qvlm.gptq import gptq_quantize_shared  # noqa: F401
        ways = {"alone": False, "together": True}
    except ImportError:
        ways = {"alone": False}
    device = torch.device(args.device)
    groups = _layer(args.hidden, args.intermediate, getattr(torch, args.dtype), device, args.tokens)
    kw = dict(scheme=WeightScheme(4, 128, True), act_order=True, shrinks=SHRINK_GRID)
    print(f"layer: hidden {args.hidden}, MLP {args.intermediate}, {args.dtype} on {device}; W4 g128 symmetric, "
          f"act-order, shrink grid of {len(SHRINK_GRID)}")
    figures = {"args": vars(args), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
               else "cpu", "ways": {}}
    print(f"{'linears':<10} {'columns looped':>14} {'ops per column':>14} {'seconds':>8}")
    for way, together in ways.items():
        columns = sum(h.shape[0] * (1 if together else len(ws)) for ws, h in groups)
        with _Count() as count:
            _run(groups, together, **kw)
        times = []
        for _ in range(args.repeats):
            _sync(device)
            t = time.perf_counter()
            _run(groups, together, **kw)
            _sync(device)
            times.append(time.perf_counter() - t)
        seconds = min(times) if times else None  # --repeats 0: the count alone
        figures["ways"][way] = {"columns": columns, "ops": count.ops, "seconds": seconds}
        print(f"{way:<10} {columns:>14} {count.ops / columns:>14.1f} {'-' if seconds is None else f'{seconds:.2f}':>8}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
