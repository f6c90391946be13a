"""What ``qvlm-submit`` shows while it drives a job from this machine, and where Ray's own output goes.

Progress is one line per state update (cluster/state.py), written and flushed line by line when stdout is not
a terminal; on a terminal the current phase's line is rewritten in place and every other line keeps its own.
Ray's own output (its logging at ``ray.init``, e.g. the token-authentication warning, the messages of its
C++ core, Python warnings in the driver) goes to the process's stderr; while the job runs, stderr (file
descriptor 2, so child processes and native code too) is the job's log file, named in the first progress
line, so none of it lands in the middle of a progress line.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from cluster.state import FINAL_PHASES, PHASES

_STATE_LINE = re.compile(rf"^\[[^\]]*\] ({'|'.join(PHASES)}): ")


def progress_printer(live: bool):
    """On a terminal, the phase's line rewritten in place; otherwise one plain line per update, flushed."""

    def echo(line: str, flush: bool = True) -> None:
        if not live:
            print(line, flush=True)
            return
        match = _STATE_LINE.match(line)
        if match and match.group(1) not in FINAL_PHASES:
            print(f"\r\x1b[K{line}", end="", flush=True)
        else:
            print(f"\r\x1b[K{line}", flush=True)

    return echo


def line_by_line() -> None:
    """Flush stdout at every line when it is not a terminal (Python buffers a pipe in blocks)."""
    if not sys.stdout.isatty() and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)


def job_log_path(name: str) -> Path:
    """A new log file for one run of job ``name``: ~/.cache/qvlm/logs (XDG_CACHE_HOME), else the temp folder."""
    stamp = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qvlm" / "logs"
        folder.mkdir(parents=True, exist_ok=True)
    except (OSError, RuntimeError):  # no home folder, or not writable
        folder = Path(tempfile.gettempdir())
    return folder / stamp


@contextmanager
def stderr_to(path: Path):
    """Send this process's stderr, at the file-descriptor level, to ``path`` (appended) while the block runs."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
    try:
        yield path
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def is_state_line(line: str) -> bool:
    """Whether ``line`` is a progress line printed from the job's state (``[name] phase: ...``)."""
    return _STATE_LINE.match(line) is not None
