"""The whole-model evaluation of a written checkpoint against full precision on the held-out records.

It loads the whole model twice (the source, and the checkpoint as written with ``from_pretrained``), so it is
for models that fit one process: the check (tests, ``bench/evaluation.py``) that a job's evaluation through its
stages (cluster/evaluation.py) gives the figures of the checkpoint users will load.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from qvlm.config import CalibrationSettings
from qvlm.evaluate import EvalResult, EvalSkipped
from qvlm.batches import records_for
from workers.locations import Locations
from workers.storage import LocalStorage, open_storage


def _local_copy(storage, skip_prefix: str = "_qvlm/") -> Path:
    if isinstance(storage, LocalStorage):
        return Path(storage.uri)
    dest = Path(tempfile.mkdtemp(prefix="qvlm-eval-"))
    for key in storage.list(""):
        if not key.startswith(skip_prefix):
            storage.download(key, dest / key)
    return dest


def evaluate_checkpoint(where: Locations, calibration: CalibrationSettings) -> EvalResult | EvalSkipped:
    records = records_for(calibration)[1]
    if not records:
        return EvalSkipped("calibration.eval_samples is 0")
    source, output = _local_copy(where.model()), _local_copy(open_storage(where.output_uri, where.output_endpoint))
    try:
        return evaluate_folders(source, output, records, calibration)
    finally:
        for copy, uri in ((source, where.model_uri), (output, where.output_uri)):
            if str(copy) != uri and copy.name.startswith("qvlm-eval-"):
                shutil.rmtree(copy, ignore_errors=True)


def evaluate_folders(source: Path, output: Path, records, calibration: CalibrationSettings) -> EvalResult:
    """The source model and the checkpoint in ``output`` (both local folders), loaded whole, on ``records``."""
    from qvlm.evaluate import evaluate_records

    fp, q, processor = load_whole(source, output)
    return evaluate_records(fp, q, processor, records, calibration.max_length, calibration.batch_size)


def load_whole(source: Path, output: Path):
    """(full-precision model, checkpoint as written with its static activation ranges, processor)."""
    from transformers import AutoConfig, CompressedTensorsConfig

    from qvlm.batches import load_preprocessor
    from qvlm.export import ACTIVATIONS_FILE, apply_activation_ranges
    from qvlm.loading import model_class

    cls = model_class(AutoConfig.from_pretrained(source))
    fp = cls.from_pretrained(source, use_safetensors=True).eval()  # never a pickle (.bin) beside the safetensors
    q = cls.from_pretrained(output, use_safetensors=True, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    if (output / ACTIVATIONS_FILE).exists():
        apply_activation_ranges(q, (output / ACTIVATIONS_FILE).read_bytes())
    return fp, q, load_preprocessor(source)[1]  # a multimodal model's processor without its video processor
