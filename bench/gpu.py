"""One 13B-shape decoder layer through a stage: capture, each search method, memory, transfers, reads.

    .venv/bin/python bench/gpu.py                       # on a GPU: LLaVA-13B's layer at 128 x 2048 tokens, float16
    .venv/bin/python bench/gpu.py --device cpu --samples 8 --tokens 256 --iters 20   # what a CPU can do

The layer is a ``LlamaModel`` with one decoder layer (hidden 5120, MLP 13824, 40 heads; random weights) run
by :class:`qvlm.stage.Stage`, the code a job's stage actors run: the capture is the model's own forward pass
over random token ids; each method is one ``search_block`` of that layer (``learned`` and ``best`` at
``--iters``, W4 g128 symmetric); the forward is one plain pass of the layer over the captured batches, what each
of a search's evaluations runs. Figures: seconds per phase and tokens per second, the block evaluations, and
the memory of each phase: before it and its peak (GPU: ``torch.cuda.memory_allocated`` and
``max_memory_allocated``, reset before each phase; CPU, with a stage worker's allocator setting
(workers/host_memory.py): the process's RSS and its high-water mark, reset
before each phase through ``/proc/self/clear_refs``, or with ``--live`` the peak of live tensors above the phase's
start, as a GPU counts them), the object store's put and get throughput of one
boundary hidden state (batch x tokens x hidden, packed as the stages send it), and the throughput of ranged
reads of the layer's weights from a safetensors file on local disk, and the device's memory bandwidth for a
large copy (what bench/projection.py scales by). ``--json PATH`` also writes every figure
(bench/projection.py reads it).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

GIB = 2**30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _status(field: str) -> int:
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))
    return int(line.split()[1]) * 1024


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        import ctypes
        import gc

        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so a phase's RSS before it is what is live
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS (Linux 4.0 and later)


def _now(device: torch.device) -> float:
    return (torch.cuda.memory_allocated() if device.type == "cuda" else _status("VmRSS:")) / GIB


def _peak(device: torch.device) -> float:
    return (torch.cuda.max_memory_allocated() if device.type == "cuda" else _status("VmHWM:")) / GIB


def build_layer(args, device: torch.device):
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=1,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=1024,
                         max_position_embeddings=max(args.tokens, 256), use_cache=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaModel._from_config(config, dtype=getattr(torch, args.dtype)).eval()
    return model


LIVE = False  # --live: on the CPU, the peak of live tensors (as a GPU's figures are) in place of the RSS


def timed(device: torch.device, fn) -> tuple:
    """(value, seconds, memory before in GiB, peak during in GiB)."""
    if LIVE and device.type == "cpu":
        return _timed_live(fn)
    _sync(device)
    _reset_peak(device)
    before = _now(device)
    t = time.perf_counter()
    value = fn()
    _sync(device)
    return value, time.perf_counter() - t, before, _peak(device)


def _timed_live(fn) -> tuple:
    """``timed`` on the CPU with ``live_peak_bytes`` (reported above a before of 0)."""
    t = time.perf_counter()
    value, peak = live_peak_bytes(fn)
    return value, time.perf_counter() - t, 0.0, peak / GIB  # with the profiler's overhead: time without --live


def live_peak_bytes(fn) -> tuple:
    """``fn()`` and the peak of live CPU tensors above what was live before it. torch.profiler records each
    allocation under the operator that made it and each free; they are replayed here in order. (The RSS also
    holds what the C allocator keeps of freed memory; a GPU's max_memory_allocated does not.)"""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        value = fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return value, peak


def capture(stage, args, device) -> tuple[float, float, float]:
    generator = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 1024, (args.batch, args.tokens), generator=generator),
                "attention_mask": torch.ones(args.batch, args.tokens, dtype=torch.long)}
               for _ in range(args.samples // args.batch)]

    def run():
        for batch in batches:
            stage.capture(batch, hand_over=False)

    _, seconds, before, peak = timed(device, run)
    return seconds, before, peak


def search(stage, args, device, method: str) -> dict:
    from qvlm.config import QuantConfig
    from qvlm.quant import WeightScheme

    scheme = WeightScheme(4, 128, True)
    searches = ("clip", "learned", "best")
    config = QuantConfig(method="qvlm" if method in searches else method, search=method if method in searches else "clip",
                         weights=scheme, iters=args.iters, epochs=args.epochs)
    job = _job(stage, scheme)
    summary, seconds, before, peak = timed(device, lambda: stage.search_block(job, config))
    stage.results.clear()  # each method's result is its own; none is kept into the next method's memory
    return {"seconds": seconds, "before_gib": before, "peak_gib": peak, "evaluations": summary.evaluations,
            "error_ratio": summary.error_after / max(summary.error_before, 1e-30)}


def forward(stage, device) -> float:
    """Seconds of one plain forward of the layer over every captured batch: what a search's evaluation runs
    (bench/projection.py counts a method's time in these)."""
    from qvlm.capture import call_unit
    from qvlm.config import QuantConfig
    from qvlm.quant import WeightScheme

    data = stage.block_data(_job(stage, WeightScheme(4, 128, True)), QuantConfig(), None)
    with torch.no_grad():
        _, seconds, _, _ = timed(device, lambda: [call_unit(data.units[0], c) for c in data.calls[0]])
    return seconds


def _job(stage, scheme):
    """The search job of the stage's one layer, every linear at ``scheme``."""
    from qvlm.method import Block, block_jobs

    unit = stage.units[0]
    schemes = {unit.linear_name(n): scheme for n in unit.linears}
    return block_jobs([Block(0, 0, (unit.index,))], _layout(stage), schemes)[0]


def _layout(stage):
    from qvlm.method import Layout

    indices = tuple(u.index for u in stage.units)
    return Layout(tuple(stage.units), (indices,), (indices,))


def object_store(args) -> tuple[float, float]:
    """GB/s of ray.put and of a get in another process, for one packed boundary hidden state."""
    import ray

    from workers.transport import nbytes, pack, unpack

    state = torch.randn(args.batch, args.boundary_tokens or args.tokens, args.boundary_hidden or args.hidden)
    state = state.to(getattr(torch, args.dtype))
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


def copy_gbps(device: torch.device) -> float:
    """Memory bandwidth of a large copy on ``device`` (read + write, best of 10), GB/s: bench/projection.py moves
    work measured here to other devices by the ratio of these."""
    x = torch.ones(64 * 2**20, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(10):
        _sync(device)
        t = time.perf_counter()
        y.copy_(x)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * x.numel() * 4 / best / 1e9


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


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=5120)
    parser.add_argument("--intermediate", type=int, default=13824)
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--iters", type=int, default=200, help="learned rounding steps (learned, best)")
    parser.add_argument("--epochs", type=int, default=2, help="coordinate passes of static activation ranges (none at W4A16)")
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq", "learned", "clip", "best"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--boundary-tokens", type=int, default=None, help="object store: tokens of the hidden state "
                        "(default --tokens)")
    parser.add_argument("--boundary-hidden", type=int, default=None, help="object store: its width (default --hidden)")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure to this file")
    parser.add_argument("--live", action="store_true", help="on the CPU: each phase's peak of live tensors above "
                        "its start (as on a GPU), not the RSS; times then include the profiler's overhead")
    return parser.parse_args()


def _label(method: str, args) -> str:
    return f"{method} ({args.iters} it)" if method in ("learned", "best") else method


def main() -> None:
    global LIVE
    args = arguments()
    LIVE = args.live
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu":
        from workers.host_memory import return_freed_memory

        return_freed_memory()  # as a stage worker does, so the RSS is of what is held, not of what glibc kept
    from qvlm.method import select_units
    from qvlm.config import QuantConfig
    from qvlm.search import UNCOUNTED_FORWARDS
    from qvlm.stage import Stage

    model = build_layer(args, device)
    units = select_units(model, QuantConfig())
    stage = Stage(model, units, first=True, device=device)
    tokens = args.samples * args.tokens
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device {name}, torch {torch.__version__}, {torch.get_num_threads()} threads; layer hidden {args.hidden}, "
          f"MLP {args.intermediate}, {args.heads} heads, {args.dtype}; calibration {args.samples} x {args.tokens} "
          f"tokens in batches of {args.batch}; W4 g128 symmetric")
    figures = {"device": name, "torch": torch.__version__, "threads": torch.get_num_threads(), "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "methods": {},
        "uncounted_forwards": dict(UNCOUNTED_FORWARDS)}  # the search code's own, for bench/projection.py's check
    seconds, before, peak = capture(stage, args, device)
    figures["capture"] = {"seconds": seconds, "before_gib": before, "peak_gib": peak}
    unit = "GPU GiB allocated" if device.type == "cuda" else "live GiB" if LIVE else "RSS GiB"
    print(f"\n{'phase':<16}{'seconds':>10}{'tokens/s':>12}{'evaluations':>13}{'before ' + unit:>24}{'peak ' + unit:>22}"
          f"{'error after/before':>20}")
    print(f"{'capture':<16}{seconds:>10.2f}{tokens / seconds:>12.0f}{'':>13}{before:>24.2f}{peak:>22.2f}{'':>20}")
    figures["forward"] = {"seconds": forward(stage, device)}
    print(f"{'forward':<16}{figures['forward']['seconds']:>10.2f}{tokens / figures['forward']['seconds']:>12.0f}")
    for method in args.methods:
        m = figures["methods"][method] = search(stage, args, device, method)
        print(f"{_label(method, args):<16}{m['seconds']:>10.2f}{tokens / m['seconds']:>12.0f}{m['evaluations']:>13}"
              f"{m['before_gib']:>24.2f}{m['peak_gib']:>22.2f}{m['error_ratio']:>20.3f}")
    put, get = object_store(args)
    figures["object_store_gbps"] = {"put": put, "get": get}
    figures["object_store_shape"] = [args.batch, args.boundary_tokens or args.tokens, args.boundary_hidden or args.hidden]
    print(f"\nobject store, one boundary hidden state ({' x '.join(map(str, figures['object_store_shape']))} {args.dtype}): "
          f"put {put:.2f} GB/s, get in another process {get:.2f} GB/s")
    figures["copy_gbps"] = copy_gbps(device)
    print(f"memory bandwidth of a 256 MiB copy on the device (read + write, best of 10): {figures['copy_gbps']:.1f} GB/s")
    figures["ranged_read_gbps"] = {}
    for parallel, rate in ranged_reads(model):
        figures["ranged_read_gbps"][str(parallel)] = rate
        print(f"ranged reads of the layer's weights from local disk, {parallel} in flight: {rate:.2f} GB/s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
