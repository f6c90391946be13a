"""Where a job stands, read from its output alone (no cluster needed): the state file, told apart from a run
that is gone by the output's lock.

A state whose phase is not final (finished, failed, stopped) is only true while a run holds the lock: with no
lock, or a lock whose holder is gone (cluster/lock.py decides staleness), the run was killed or cancelled and
the job is reported stopped, with the age of its last heartbeat.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from cluster.lock import FoundLock, find_lock
from cluster.state import FINAL_PHASES, JobState, read_state


@dataclass(frozen=True)
class OutputStatus:
    state: JobState
    line: str
    stopped: bool  # the phase says running, but no live run holds the output

    @property
    def exit_code(self) -> int:
        """0 finished or running, 1 failed, stopped or held by the gate (not published)."""
        return 1 if self.stopped or self.state.phase in ("failed", "stopped", "held") else 0


def output_status(storage, now: float | None = None) -> OutputStatus | None:
    """The status of the job in ``storage``; None when it holds no job state."""
    state = read_state(storage)
    if state is None:
        return None
    now = time.time() if now is None else now
    if state.phase in FINAL_PHASES:
        return OutputStatus(state, state.line(), False)
    found = find_lock(storage)
    again = read_state(storage) if found is None else None
    if again is not None and again.phase in FINAL_PHASES:  # the run ended between the two reads
        return OutputStatus(again, again.line(), False)
    if found is None:
        why = f"no run holds the output's lock (last update {now - state.updated_at:.0f}s ago)"
    else:
        reason = found.stale_reason(now)
        if reason is None:
            beat = found.holder.heartbeat_at if found.holder is not None else found.modified_at
            return OutputStatus(state, f"{state.line()} (heartbeat {now - beat:.0f}s ago)", False)
        why = f"the lock's holder is gone: {reason} (last heartbeat {_heartbeat_age(found, now)})"
    line = (f"[{state.name}] stopped during {state.phase}: blocks {state.blocks_done}/{state.blocks_total} - {why}; "
            "re-submit to resume")
    return OutputStatus(state, line, True)


def _heartbeat_age(found: FoundLock, now: float) -> str:
    if found.holder is None:
        return f"unknown: the lock was last written {now - found.modified_at:.0f}s ago"
    return f"{now - found.holder.heartbeat_at:.0f}s ago"

