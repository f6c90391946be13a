"""Entry point of a driver submitted through Ray's Jobs API: ``python -m jobs.entry <base64 spec>``."""

from __future__ import annotations

import base64
import json
import sys


def main(argv: list[str]) -> int:
    """Exit 0 done; 128 + the signal's number when stopped (``ray job stop`` sends SIGTERM): the driver then
    records "stopped" and releases the output's lock (cluster/stopping.py)."""
    from cluster import stopping
    from cluster.driver import run_job
    from cluster.validate import validate
    from qvlm.evaluate import evaluation_line
    from jobs.spec import JobSpec

    job = JobSpec.model_validate(json.loads(base64.b64decode(argv[0]))).compile()
    with stopping.stop_on_signals():
        try:
            outcome = run_job(job, validate(job, local_run=False), address="auto")
        except KeyboardInterrupt:
            print(f"stopped by {stopping.received()}", flush=True)
            return stopping.exit_code()
    print(f"done: {outcome.blocks} blocks ({outcome.blocks_resumed} resumed) -> {outcome.output_uri}", flush=True)
    print(evaluation_line(outcome.evaluation), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
