"""The job, compiled once from its job file (``jobs.spec.JobSpec.compile``): one typed, frozen value that the
driver, the stages and the export read. Its parts and their defaults are defined once: the method's in
``qvlm.config``, the resources' here; the job file's schema takes its defaults from them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import astuple, dataclass, field

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
class Gate:
    """Thresholds the held-out evaluation must meet before the output is published (cluster/gate.py); None:
    not checked."""

    max_kl: float | None = None  # mean KL(FP || Q) in nats
    min_top1: float | None = None  # top-1 agreement with full precision, 0..1
    max_accuracy_drop: float | None = None  # FP answer accuracy minus the quantized one, 0..1

    def is_set(self) -> bool:
        return any(v is not None for v in astuple(self))


@dataclass(frozen=True)
class Job:
    name: str
    spec_hash: str  # sha256 of the job file's canonical form: names the Ray submission, detects a changed job
    where: Locations
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    quant: QuantConfig = field(default_factory=QuantConfig)
    resources: Resources = field(default_factory=Resources)
    overwrite: bool = False  # replace another qvlm job's output (never a file qvlm did not write)
    gate: Gate = field(default_factory=Gate)  # publish only when the evaluation meets it (not in spec_hash)
    job_file: str | None = None  # the validated job file as run (canonical JSON), for the manifest's provenance

    @property
    def submission_id(self) -> str:
        """Ray's name for the submission; a gate adds its own digest, so that a re-submit with another gate is
        a new submission of the same job (it publishes what the held run left)."""
        base = f"qvlm-{self.name}-{self.spec_hash[:8]}"
        if not self.gate.is_set():
            return base
        return f"{base}-{hashlib.sha256(repr(astuple(self.gate)).encode()).hexdigest()[:6]}"


def spec_hash_of(document: dict) -> str:
    """The spec hash of a job file's canonical JSON (``JobSpec.model_dump(mode="json")``), its gate left out:
    the gate decides only whether an output is published."""
    output = {k: v for k, v in document.get("output", {}).items() if k != "gate"}
    canonical = json.dumps({**document, "output": output}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
