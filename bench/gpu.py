"""One 13B-shape decoder layer through a stage: capture, each search method, memory, transfers, reads.

    .venv/bin/python bench/gpu.py                       # on a GPU: LLaVA-13B's layer at 128 x 2048 tokens, float16
    .venv/bin/python bench/gpu.py --device cpu --samples 8 --tokens 256 --iters 20   # what a CPU can do

The layer is a ``LlamaModel`` with one decoder layer (hidden 5120, MLP 13824, 40 heads; random weights) run
by :class:`qvlm.stage.Stage`, the code a job's stage actors run: the capture is the model's own forward pass
over random token ids; each method is one ``search_block`` of that layer (``learned`` at ``--iters``, ``clip``
at ``--epochs``). Figures: seconds per phase and tokens per second, the peak device memory of each phase
(GPU: ``torch.cuda.max_memory_allocated``; CPU: the process's peak RSS), the object store's put and get
throughput of one boundary hidden state (batch x tokens x hidden, packed as the stages send it), and
the throughput of ranged reads of the layer's weights from a safetensors file on local disk.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

GIB = 2**30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def build_layer(args, device: torch.device):
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=1,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=1024,
                         max_position_embeddings=max(args.tokens, 256), use_cache=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaModel._from_config(config, dtype=getattr(torch, args.dtype)).eval()
    return model


def timed(device: torch.device, fn):
    _sync(device)
    _reset_peak(device)
    t = time.perf_counter()
    value = fn()
    _sync(device)
    return value, time.perf_counter() - t, _peak(device)


def capture(stage, args, device) -> tuple[float, float]:
    generator = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 1024, (args.batch, args.tokens), generator=generator),
                "attention_mask": torch.ones(args.batch, args.tokens, dtype=torch.long)}
               for _ in range(args.samples // args.batch)]

    def run():
        for batch in batches:
            stage.capture(batch, hand_over=False)

    _, seconds, peak = timed(device, run)
    return seconds, peak


def search(stage, args, device, method: str) -> tuple[float, float, float]:
    from qvlm.config import QuantConfig
    from qvlm.method import Block, block_jobs
    from qvlm.quant import WeightScheme

    scheme = WeightScheme(4, 128, True)
    config = QuantConfig(method="qvlm" if method in ("clip", "learned") else method, search=method if method in ("clip", "learned") else "clip",
                         weights=scheme, iters=args.iters, epochs=args.epochs)
    unit = stage.units[0]
    job = block_jobs([Block(0, 0, (unit.index,))], _layout(stage), {unit.linear_name(n): scheme for n in unit.linears})[0]
    summary, seconds, peak = timed(device, lambda: stage.search_block(job, config))
    return seconds, peak, summary.error_after / max(summary.error_before, 1e-30)


def _layout(stage):
    from qvlm.method import Layout

    indices = tuple(u.index for u in stage.units)
    return Layout(tuple(stage.units), (indices,), (indices,))


def object_store(args) -> tuple[float, float]:
    """GB/s of ray.put and of a get in another process, for one packed boundary hidden state."""
    import ray

    from workers.transport import nbytes, pack, unpack

    state = torch.randn(args.batch, args.tokens, args.hidden).to(getattr(torch, args.dtype))
    packed = pack(state)
    size = nbytes(packed)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=max(4 * size, 200 * 2**20))

    @ray.remote
    def receive(value):
        t = time.perf_counter()
        tensor = unpack(value, owned=True)
        return float(tensor.view(-1)[0]), time.perf_counter() - t

    ray.get(receive.remote(pack(torch.zeros(4))))  # start the worker process before timing
    t = time.perf_counter()
    ref = ray.put(packed)
    put_s = time.perf_counter() - t
    t = time.perf_counter()
    ray.get(receive.remote(ref))
    get_s = time.perf_counter() - t
    ray.shutdown()
    return size / put_s / 1e9, size / get_s / 1e9


def ranged_reads(model) -> list[tuple[int, float]]:
    """GB/s reading every tensor of the layer from a local safetensors file, per number of requests in flight."""
    from safetensors.torch import save_file

    from workers.safetensors_reader import CheckpointIndex
    from workers.storage import LocalStorage

    folder = Path(tempfile.mkdtemp(prefix="qvlm-bench-gpu-"))
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, folder / "model.safetensors")
    index = CheckpointIndex.open(LocalStorage(folder))
    size = index.total_bytes()
    rows = []
    for parallel in (1, 8):
        t = time.perf_counter()
        index.read(index.names, parallel=parallel)
        rows.append((parallel, size / (time.perf_counter() - t) / 1e9))
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=5120)
    parser.add_argument("--intermediate", type=int, default=13824)
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq", "learned", "clip"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from qvlm.method import select_units
    from qvlm.config import QuantConfig
    from qvlm.stage import Stage

    model = build_layer(args, device)
    units = select_units(model, QuantConfig())
    stage = Stage(model, units, first=True, device=device)
    tokens = args.samples * args.tokens
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device {name}, torch {torch.__version__}, {torch.get_num_threads()} threads; layer hidden {args.hidden}, "
          f"MLP {args.intermediate}, {args.heads} heads, {args.dtype}; calibration {args.samples} x {args.tokens} "
          f"tokens in batches of {args.batch}")
    seconds, peak = capture(stage, args, device)
    print(f"\n{'phase':<16}{'seconds':>10}{'tokens/s':>12}{'peak GiB':>10}{'error after/before':>20}")
    print(f"{'capture':<16}{seconds:>10.2f}{tokens / seconds:>12.0f}{peak:>10.2f}{'':>20}")
    for method in args.methods:
        seconds, peak, ratio = search(stage, args, device, method)
        label = f"{method} ({args.iters} it)" if method == "learned" else (f"clip ({args.epochs} ep)" if method == "clip" else method)
        print(f"{label:<16}{seconds:>10.2f}{tokens / seconds:>12.0f}{peak:>10.2f}{ratio:>20.3f}")
    put, get = object_store(args)
    print(f"\nobject store, one boundary hidden state ({args.batch} x {args.tokens} x {args.hidden} {args.dtype}): "
          f"put {put:.2f} GB/s, get in another process {get:.2f} GB/s")
    for parallel, rate in ranged_reads(model):
        print(f"ranged reads of the layer's weights from local disk, {parallel} in flight: {rate:.2f} GB/s")


if __name__ == "__main__":
    main()
