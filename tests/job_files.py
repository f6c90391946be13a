"""Job files for tests that drive the real CLI: a small two-worker job and dotted-path edits of it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def set_fields(job: dict, **changes: Any) -> None:
    """Set job fields by dotted path (``quantization.weights.bits=9``), creating sections as needed."""
    for dotted, value in changes.items():
        node = job
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value


def write_job(path: Path, name: str, model: str, out: str, **changes: Any) -> Path:
    """A two-worker qvlm job of 8 calibration samples (one clip epoch, 20 learned steps) at ``path``, with
    ``changes`` applied."""
    job = {
        "name": name,
        "model": {"path": model},
        "calibration": {"samples": 8, "eval_samples": 0, "max_length": 64, "batch_size": 4},
        "quantization": {"qvlm": {"epochs": 1, "iters": 20}},
        "output": {"uri": out},
        "resources": {"workers": 2},
    }
    set_fields(job, **changes)
    path.write_text(yaml.safe_dump(job))
    return path
