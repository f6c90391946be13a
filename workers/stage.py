"""The stage actor: a :class:`qvlm.stage.Stage` whose weights come straight from storage and whose finished
blocks go straight to the output.

It loads only its units' tensors (the first stage also the model's glue), computes on the GPU Ray gave it (the
CPU when the job reserves none), keeps its captures there or in host memory, searches the blocks inside it and
writes each block's checkpoint file and record as soon as the block is found. What it hands to the next stage
(hidden states) travels as numpy arrays, so the object store carries it without pickling; the bytes it sends
are counted for the plan document.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from qvlm.config import CalibrationSettings, QuantConfig
from qvlm.batches import calibration_answer_masks, calibration_batches, held_out_comparison
from qvlm.evaluate import EvalSkipped
from qvlm.search import BlockResult
from qvlm.stage import BlockJob, BlockSummary, Stage, compute_device
from qvlm.structure import Unit
from qvlm.veo import tower_part
from workers.export_task import ExportRequest, checkpoint_files
from workers.fault_hooks import fault_point
from workers.host_memory import return_freed_memory
from workers.locations import Locations
from workers.model_shard import ModelShard
from workers.safetensors_reader import CheckpointError
from workers.shard import BlockRecord, file_name, read_block, read_record, write_block
from workers.transport import nbytes, pack, unpack
from workers.veo_record import write_veo_record


class StageWorker(Stage):
    def __init__(self, where: Locations, units: Sequence[Unit], first: bool, all_unit_modules: Sequence[str],
                 threads: int = 1):
        import ray

        torch.set_num_threads(max(1, threads))  # the arithmetic must not depend on how many cores the node has
        return_freed_memory()
        self.where, self._output = where, None
        # A bad checkpoint (corrupt header, non-finite weights) is the job's input, not a crash: ready() raises
        # it, so the driver stops with its message instead of restarting stages that would fail the same way.
        self.load_error: CheckpointError | None = None
        try:
            self.shard = ModelShard(where.model(), [u.name for u in units], first, all_unit_modules)
        except CheckpointError as exc:
            self.load_error = exc
            return
        super().__init__(self.shard.model, units, first, device=compute_device(ray.get_gpu_ids()))
        self.batches: list[dict[str, torch.Tensor]] = []
        self.n_files = 0  # files of the final checkpoint; a block's file is number (block index)
        self.sent_bytes = 0
        self.dense = self.shard.dense_linears()

    def ready(self) -> dict[str, Any]:
        """What this stage loaded and where it runs (the tests of "a stage reads only its own units")."""
        import ray

        if self.load_error is not None:
            raise self.load_error

        device_memory = torch.cuda.mem_get_info(self.device)[1] if self.device.type == "cuda" else None
        return {"tensors": self.shard.tensor_names, "reads": [list(r) for r in self.shard.storage.reads],
                "node_id": ray.get_runtime_context().get_node_id(), "device": str(self.device),
                "device_memory": device_memory, "host_memory": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}

    def peak_rss_bytes(self) -> int:
        """Peak resident memory of this worker process so far (Linux reports ru_maxrss in KiB)."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def transfer_bytes(self) -> int:
        """Bytes this stage put into the object store for another stage (hidden states at its boundary)."""
        return self.sent_bytes

    def _send(self, value: Any) -> Any:
        packed = pack(value)
        self.sent_bytes += nbytes(packed)
        return packed

    def load_batches(self, settings: CalibrationSettings) -> int:
        """Build the calibration batches here (the first stage), where the capture reads them; returns how many."""
        self.batches = calibration_batches(self.shard.local_dir, settings)
        return len(self.batches)

    def capture(self, item: int | Any, hand_over: bool = True) -> Any:
        fault_point("capture")  # a test hook; off unless QVLM_TEST_FAULTS is set
        arrived = self.batches[item] if isinstance(item, int) else unpack(item, owned=self.keeps_on_host())
        return self._send(super().capture(arrived, hand_over))

    def carried(self) -> Any:
        return self._send(super().carried())

    def set_files(self, n_files: int) -> None:
        self.n_files = n_files

    def search_block(self, job: BlockJob, config: QuantConfig, source: str = "captured", upstream: Any = None,
                     needs_out: bool = False, done: bool = False, release: bool = False) -> BlockSummary | None:
        summary = super().search_block(job, config, source, unpack(upstream), needs_out, done, release)
        self.results.clear()  # the block's integers are in its file now (its carried output is kept apart)
        return summary

    def keep_result(self, job: BlockJob, result: BlockResult, config: QuantConfig) -> None:
        fault_point(f"block-{job.index}")  # a test hook; off unless QVLM_TEST_FAULTS is set
        if not self.n_files:
            raise RuntimeError("set_files() must be called before a block is searched")
        prefixes = {r.name: self.shard.prefix(r.name) for r in result.linears}
        write_block(self.output(), job.index, file_name(job.index, self.n_files), result, prefixes,
                    config.activations, self.dense)

    def load_evaluation(self, settings: CalibrationSettings) -> int | EvalSkipped:
        """Build the held-out batches here (the first stage); returns how many, or why there is no evaluation."""
        comparison = held_out_comparison(self.shard.local_dir, settings)
        if isinstance(comparison, EvalSkipped):
            return comparison
        self.comparison = comparison
        return len(comparison.batches)

    def prepare_evaluation(self, records: Sequence[BlockRecord], act) -> None:
        """Hold this stage's blocks as the checkpoint has them (read back from their files) for the evaluation."""
        super().prepare_evaluation([read_block(self.output(), r) for r in records], act, self.comparison)

    def evaluate_forward(self, item: int | Any, quantized: bool) -> Any:
        arrived = item if isinstance(item, int) else unpack(item, owned=self.device.type == "cpu")
        return pack(super().evaluate_forward(arrived, quantized))

    def evaluate_head(self, index: int, last: Any, quantized: bool) -> None:
        super().evaluate_head(index, unpack(last, owned=self.device.type == "cpu"), quantized)

    def export_files(self, request: ExportRequest):
        """The checkpoint's other files, written from here once the stages are done (a generator: one step per
        file, as workers/export_task.py yields them)."""
        yield from checkpoint_files(request)

    def output(self):
        """This worker's handle on the output (one ledger of what it writes, for the whole job)."""
        if self._output is None:
            self._output = self.where.output()
        return self._output

    def load_result(self, job: BlockJob) -> BlockResult:
        out = self.output()
        record = read_record(out, job.index)
        if record is None:
            raise RuntimeError(f"block {job.index} was marked finished but has no record in {out.uri}")
        return read_block(out, record)

    def adopt_tower(self, record: BlockRecord, blocks: dict[int, Sequence[str]], act) -> list[BlockRecord]:
        """Write each vision block (index -> its unit names) as its part of the VEO-tuned tower (``record``)."""
        tower, written = read_block(self.output(), record), []
        for index, unit_names in blocks.items():
            part = tower_part(tower, unit_names)
            prefixes = {r.name: self.shard.prefix(r.name) for r in part.linears}
            written.append(write_block(self.output(), index, file_name(index, self.n_files), part, prefixes, act,
                                       self.dense))
        return written

    def use_quantized(self, record: BlockRecord, act) -> None:
        """Run this stage's model with a finished block's quantizers from here on (the VEO-tuned vision tower)."""
        self.apply([read_block(self.output(), record)], act)

    def veo(self, step: str, *args: Any) -> Any:
        """A step of VEO's part in this stage (``Stage.veo``) with the worker's ends: the first stage builds the
        answer positions from its calibration (``begin`` gets the settings) and takes its batches by index, and
        ``finish`` writes the tuned tower and returns its record. What goes to another stage is packed."""
        args = unpack(args, owned=True)
        if step == "begin" and self.first:
            *head, calibration = args
            args = (*head, calibration_answer_masks(self.shard.local_dir, calibration))
        elif step == "forward" and self.first:
            index, item, mode = args
            args = (index, self.batches[item], mode)
        result = super().veo(step, *args)
        if step == "finish":
            prefixes = {r.name: self.shard.prefix(r.name) for r in result.block.linears}
            return write_veo_record(self.output(), result, prefixes, self._veo.activations, self.dense)
        return self._send(result)
