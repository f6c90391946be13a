"""The held-out evaluation through the job's stage actors, at any model size.

Once every block is written, each stage holds its blocks as the checkpoint has them (read back from their
files) beside its full-precision linears; every held-out batch then runs through the stages twice, full precision
and quantized, as the capture does (only hidden states cross stage boundaries), and the first stage, which holds
the model's glue, finishes each pass to logits and tallies KL, top-1 agreement and answer accuracy
(qvlm.evaluate). Unquantized tensors are the model's own in both passes, as in the checkpoint.
"""

from __future__ import annotations

import time
from collections import defaultdict

from qvlm.evaluate import EvalSkipped, Evaluation, evaluation_phase
from cluster.plan import JobPlan
from cluster.state import StateFile


def evaluate_on_stages(pipe, plan: JobPlan, job, blocks, records: dict, state: StateFile) -> Evaluation:
    """Compare the written blocks with full precision on the held-out records; the stages must still hold
    their weights. ``records`` are the verified block records by block index."""
    n_batches = pipe.get(pipe.call(0, "load_evaluation", job.calibration))
    if isinstance(n_batches, EvalSkipped):
        return n_batches
    mine = defaultdict(list)
    for block in blocks:
        mine[plan.layout.stage_of(block.units[0])].append(records[block.index])
    pipe.get([pipe.call(s, "prepare_evaluation", mine[s], job.quant.activations) for s in range(pipe.n_stages)])
    state.update(phase="evaluating", steps_done=0, steps_total=n_batches)
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        state.update(steps_done=done, steps_total=total, steps_seconds=time.perf_counter() - started)

    result = evaluation_phase(pipe, n_batches, progress)
    pipe.get([pipe.call(s, "end_evaluation") for s in range(pipe.n_stages)])
    return result
