"""The job, compiled once from its job file (``jobs.spec.JobSpec.compile``): one typed, frozen value that the
driver, the stages and the export read. Its parts and their defaults are defined once: the method's in
``qvlm.config``, the resources' here; the job file's schema takes its defaults from them."""

from __future__ import annotations

from dataclasses import dataclass, field

from qvlm.config import CalibrationSettings, QuantConfig
from workers.locations import Locations


@dataclass(frozen=True)
class Resources:
    workers: int = 2  # stage actors, each holding a contiguous run of units
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    max_retries: int = 3
    placement: str = "pack"  # the stage placement group's strategy across nodes: "pack" or "spread"
    gpu_memory_gb: float | None = None  # one GPU's memory, for planning where no cluster reports it


@dataclass(frozen=True)
class Job:
    name: str
    spec_hash: str  # sha256 of the job file's canonical form: names the Ray submission, detects a changed job
    where: Locations
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    quant: QuantConfig = field(default_factory=QuantConfig)
    resources: Resources = field(default_factory=Resources)
    overwrite: bool = False  # replace another qvlm job's output (never a file qvlm did not write)

    @property
    def submission_id(self) -> str:
        return f"qvlm-{self.name}-{self.spec_hash[:8]}"
