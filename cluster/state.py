"""The job's state file, ``<output>/_qvlm/state.json``: where a job stands, readable with no cluster."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace

STATE_KEY = "_qvlm/state.json"
PHASES = ("planning", "capturing", "statistics", "searching", "committing", "finished", "failed")


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

    def eta_seconds(self) -> float | None:
        searched = self.blocks_done - self.blocks_resumed
        if self.phase != "searching" or searched <= 0:
            return None
        per_block = self.seconds.get("search_elapsed", 0.0) / searched
        return per_block * (self.blocks_total - self.blocks_done)

    def line(self) -> str:
        eta = self.eta_seconds()
        text = f"[{self.name}] {self.phase}: blocks {self.blocks_done}/{self.blocks_total}"
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
        self.state = replace(self.state, updated_at=time.time(), **changes)
        self.storage.put_bytes(STATE_KEY, json.dumps(asdict(self.state), sort_keys=True, indent=1).encode())
        self.echo(self.state.line(), flush=True)
        return self.state


def read_state(storage) -> JobState | None:
    if not storage.exists(STATE_KEY):
        return None
    return JobState(**json.loads(storage.get_bytes(STATE_KEY)))
