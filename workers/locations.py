"""Where a job reads its model and writes its output."""

from __future__ import annotations

from dataclasses import dataclass

from workers.storage import open_model, open_output


@dataclass(frozen=True)
class Locations:
    """Where a job reads its model and writes its output (an S3 endpoint for each, when not AWS)."""

    model_uri: str
    output_uri: str
    model_endpoint: str | None = None
    output_endpoint: str | None = None

    def model(self):
        """The model's storage, read only (a model folder may be made of links, as a Hugging Face cache is)."""
        return open_model(self.model_uri, self.model_endpoint)

    def output(self):
        """The output's storage, writing through a ledger and never following a link (workers.storage)."""
        return open_output(self.output_uri, self.output_endpoint)
