"""The export: one worker task writes the compressed-tensors checkpoint from the block shards, file by file,
and the driver counts the files as the committing phase's steps (for the progress line and its ETA)."""

from __future__ import annotations

import time

from cluster.settings import JobSettings


def export_checkpoint(ray, settings: JobSettings, shards: tuple[tuple[str, str], ...], schemes: dict, state) -> dict:
    """Write every checkpoint file from ``shards`` ((block shard key, sha256) in block order); returns
    {key: {"sha256", "size"}} for the manifest."""
    from workers.export_task import ExportRequest, checkpoint_files

    request = ExportRequest(settings.model_uri, settings.model_endpoint, settings.output_uri, settings.output_endpoint,
                            shards, dict(schemes), settings.quant.activations)
    task = ray.remote(checkpoint_files).options(num_returns="streaming", num_cpus=settings.cpus_per_worker,
                                                max_retries=settings.max_retries)
    written, t0 = {}, time.perf_counter()
    for step, ref in enumerate(task.remote(request), 1):
        files, total = ray.get(ref)
        written.update(files)
        state.update(steps_done=min(step, total), steps_total=total, steps_seconds=time.perf_counter() - t0)
    return written
