"""Where a job reads its model and writes its output."""

from __future__ import annotations

from dataclasses import dataclass

from workers.storage import open_storage


@dataclass(frozen=True)
class Locations:
    """Where a job reads its model and writes its output (an S3 endpoint for each, when not AWS)."""

    model_uri: str
    output_uri: str
    model_endpoint: str | None = None
    output_endpoint: str | None = None

    def model(self):
        return open_storage(self.model_uri, self.model_endpoint)

    def output(self):
        return open_storage(self.output_uri, self.output_endpoint)
