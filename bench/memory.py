"""Peak memory of the stage actors and of the object store for a wide float16 Llama, by stage count (issue 16).

    .venv/bin/python bench/memory.py [--workers 2 4] [--layers 4] [--samples 32] [--tokens 512] [--batch 8]

The model is a random-weight float16 Llama at LLaVA-13B's decoder width (hidden 5120, MLP 13824, 40 heads) with
a few layers and a small vocabulary (so embeddings and lm_head stay small), built once in a child process. The
calibration is a JSONL file of text records of ``--tokens`` words (the shapes tokenizer maps each to one token,
so every sample has exactly ``--tokens`` tokens and no padding). Each run is a ``method: rtn`` job (no search
cost: the stages' memory is what is measured) on its own fresh local Ray, so no worker process carries its peak
RSS into the next run. A thread in the driver polls the raylet's object-store statistics every 0.2 s.

Per stage actor: its peak RSS (the plan document's ``stage_memory``), its weights (``weight_bytes``), its captures
and its search workspace as cluster/memory.py models them at the job's calibration size, and the ratio
(peak RSS - runtime baseline) / (weights + captures), which issue 16 wants at most 1.3. The runtime baseline is
the peak RSS of the one stage of a tiny Llama (qvlm.tiny, 0.3 MiB of weights) run with one batch of 16 tokens:
Python + torch + transformers + Ray + the tokenizer, with nothing of size in it. The same thread reads each stage
actor's /proc status: a process's RSS counts the object store's pages it wrote or read, which are the store's
memory, so the table also gives the most of those seen and the largest private part (anonymous + file) seen.

Object store: the bytes the stages sent (the plan document's ``transfer_bytes``) against the boundary states
worked out by hand: per boundary, every batch's hidden state with its extra arguments during the capture, and
(``propagation: quantized``, the default) the quantized output the stage's last block hands to the next stage.

``--profile`` then says where a stage's memory goes: stage 0 of the first ``--workers`` cut, run in a child
process as the stage actor runs it (``qvlm.stage.Stage`` on a ``ModelShard`` of its units, the method's own
sequence through ``qvlm.method.run_method``), with the process's peak RSS reset (``/proc/self/clear_refs``)
before and read after each step: load, each capture batch, statistics, dependencies, each block search and
each block's quantized output. As the actor does, it encodes each block's file after its search (without storing
it) and then lets the block's integers go; it lacks the rest of what only the actor does (packing the hand-over for
the object store). Last, the stage's peak over every step, above the runtime baseline, against its weights and captures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import tempfile
import threading
import time
from pathlib import Path

import ray

from _common import CACHE, MIB, init_ray, own_peak_rss, table, timed_job
from cluster.memory import CalibrationSize, stage_memory
from cluster.plan import make_plan
from qvlm.config import CalibrationSettings, QuantConfig
from workers.safetensors_reader import CheckpointIndex
from workers.storage import LocalStorage

WIDE = {"hidden": 5120, "intermediate": 13824, "heads": 40, "vocab": 1024}


def build_llama(path: Path, layers: int, shape: dict, seed: int) -> None:
    """Random float16 Llama of ``shape`` with the shapes tokenizer beside it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qvlm.tiny import build_shapes_tokenizer

    tok = build_shapes_tokenizer()
    config = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"], num_hidden_layers=layers,
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"], vocab_size=shape["vocab"],
                         max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(config, dtype=torch.float16).eval()
    model.save_pretrained(path, max_shard_size="1GB")
    tok.save_pretrained(path)


def ensure_model(path: Path, layers: int, shape: dict, seed: int) -> Path:
    """Build in a child process so the driver's own peak RSS does not include the whole model."""
    if not (path / "config.json").exists():
        print(f"building the random Llama at {path} (once) ...", flush=True)
        child = multiprocessing.get_context("spawn").Process(target=build_llama, args=(path, layers, shape, seed))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"building the model failed (exit {child.exitcode})")
    return path


def ensure_tiny(path: Path) -> Path:
    from qvlm.tiny import build_tiny_llama

    if not (path / "config.json").exists():
        build_tiny_llama(path, seed=0)
    return path


def write_calibration(folder: Path, samples: int, tokens: int) -> Path:
    """``samples`` text records of ``tokens`` words from the shapes vocabulary (one token each)."""
    words = ["red", "blue", "green", "circle", "square", "left", "right", "top"]
    path = folder / f"text-{samples}x{tokens}.jsonl"
    with path.open("w") as f:
        for i in range(samples):
            f.write(json.dumps({"text": " ".join(words[(i + k) % len(words)] for k in range(tokens))}) + "\n")
    return path


class StageProcesses:
    """The stage actors' memory read from /proc at each poll, by pid: the kernel's peak (VmHWM, what the plan
    document reports), and the largest private (anonymous + file) and shared-memory parts seen, each with the job's
    phase when it was seen (its progress line then: the peak came within one poll of it). A process's RSS
    counts the object store's pages it wrote or read (``ray.put`` of a hidden state leaves them resident in the
    writer), which the object store's own figure counts too; the private part is the stage's own memory, as
    sampled (a peak shorter than the poll can be missed: a lower bound, where VmHWM is an upper one)."""

    def __init__(self):
        self.seen: dict[int, dict] = {}

    def sample(self, phase: str = "") -> None:
        for proc in Path("/proc").iterdir():
            try:
                if not proc.name.isdigit() or not (proc / "cmdline").read_bytes().startswith(b"ray::StageWorker"):
                    continue
                kib = {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in
                       (proc / "status").read_text().splitlines()) if k in ("VmHWM", "RssAnon", "RssFile", "RssShmem")}
            except (OSError, ValueError, IndexError):  # the process ended between the listing and the read
                continue
            mine = self.seen.setdefault(int(proc.name), {"hwm": 0, "private": 0, "shared": 0})
            for key, value in (("hwm", kib["VmHWM"]), ("private", kib["RssAnon"] + kib["RssFile"]),
                               ("shared", kib["RssShmem"])):
                if value * 1024 > mine[key]:
                    mine[key], mine[f"{key}_phase"] = value * 1024, phase

    def of(self, peak_rss: int) -> dict | None:
        """The process whose last peak seen is nearest ``peak_rss`` (a stage's, from the plan document)."""
        if not self.seen:
            return None
        return min(self.seen.values(), key=lambda m: abs(m["hwm"] - peak_rss))


class ObjectStoreWatch:
    """Polls the raylet's object-store statistics from a thread: peak bytes used, bytes spilled."""

    def __init__(self, every_s: float = 0.2):
        from ray._private.internal_api import get_state_from_address

        self.every_s, self.peak, self.spilled, self.samples = every_s, 0, 0, 0
        self.actors = StageProcesses()
        self.phase = ""  # the job's last progress line, without its name and ETA
        self.state = get_state_from_address(ray._private.worker._global_node.gcs_address)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from ray._private.internal_api import get_memory_info_reply

        while not self._stop.is_set():
            try:
                stats = get_memory_info_reply(self.state, timeout_seconds=5).store_stats
            except Exception:  # the raylet is shutting down at the end of the job
                break
            self.peak = max(self.peak, stats.object_store_bytes_used)
            self.spilled = max(self.spilled, stats.spilled_bytes_total)
            self.samples += 1
            self.actors.sample(self.phase)
            self._stop.wait(self.every_s)

    def progress(self, line: str = "", *args, **kwargs) -> None:
        """The job's ``echo``: keeps its phase (``[name] searching: blocks 2/4, ETA 3s`` -> ``searching: blocks 2/4``)."""
        self.phase = line.split("] ", 1)[-1].split(", ETA")[0]

    def __enter__(self) -> "ObjectStoreWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def one_run(model_dir: Path, cal: CalibrationSettings, workers: int, cpus: int, cpus_per_worker: float) -> dict:
    init_ray(cpus)
    try:
        with ObjectStoreWatch() as watch:
            run = timed_job(model_dir, cal, QuantConfig(method="rtn"), workers, cpus_per_worker, watch.progress)
        return {**run, "store_peak": watch.peak, "store_spilled": watch.spilled, "store_polls": watch.samples,
                "actors": watch.actors}
    finally:
        ray.shutdown()


def modelled(model_dir: Path, cal: CalibrationSettings, workers: int):
    """The job's plan (stages as the driver cuts them) and cluster/memory.py's bytes per stage (rtn: depth 1)."""
    plan = make_plan(str(model_dir), CheckpointIndex.open(LocalStorage(model_dir)), QuantConfig(method="rtn"), workers,
                     cal.max_length)
    size = CalibrationSize(cal.samples, cal.batch_size, cal.max_length, plan.image_tokens)
    return plan, [stage_memory(plan, s, size, QuantConfig(method="rtn")) for s in range(len(plan.stages))]


def boundary_bytes(model_dir: Path, cal: CalibrationSettings) -> tuple[int, int]:
    """By hand, per stage boundary and per crossing: (hidden states, the per-batch extra arguments) over all
    batches. A decoder layer's call holds the hidden state [batch, tokens, hidden] in float16, the rotary cos
    and sin [1, tokens, head_dim] in float16, position ids [1, tokens] int64 and the valid-token mask [batch,
    tokens] bool (the attention mask is None: no padding, causal attention). The capture sends both; the
    quantized output carried to the next stage (``propagation: quantized``) is the hidden states alone."""
    config = json.loads((model_dir / "config.json").read_text())
    hidden, head_dim = config["hidden_size"], config["hidden_size"] // config["num_attention_heads"]
    batches, b, t = -(-cal.samples // cal.batch_size), cal.batch_size, cal.max_length
    return batches * b * t * hidden * 2, batches * (2 * t * head_dim * 2 + t * 8 + b * t)


def stage_rows(workers: int, run: dict, memory: list, baseline: int) -> list[list]:
    plan = run["plan"]
    rows = []
    for i, (s, m) in enumerate(zip(plan["stage_memory"], memory)):
        rss, w, c = s["peak_rss_bytes"], s["weight_bytes"], m.captures
        seen = run["actors"].of(rss) or {"private": 0, "shared": 0, "hwm_phase": "?", "private_phase": "?"}
        rows.append([workers if i == 0 else "", i, len(plan["stages"][i]), f"{rss / MIB:.0f}", f"{w / MIB:.0f}",
                     f"{c / MIB:.0f}", f"{m.workspace / MIB:.0f}", f"{(rss - baseline) / MIB:.0f}",
                     f"{(rss - baseline) / (w + c):.2f}", f"{(rss - baseline) / m.total:.2f}",
                     f"{seen['shared'] / MIB:.0f}", f"{seen['private'] / MIB:.0f}",
                     f"{(seen['private'] - baseline) / (w + c):.2f}", seen["hwm_phase"], seen["private_phase"]])
    return rows


def store_rows(workers: int, run: dict, by_hand: tuple[int, int]) -> list[list]:
    sent = run["plan"]["transfer_bytes"]
    boundaries = len(sent) - 1
    hand = boundaries * (2 * by_hand[0] + by_hand[1])  # capture (hidden + extra), then the carried quantized output
    return [[workers, " / ".join(f"{b / MIB:.1f}" for b in sent), f"{sum(sent) / MIB:.1f}",
             f"{boundaries} x (2 x {by_hand[0] / MIB:.1f} + {by_hand[1] / MIB:.2f})", f"{hand / MIB:.1f}",
             f"{sum(sent) / max(hand, 1):.4f}", f"{run['store_peak'] / MIB:.1f}",
             f"{run['store_peak'] / max(hand, 1):.2f}", f"{run['store_spilled'] / MIB:.0f}", run["store_polls"]]]


# --- where one stage's memory goes ---------------------------------------------------------------------------

def _rss() -> tuple[int, int]:
    """(peak RSS since the last reset, current RSS) of this process, bytes."""
    status = Path("/proc/self/status").read_text()
    field = lambda name: int(next(l for l in status.splitlines() if l.startswith(name)).split()[1]) * 1024
    return field("VmHWM:"), field("VmRSS:")


class PhaseMeter:
    """Peak RSS of each step: the kernel's high-water mark is reset before a step and read after it."""

    def __init__(self):
        self.rows: list[tuple[str, int, int]] = []

    def reset(self) -> None:
        Path("/proc/self/clear_refs").write_text("5")

    def mark(self, label: str) -> None:
        peak, now = _rss()
        self.rows.append((label, peak, now))
        self.reset()


def _profiled_stage(meter: PhaseMeter, shard):
    """qvlm.stage.Stage whose steps each end with a mark of the meter; each block's file is encoded as a stage
    actor writes it (not stored)."""
    from qvlm.stage import Stage
    from workers.shard import encode_block

    class Profiled(Stage):
        def capture(self, item, hand_over=True):
            out = super().capture(item, hand_over)
            meter.mark(f"capture batch {len(self.captures[self.units[0].index].calls)}")
            return out

        def statistics(self, base):
            out = super().statistics(base)
            meter.mark("statistics (kurtosis, sensitivity)")
            return out

        def dependencies(self, bits, previous, max_rows=4096):
            out = super().dependencies(bits, previous, max_rows)
            meter.mark("dependencies (entropy, D)")
            return out

        def keep_result(self, job, result, config):
            encode_block(result, {r.name: shard.prefix(r.name) for r in result.linears}, config.activations,
                         shard.dense_linears())

        def search_block(self, job, config, source="captured", upstream=None, needs_out=False, done=False,
                         release=False):
            out = super().search_block(job, config, source, upstream, needs_out, done, release)
            self.results.clear()  # as workers/stage.py: the integers are in the block's file
            meter.mark(f"block {job.index}: search" + (" + quantized output" if needs_out else ""))
            return out

    return Profiled


def profile_stage(model_dir: str, cal: CalibrationSettings, workers: int, queue) -> None:
    """Stage 0 of a ``workers`` cut, run in this (child) process step by step; the meter's rows go to ``queue``."""
    import torch

    from qvlm.batches import calibration_batches
    from qvlm.driver import LocalPipeline
    from qvlm.method import Hooks, Layout, run_method
    from workers.host_memory import return_freed_memory
    from workers.model_shard import ModelShard

    torch.set_num_threads(1)  # as a stage actor with cpus_per_worker 1
    return_freed_memory()  # as a stage actor
    meter = PhaseMeter()
    meter.reset()
    quant = QuantConfig(method="rtn")
    plan = make_plan(model_dir, CheckpointIndex.open(LocalStorage(model_dir)), quant, workers, cal.max_length)
    units = [plan.units[i] for i in plan.stages[0]]
    meter.mark("imports, plan")
    batches = calibration_batches(model_dir, cal)
    meter.mark(f"calibration batches ({len(batches)})")
    shard = ModelShard(LocalStorage(model_dir), [u.name for u in units], True, [u.name for u in plan.units])
    meter.mark(f"load: ModelShard of units {plan.stages[0]} + glue")
    stage = _profiled_stage(meter, shard)(shard.model, units, first=True)
    meter.mark("Stage")
    indices = tuple(u.index for u in units)
    layout = Layout(tuple(units), (indices,), (indices,))
    run_method(LocalPipeline([stage]), layout, {k: v for k, v in plan.linear_shapes.items()
                                                if any(k.startswith(u.name + ".") for u in units)}, batches, quant, Hooks())
    queue.put((meter.rows, plan.stage_bytes(0)))


def run_profile(model_dir: Path, cal: CalibrationSettings, workers: int, baseline: int) -> None:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=profile_stage, args=(str(model_dir), cal, workers, queue))
    t = time.perf_counter()
    child.start()
    rows, weights = queue.get()
    child.join()
    print(f"\nwhere stage 0 of {workers} holds its memory (one process, {time.perf_counter() - t:.0f} s; the peak RSS of "
          f"each step, the high-water mark reset before it; weights {weights / MIB:.0f} MiB, runtime baseline of the "
          f"actor {baseline / MIB:.0f} MiB):")
    before = 0
    out = []
    for label, peak, now in rows:
        out.append([label, f"{peak / MIB:.0f}", f"{(peak - before) / MIB:+.0f}", f"{now / MIB:.0f}"])
        before = now
    print(table(["step", "peak RSS MiB", "peak - RSS before MiB", "RSS after MiB"], out))
    captures = modelled(model_dir, cal, workers)[1][0].captures
    peak = max(peak for _, peak, _ in rows)
    print(f"stage peak {peak / MIB:.0f} MiB; above the baseline {(peak - baseline) / MIB:.0f} MiB = "
          f"{(peak - baseline) / (weights + captures):.2f} x (weights {weights / MIB:.0f} + captures "
          f"{captures / MIB:.0f} MiB, cluster/memory.py at {cal.samples} x {cal.max_length}). Target (issue 16): <= 1.3.")


# --- the runs ---------------------------------------------------------------------------------------------

def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None, help="default: ~/.cache/qvlm/bench/llama-wide-LAYERS")
    parser.add_argument("--tiny-dir", type=Path, default=CACHE / "tiny-llama")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the wide Llama (when built)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="resources.cpus_per_worker (1 torch thread each)")
    parser.add_argument("--profile", action="store_true", help="then profile stage 0 of the first --workers step by step")
    parser.add_argument("--skip-jobs", action="store_true", help="only the baseline and the profile")
    return parser.parse_args()


def runtime_baseline(args, folder: Path) -> int:
    tiny_cal = CalibrationSettings(str(write_calibration(folder, args.batch, 16)), args.batch, 0, 16, args.batch, args.seed)
    base_run = one_run(ensure_tiny(args.tiny_dir), tiny_cal, 1, 2, args.cpus_per_worker)
    baseline = base_run["plan"]["stage_memory"][0]["peak_rss_bytes"]
    print(f"runtime baseline: the one stage of the tiny Llama ({base_run['plan']['stage_memory'][0]['weight_bytes'] / MIB:.1f}"
          f" MiB of weights, one batch of {args.batch} x 16 tokens) peaks at {baseline / MIB:.0f} MiB RSS")
    print(f"driver peak RSS before the runs: {own_peak_rss() / MIB:.0f} MiB\n", flush=True)
    return baseline


def run_jobs(args, model_dir: Path, cal: CalibrationSettings, baseline: int) -> None:
    by_hand = boundary_bytes(model_dir, cal)
    rows, stores, drivers = [], [], []
    for w in args.workers:
        plan, memory = modelled(model_dir, cal, w)
        run = one_run(model_dir, cal, w, w + 1, args.cpus_per_worker)
        if [list(s) for s in plan.stages] != run["plan"]["stages"]:
            raise SystemExit(f"the job cut {run['plan']['stages']} but the model here says {plan.stages}")
        rows += stage_rows(w, run, memory, baseline)
        stores += store_rows(w, run, by_hand)
        secs = run["seconds"]
        drivers.append([w, f"{run['wall']:.0f}", f"{secs['load']:.0f}", f"{secs['capture']:.0f}",
                        f"{secs['statistics']:.0f}", f"{secs['search']:.0f}", f"{secs['export']:.0f}",
                        f"{own_peak_rss() / MIB:.0f}"])
        print(f"  {w} workers done in {run['wall']:.0f} s", flush=True)
    print()
    print(table(["workers", "stage", "units", "peak RSS MiB", "weights MiB", "captures MiB", "workspace MiB",
                 "RSS-baseline MiB", "(RSS-base)/(w+c)", "(RSS-base)/(w+c+ws)", "object store pages MiB",
                 "private peak MiB", "(private-base)/(w+c)", "peak RSS during", "private peak during"], rows))
    print(f"\nweights: the plan document's stage_memory weight_bytes; captures and workspace: cluster/memory.py "
          f"(capture_bytes, workspace_bytes at depth 1) at {args.samples} x {args.tokens}; baseline {baseline / MIB:.0f} MiB. "
          "Target (issue 16): (RSS-base)/(w+c) <= 1.3. The peak RSS (the kernel's high-water mark) counts the object "
          "store's pages the actor wrote or read; object store pages and private peak: the most of each seen in "
          "/proc/PID/status (RssShmem; RssAnon + RssFile) at the 0.2 s polls, a lower bound of the private peak; "
          "during: the job's progress line at the poll that first saw the peak.\n")
    print(table(["workers", "transfer_bytes per stage MiB", "sent MiB", "by hand: boundaries x (2 x hidden + extra) MiB",
                 "by hand MiB", "sent/by hand", "object store peak MiB", "peak/by hand", "spilled MiB", "polls"], stores))
    print("\nsent: the plan document's transfer_bytes (what each stage put into the object store for the next); by hand: "
          "per boundary the capture's hidden states and extra arguments plus the carried quantized output (propagation "
          "quantized); object store peak: the raylet's object_store_bytes_used, polled every 0.2 s during the job.\n")
    print(table(["workers", "job wall s", "load", "capture", "statistics", "search", "export",
                 "driver peak RSS MiB (cumulative)"], drivers))


def main() -> None:
    args = arguments()
    t = time.perf_counter()
    model_dir = ensure_model(args.model_dir or CACHE / f"llama-wide-{args.layers}", args.layers, WIDE, args.seed)
    folder = Path(tempfile.mkdtemp(prefix="qvlm-bench-memory-"))
    cal = CalibrationSettings(str(write_calibration(folder, args.samples, args.tokens)), args.samples, 0, args.tokens,
                              args.batch, args.seed)
    print(f"model {model_dir}: float16 Llama, hidden {WIDE['hidden']}, MLP {WIDE['intermediate']}, {WIDE['heads']} "
          f"heads, {args.layers} layers, vocab {WIDE['vocab']}; calibration {args.samples} samples x {args.tokens} "
          f"tokens in batches of {args.batch} (JSONL, no padding); method rtn, propagation quantized (the default); "
          f"each run on a fresh local Ray with workers + 1 logical CPUs, cpus_per_worker {args.cpus_per_worker:g} "
          f"(the machine has {multiprocessing.cpu_count()} cores)")
    try:
        baseline = runtime_baseline(args, folder)
        if not args.skip_jobs:
            run_jobs(args, model_dir, cal, baseline)
        if args.profile:
            run_profile(model_dir, cal, args.workers[0], baseline)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # the calibration files
    print(f"\nwhole script: {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
