"""The job's state file, ``<output>/_qvlm/state.json``: where a job stands, readable with no cluster.

Each update is also printed as one progress line. The phases that move through countable steps show them,
with an ETA once a step has been timed: capturing (calibration batches), tuning (VEO's training steps, when it
is on), searching (blocks; blocks resumed from an earlier run are not timed), evaluating (held-out batches) and
committing (checkpoint files written by the export).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields, replace

from qvlm.errors import InputError

STATE_KEY = "_qvlm/state.json"
PHASES = ("planning", "capturing", "statistics", "tuning", "searching", "evaluating", "committing",
          "finished", "held", "failed", "stopped")
FINAL_PHASES = ("finished", "held", "failed", "stopped")  # held: written and evaluated, but the gate failed
STEP_UNITS = {"capturing": "batches", "tuning": "steps", "evaluating": "batches", "committing": "files"}  # searching counts blocks in its own fields


class StateError(InputError, ValueError):
    """The state file is not a qvlm state (exit 2)."""


@dataclass(frozen=True)
class Progress:
    """The steps of a phase: ``skipped`` were done before this run started timing them (resumed blocks)."""

    unit: str
    done: int
    total: int
    skipped: int
    seconds: float

    def eta_seconds(self) -> float | None:
        timed = self.done - self.skipped
        if timed <= 0 or self.total <= 0 or self.seconds <= 0:  # nothing timed yet
            return None
        return self.seconds / timed * max(self.total - self.done, 0)


@dataclass(frozen=True)
class JobState:
    name: str
    spec_hash: str
    phase: str = "planning"
    blocks_total: int = 0
    blocks_done: int = 0
    blocks_resumed: int = 0
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    seconds: dict = field(default_factory=dict)
    error: str | None = None
    steps_done: int = 0  # the current phase's steps (STEP_UNITS), with the seconds they took
    steps_total: int = 0
    steps_seconds: float = 0.0

    def progress(self) -> Progress | None:
        if self.phase == "searching":
            return Progress("blocks", self.blocks_done, self.blocks_total, self.blocks_resumed,
                            self.seconds.get("search_elapsed", 0.0))
        unit = STEP_UNITS.get(self.phase)
        if unit is None or self.steps_total <= 0:
            return None
        return Progress(unit, self.steps_done, self.steps_total, 0, self.steps_seconds)

    def eta_seconds(self) -> float | None:
        progress = self.progress()
        return progress.eta_seconds() if progress is not None else None

    def line(self) -> str:
        progress = self.progress()
        if progress is not None:
            text = f"[{self.name}] {self.phase}: {progress.unit} {progress.done}/{progress.total}"
        elif self.blocks_total > 0:
            text = f"[{self.name}] {self.phase}: blocks {self.blocks_done}/{self.blocks_total}"
        else:  # before the partition: no blocks to count yet
            text = f"[{self.name}] {self.phase}"
        eta = self.eta_seconds()
        if eta is not None:
            text += f", ETA {eta:.0f}s"
        if self.error:
            text += f" - {self.error}"
        return text


class StateFile:
    """Writes each new state to storage and prints it as one line (Ray's job logs pick the lines up)."""

    def __init__(self, storage, state: JobState, echo=print, guard=None):
        self.storage, self.state, self.echo = storage, state, echo
        self.guard = guard  # called before every write; raises when this run may no longer write (lost lock)

    def check(self) -> None:
        if self.guard is not None:
            self.guard()

    def update(self, **changes) -> JobState:
        self.check()
        if "phase" in changes and changes["phase"] != self.state.phase:  # a new phase counts its own steps
            changes = {"steps_done": 0, "steps_total": 0, "steps_seconds": 0.0, **changes}
        self.state = replace(self.state, updated_at=time.time(), **changes)
        self.storage.put_bytes(STATE_KEY, json.dumps(asdict(self.state), sort_keys=True, indent=1).encode())
        self.echo(self.state.line(), flush=True)
        return self.state


def read_state(storage) -> JobState | None:
    """The state in ``storage``, None when there is none; StateError naming the file when it is not a state.
    Fields this version does not know are ignored, so an older qvlm can read a newer state."""
    if not storage.exists(STATE_KEY):
        return None
    where = f"{storage.uri.rstrip('/')}/{STATE_KEY}"
    try:
        doc = json.loads(storage.get_bytes(STATE_KEY))
        known = {f.name for f in fields(JobState)}
        return JobState(**{k: v for k, v in doc.items() if k in known})
    except (ValueError, TypeError, AttributeError) as exc:
        raise StateError(f"{where} is not a qvlm job state ({exc}); remove it or choose "
                         "another output.uri") from None
