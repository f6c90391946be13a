"""Test hook for fault injection; does nothing unless ``QVLM_TEST_FAULTS`` names a folder.

Only the fault tests (tests/test_faults.py) and the soak benchmark (bench/soak.py) set it. At a fault point
the process looks in that folder for:

- ``kill-<point>`` (or ``kill-<point>.<anything>``, to fire more than once): the process claims the file by
  moving it into ``fired/`` and exits at once with no cleanup, as on a preempted machine; each file fires
  once, whichever process claims it first;
- ``hold-<point>``: the process waits at the point while the file exists (and writes its pid into
  ``hold-<point>.held``), so a test can act while a job stands at a known place.

Points: ``block-<index>`` in a stage actor after a block's search, before it writes anything; ``capture`` in a
stage actor at the start of each capture call.
"""

from __future__ import annotations

import os
import time

ENV = "QVLM_TEST_FAULTS"
KILL_EXIT_CODE = 137


def fault_point(point: str) -> None:
    folder = os.environ.get(ENV)
    if folder:
        _hold(folder, point)
        _kill(folder, point)


def _hold(folder: str, point: str) -> None:
    hold = os.path.join(folder, f"hold-{point}")
    if not os.path.exists(hold):
        return
    with open(f"{hold}.held", "w") as f:
        f.write(str(os.getpid()))
    while os.path.exists(hold):
        time.sleep(0.2)


def _kill(folder: str, point: str) -> None:
    for name in sorted(os.listdir(folder)):
        if name != f"kill-{point}" and not name.startswith(f"kill-{point}."):
            continue
        os.makedirs(os.path.join(folder, "fired"), exist_ok=True)
        try:
            os.rename(os.path.join(folder, name), os.path.join(folder, "fired", name))
        except FileNotFoundError:
            continue  # another process claimed it first
        os._exit(KILL_EXIT_CODE)
