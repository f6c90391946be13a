"""Helpers shared by the benchmark scripts (not a test module; pytest only collects ``tests/``)."""

from __future__ import annotations

import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

from cluster.driver import run_job
from cluster.job import Job, Resources
from workers.locations import Locations
from qvlm.config import CalibrationSettings, QuantConfig

CACHE = Path.home() / ".cache" / "qvlm" / "bench"
MIB = 2**20


def quiet(*args, **kwargs) -> None:
    """``echo`` for run_job that drops the phase lines, so only the tables are printed."""


def init_ray(num_cpus: int) -> None:
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             object_store_memory=512 * MIB)


def settings(model_dir: Path, out: Path, cal: CalibrationSettings, quant: QuantConfig, workers: int,
             cpus_per_worker: float = 1) -> Job:
    return Job(f"bench-w{workers}", f"{workers:064d}", Locations(str(model_dir), str(out)), cal, quant,
               Resources(workers=workers, cpus_per_worker=cpus_per_worker))


def timed_job(model_dir: Path, cal: CalibrationSettings, quant: QuantConfig, workers: int,
              cpus_per_worker: float = 1, echo=quiet) -> dict:
    """Run one job into a fresh temp folder; its phase seconds, wall time and plan document. ``echo`` gets the
    job's progress lines (dropped by default)."""
    tmp = Path(tempfile.mkdtemp(prefix="qvlm-bench-"))
    out = tmp / "out"
    t = time.perf_counter()
    outcome = run_job(settings(model_dir, out, cal, quant, workers, cpus_per_worker), echo=echo)
    wall = time.perf_counter() - t
    plan = json.loads((out / "qvlm_plan.json").read_text())
    shutil.rmtree(tmp, ignore_errors=True)  # after timing; the 1 GB model's shards would pile up in /tmp
    return {"seconds": dict(outcome.seconds), "wall": wall, "plan": plan, "blocks": outcome.blocks}


def own_peak_rss() -> int:
    """This process's peak RSS in bytes (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def table(headers: list[str], rows: list[list], widths: list[int] | None = None) -> str:
    """A plain fixed-width table; the first column left-aligned, the rest right-aligned."""
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = widths or [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(headers), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]])
