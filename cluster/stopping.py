"""Stopping a run cleanly on SIGINT or SIGTERM.

Python runs signal handlers in the main thread, between bytecodes. Ray's blocking calls (``ray.get``,
``ray.wait``) look for signals while they wait and let only ``KeyboardInterrupt`` through: any other exception
raised by a handler inside them comes out as a ``SystemError``. So under :func:`stop_on_signals` both signals
raise ``KeyboardInterrupt`` and :func:`received` says which one arrived; the driver records the phase
"stopped", stops its Ray work and releases the output lock on the way out, and the command exits 128 + the
first signal's number (130 for SIGINT, 143 for SIGTERM). A second signal interrupts that clean-up (for a user
who cannot wait for it); a lock it leaves behind is taken over like any lock whose holder is gone.

``ray.init`` installs a SIGTERM handler of its own (it exits the process at once, with Ray's threads still
running, which ended in SIGABRT); :func:`keep_handlers` puts the process's handlers back after it.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []


def _stop(signum, frame) -> None:
    _received.append(signum)
    raise KeyboardInterrupt


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def stop_on_signals():
    """SIGINT and SIGTERM raise KeyboardInterrupt in the main thread while the block runs."""
    if not _main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    _received.clear()
    for s in SIGNALS:
        signal.signal(s, _stop)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def keep_handlers():
    """Restore the SIGINT and SIGTERM handlers that were in place before the block (around ``ray.init``)."""
    previous = {s: signal.getsignal(s) for s in SIGNALS} if _main_thread() else {}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def received() -> str:
    """The name of the signal that stopped the run (SIGINT when none was recorded: a plain KeyboardInterrupt)."""
    return signal.Signals(_received[0]).name if _received else "SIGINT"


def exit_code() -> int:
    """128 + the number of the signal that stopped the run: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + (_received[0] if _received else signal.SIGINT)
