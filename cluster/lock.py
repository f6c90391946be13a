"""The output lock, ``<output>/_qvlm/lock.json``: at most one live run writes an output.

A run creates the lock with a conditional create (local: a hard link that fails if the file exists; S3:
``IfNoneMatch="*"``), rewrites its ``heartbeat_at`` every ``HEARTBEAT_S`` while it runs and deletes it
when it ends, finished or failed. A lock is *stale* when its heartbeat is older than ``STALE_AFTER_S`` or
when its holder ran on this host and its pid is gone (a killed driver); any run may break a stale lock.
A live lock is refused, even with ``output.overwrite: true``: overwrite decides whether an output holding
another job may be replaced, but two live writers on one output would interleave their files, which is
never what anyone wants. A run that finds the lock taken from it (its heartbeat sees another run id)
stops before it writes again.

Breaking a stale lock is read-check-delete-create; two runs breaking the same stale lock at the same moment
are told apart by the create, and a run that still lost its lock sees it at its next heartbeat.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace

from workers.storage import AlreadyExists, NotFound, StorageError

LOCK_KEY = "_qvlm/lock.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


class LockError(Exception):
    """The output is locked by a live run, or this run lost its lock; ``exit_code`` 2 (bad input)."""

    exit_code = 2


@dataclass(frozen=True)
class LockInfo:
    job: str
    spec_hash: str
    run_id: str
    host: str
    pid: int
    created_at: float
    heartbeat_at: float

    def holder_dead(self) -> bool:
        """True only when the holder ran on this host and its process is gone."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # alive, another user's
        return False

    def stale_reason(self, now: float, stale_after_s: float) -> str | None:
        """Why this lock no longer protects a live run, or None while it does."""
        if self.holder_dead():
            return "its process is gone"
        if now - self.heartbeat_at > stale_after_s:
            return f"no heartbeat for over {stale_after_s / 60:.0f} minutes"
        return None

    def describe(self, now: float) -> str:
        return (f"job '{self.job}' (spec {self.spec_hash[:8]}, run {self.run_id[:8]}, pid {self.pid} on {self.host}, "
                f"last heartbeat {now - self.heartbeat_at:.0f}s ago)")


def read_lock(storage) -> LockInfo | None:
    try:
        return LockInfo(**json.loads(storage.get_bytes(LOCK_KEY)))
    except NotFound:
        return None


class OutputLock:
    """``acquire()`` before the first write, ``check()`` before important writes, ``release()`` at the end."""

    def __init__(self, storage, job: str, spec_hash: str, echo=print, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S):
        now = time.time()
        self.storage, self.echo = storage, echo
        self.info = LockInfo(job, spec_hash, uuid.uuid4().hex, socket.gethostname(), os.getpid(), now, now)
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        for _ in range(3):
            try:
                self.storage.put_bytes(LOCK_KEY, self._encode(), if_absent=True)
                return self._start_heartbeat()
            except AlreadyExists:
                pass
            holder, now = read_lock(self.storage), time.time()
            if holder is None:
                continue  # released between our create and our read
            reason = holder.stale_reason(now, self.stale_after_s)
            if reason is None:
                raise LockError(self._refusal(holder, now))
            self.echo(f"[{self.info.job}] taking over the lock of {holder.describe(now)}: {reason}", flush=True)
            self._break(holder)
        raise LockError(f"{self.storage.uri}: another run took the lock at the same moment; try again")

    def check(self) -> None:
        if self.lost:
            raise LockError(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            holder = read_lock(self.storage)
            if holder is not None and holder.run_id == self.info.run_id:
                self.storage.delete(LOCK_KEY)
        except StorageError as exc:  # a lock left behind goes stale; say so, but do not mask the job's result
            self.echo(f"[{self.info.job}] could not release {LOCK_KEY}: {exc}", flush=True)

    def _refusal(self, holder: LockInfo, now: float) -> str:
        return (f"output {self.storage.uri} is locked by {holder.describe(now)}, which is still running: two runs "
                f"must not write one output. Wait for it to end or cancel it; a lock whose holder is gone is "
                f"taken over by the next run once its heartbeat is {self.stale_after_s / 60:.0f} minutes old "
                f"(at once on the same host). output.overwrite: true does not break a live lock.")

    def _break(self, holder: LockInfo) -> None:
        again = read_lock(self.storage)
        if again is not None and again.run_id == holder.run_id:
            self.storage.delete(LOCK_KEY)

    def _encode(self) -> bytes:
        return json.dumps(asdict(self.info), sort_keys=True, indent=1).encode()

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="qvlm-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder = read_lock(self.storage)
                if holder is None or holder.run_id != self.info.run_id:
                    self.lost = (f"{self.storage.uri}: this run's lock was taken over"
                                 f"{' by ' + holder.describe(time.time()) if holder else ''}; stopping before "
                                 "writing more (was this run's heartbeat stalled?)")
                    return
                self.info = replace(self.info, heartbeat_at=time.time())
                self.storage.put_bytes(LOCK_KEY, self._encode())
            except StorageError as exc:  # storage trouble: the next beat tries again; the lock goes stale only if it lasts
                self.echo(f"[{self.info.job}] lock heartbeat failed: {exc}", flush=True)
