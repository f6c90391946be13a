"""The export: one worker (the first stage actor, or a task) writes the rest of the checkpoint around the blocks' files (the unquantized
tensors, the index, config.json, the processor files, the activation sidecar), file by file, and the driver
counts the files as the committing phase's steps (for the progress line and its ETA)."""

from __future__ import annotations

import time

from cluster.job import Job


def export_checkpoint(ray, job: Job, rest_chunks: tuple, blocks: tuple, schemes: dict, state, stage=None) -> dict:
    """Write every checkpoint file the blocks did not write; ``blocks`` are their records in block order. Returns
    {key: {"sha256", "size"}} of every checkpoint file, the blocks' included, for the manifest. ``stage``, when
    given, is the job's first stage actor, which writes them (a running process, whose imports are done);
    otherwise a new worker task does (a repair, when no stages run)."""
    from workers.export_task import ExportRequest, checkpoint_files

    request = ExportRequest(job.where, tuple(blocks), tuple(rest_chunks), dict(schemes),
                            job.quant.activations)
    if stage is not None:
        steps = stage.export_files.options(num_returns="streaming").remote(request)
    else:
        task = ray.remote(checkpoint_files).options(num_returns="streaming", num_cpus=job.resources.cpus_per_worker,
                                                    max_retries=job.resources.max_retries)
        steps = task.remote(request)
    written, t0 = {}, time.perf_counter()
    for step, ref in enumerate(steps, 1):
        files, total = ray.get(ref)
        written.update(files)
        state.update(steps_done=min(step, total), steps_total=total, steps_seconds=time.perf_counter() - t0)
    return written
