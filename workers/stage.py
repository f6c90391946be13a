"""A pipeline stage: holds a contiguous range of units (and, for the first stage, the model's glue).

The first stage runs the model's own forward pass (embeddings, vision tower, projector merge) and stops
after its last unit; later stages own units of the last stream only and call them directly on the hidden
state handed over by the stage before, since every unit of one layer list takes the same extra arguments.
Each stage keeps what it captured for its units until the job has taken what it needs.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from qvlm.batches import CalibrationSettings, calibration_batches
from qvlm.capture import UnitCall, UnitCapture, call_unit, capture_units
from qvlm.dependency import pair_dependency, unit_entropy, unit_rows
from qvlm.fakequant import swap_in_fake_quant
from qvlm.loading import build_skeleton, checkpoint_key_map, glue_names, materialize, owned_names
from qvlm.quant import WeightScheme
from qvlm.search import apply_linear_results
from qvlm.stats import UnitStats, unit_statistics
from qvlm.structure import Unit
from workers.fault_hooks import fault_point
from workers.safetensors_reader import CheckpointError, CheckpointIndex
from workers.storage import open_model, open_storage

SMALL_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")


def fetch_small_files(storage, dest: Path | None = None) -> Path:
    """Copy the model's config, tokenizer and processor files (never the weights) to a local folder.

    By default the folder is one per model URI under the temp directory, reused by later calls, so jobs
    do not leave a new folder behind each time.
    """
    from workers.storage import TMP_MARK

    reused = dest is None
    if reused:
        digest = hashlib.sha256(storage.uri.encode()).hexdigest()[:16]
        dest = Path(tempfile.gettempdir()) / "qvlm-model-files" / digest
    dest.mkdir(parents=True, exist_ok=True)
    keys = [key for key in storage.list("") if "/" not in key and key.endswith(SMALL_FILE_SUFFIXES)]
    for key in keys:
        storage.download(key, dest / key)
    # a file since removed from the model (a config.json, a tokenizer file) must not live on in the reused folder;
    # other processes' downloads in flight are temp files, left alone
    for stale in dest.iterdir() if reused else ():
        if stale.is_file() and stale.name not in keys and not stale.name.startswith(TMP_MARK):
            stale.unlink(missing_ok=True)
    return dest


class ModelShard:
    """A skeleton of the model with real tensors only for the given unit modules (plus glue if asked)."""

    def __init__(self, uri: str, endpoint_url: str | None, unit_modules: Sequence[str], glue: bool,
                 all_unit_modules: Sequence[str] = ()):
        from transformers import AutoConfig

        self.storage = open_model(uri, endpoint_url)
        self.local_dir = fetch_small_files(self.storage)
        self.model = build_skeleton(AutoConfig.from_pretrained(self.local_dir))
        index = CheckpointIndex.open(self.storage)
        keymap = checkpoint_key_map(self.model, index.names)
        names = owned_names(self.model, unit_modules)
        if glue:
            names += glue_names(self.model, all_unit_modules)
        wanted = {n: keymap[n] for n in names if n in keymap}
        loaded = index.read(wanted.values())
        materialize(self.model, {n: loaded[k] for n, k in wanted.items()})
        self.tensor_names = sorted(wanted)

    def module(self, name: str):
        return self.model.get_submodule(name)


class StageWorker:
    def __init__(self, uri: str, endpoint_url: str | None, units: Sequence[Unit], first: bool,
                 all_unit_modules: Sequence[str]):
        self.units = list(units)
        self.first = first
        self.model_uri, self.endpoint_url = uri, endpoint_url
        self.captures = [UnitCapture(u) for u in self.units]
        # A bad checkpoint (corrupt header, non-finite weights) is the job's input, not a crash: ready() raises
        # it, so the driver stops with its message instead of restarting stages that would fail the same way.
        self.load_error: CheckpointError | None = None
        try:
            self.shard = ModelShard(uri, endpoint_url, [u.name for u in units], first, all_unit_modules)
        except CheckpointError as exc:
            self.load_error = exc

    def ready(self) -> dict[str, Any]:
        """What this stage loaded and where it runs (the tests of "a stage reads only its own units")."""
        import ray

        if self.load_error is not None:
            raise self.load_error

        return {"tensors": self.shard.tensor_names, "reads": [list(r) for r in self.shard.storage.reads],
                "node_id": ray.get_runtime_context().get_node_id()}

    def peak_rss_bytes(self) -> int:
        """Peak resident memory of this worker process so far (Linux reports ru_maxrss in KiB)."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def calibration_batches(self, settings: CalibrationSettings) -> list[dict[str, torch.Tensor]]:
        return calibration_batches(self.shard.local_dir, settings)

    @torch.no_grad()
    def capture(self, item: dict[str, torch.Tensor] | UnitCall) -> UnitCall:
        """Capture one calibration batch; returns the call that continues the stream in the next stage."""
        fault_point("capture")  # a test hook; off unless QVLM_TEST_FAULTS is set
        if self.first:
            caps = capture_units(self.shard.model, self.units, [item], stop_after_last=True)
            for mine, new in zip(self.captures, caps):
                mine.calls += new.calls
                mine.outputs += new.outputs
        else:
            call = item
            for cap in self.captures:
                out = call_unit(self.shard.module(cap.unit.name), call)
                cap.calls.append(call)
                cap.outputs.append(out)
                call = call.with_hidden(out)
        last = self.captures[-1]
        return last.calls[-1].with_hidden(last.outputs[-1])

    @torch.no_grad()
    def statistics(self, base: WeightScheme) -> list[UnitStats]:
        return [unit_statistics(self.shard.module(c.unit.name), c.unit, c.unit.linears, c.calls, base) for c in self.captures]

    def dependencies(self, bits: dict[int, int], previous_in_stream: dict[int, int | None], max_rows: int = 4096):
        """Entropy of each own unit and D(prev, unit) for each own unit that has a predecessor in its stream.

        The predecessor's output is either another own unit's output or, for the first own unit, the hidden
        state this stage received (which is the previous stage's last output).
        """
        rows = {c.unit.index: unit_rows(c.outputs, [k.mask for k in c.calls], max_rows) for c in self.captures}
        entropy = {i: unit_entropy(r, bits[i]) for i, r in rows.items()}
        deps = {}
        for c in self.captures:
            prev = previous_in_stream.get(c.unit.index)
            if prev is None:
                continue
            prev_rows = rows.get(prev)
            if prev_rows is None:
                prev_rows = unit_rows([k.hidden for k in c.calls], [k.mask for k in c.calls], max_rows)
            deps[c.unit.index] = pair_dependency(prev_rows, rows[c.unit.index], bits[prev], bits[c.unit.index])
        return entropy, deps

    def use_quantized(self, output_uri: str, output_endpoint: str | None, shard_key: str, sha256: str, act) -> None:
        """Run this stage's model with a finished block's quantizers from here on (the VEO-tuned vision tower)."""
        from workers.block_task import decode_shard, shard_linears_meta  # block_task imports this module

        blob = open_storage(output_uri, output_endpoint).get_bytes(shard_key, sha256)
        linears = decode_shard(blob, shard_linears_meta(blob))
        apply_linear_results(swap_in_fake_quant(self.shard.model, [r.name for r in linears]), linears, act)

    def run_veo(self, output_uri: str, output_endpoint: str | None, units: Sequence[Unit], schemes: dict,
                bits: dict[int, int], config, calibration: CalibrationSettings):
        """Visual-encoder optimisation in this actor (the first stage, which owns the vision tower): it already
        holds its resources, so a separate task could not be scheduled while the stages hold the cluster."""
        from workers.veo_task import run_veo  # veo_task imports this module

        return run_veo(self.model_uri, self.endpoint_url, output_uri, output_endpoint, units, schemes, bits,
                       config, calibration)

    def reset_captures(self) -> None:
        """Drop what was captured, before capturing again."""
        self.captures = [UnitCapture(u) for u in self.units]

    def unit_calls(self, unit_index: int) -> list[UnitCall]:
        return self._capture(unit_index).calls

    def unit_outputs(self, unit_index: int) -> list[torch.Tensor]:
        return self._capture(unit_index).outputs

    def _capture(self, unit_index: int) -> UnitCapture:
        return next(c for c in self.captures if c.unit.index == unit_index)
