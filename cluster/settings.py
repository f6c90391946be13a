"""What the driver needs to run one job: the job file, validated and resolved (built by ``jobs``)."""

from __future__ import annotations

from dataclasses import dataclass

from qvlm.batches import CalibrationSettings
from qvlm.config import QuantConfig
from workers.locations import Locations


@dataclass(frozen=True)
class JobSettings:
    name: str
    spec_hash: str
    model_uri: str  # local directory or s3://bucket/prefix
    output_uri: str  # local directory or s3://bucket/prefix
    calibration: CalibrationSettings
    quant: QuantConfig
    model_endpoint: str | None = None
    output_endpoint: str | None = None
    overwrite: bool = False
    workers: int = 2
    gpus_per_worker: float = 0
    cpus_per_worker: float = 1
    max_retries: int = 3
    placement: str = "pack"  # "pack" or "spread": the stage placement group's strategy across nodes

    @property
    def locations(self) -> Locations:
        return Locations(self.model_uri, self.output_uri, self.model_endpoint, self.output_endpoint)

    @property
    def submission_id(self) -> str:
        return f"qvlm-{self.name}-{self.spec_hash[:8]}"
