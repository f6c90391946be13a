"""Fan the block searches out as Ray tasks and collect their records as they finish.

``propagation: fp``: every block starts at once. ``propagation: quantized`` (Eq. 3): a block takes the
quantized output of the block before it in its stream as its input, so Ray starts it once that output
exists (a wavefront); already finished blocks are replayed from their shards to produce that output.
"""

from __future__ import annotations

import time

from cluster.settings import JobSettings
from workers.block_task import BlockRecord, replay_block, run_block


def search_blocks(ray, settings: JobSettings, blocks, specs, inputs, finished: dict, state, t_start: float) -> dict:
    """Run every unfinished block; at most ``resources.workers`` searches are in flight at once."""
    options = dict(num_cpus=settings.cpus_per_worker, num_gpus=settings.gpus_per_worker or 0,
                   max_retries=settings.max_retries)
    search = ray.remote(run_block).options(num_returns=2, **options)
    replay = ray.remote(replay_block).options(**options)
    quantized = settings.quant.propagation == "quantized"
    common = (settings.model_uri, settings.model_endpoint, settings.output_uri, settings.output_endpoint)
    pending, records, carried = {}, dict(finished), None
    for i, (block, spec, (calls, targets)) in enumerate(zip(blocks, specs, inputs)):
        same_stream = i > 0 and blocks[i - 1].stream == block.stream
        upstream = carried if quantized and same_stream else None
        needs_out = quantized and i + 1 < len(blocks) and blocks[i + 1].stream == block.stream
        if block.index in finished:
            carried = replay.remote(*common, spec, finished[block.index], calls, targets, settings.quant, upstream) if needs_out else None
            continue
        while len(pending) >= settings.workers:
            _collect_one(ray, pending, records, state, t_start)
        rec_ref, out_ref = search.remote(*common, spec, calls, targets, settings.quant, upstream, needs_out)
        pending[rec_ref] = block.index
        carried = out_ref
    while pending:
        _collect_one(ray, pending, records, state, t_start)
    return records


def _collect_one(ray, pending: dict, records: dict, state, t_start: float) -> None:
    done, _ = ray.wait(list(pending), num_returns=1)
    record: BlockRecord = ray.get(done[0])
    records[pending.pop(done[0])] = record
    elapsed = time.perf_counter() - t_start
    state.update(blocks_done=len(records), seconds={**state.state.seconds, "search_elapsed": elapsed})
