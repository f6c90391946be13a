"""The output lock, ``<output>/_qvlm/lock.json``: at most one live run writes an output.

A run creates the lock with a conditional create (local: a hard link that fails if the file exists; S3:
``IfNoneMatch="*"``), rewrites its ``heartbeat_at`` every ``HEARTBEAT_S`` while it runs and deletes it
when it ends, finished, failed or stopped. A live lock is refused, even with ``output.overwrite: true``:
overwrite decides whether an output holding another job may be replaced, but two live writers on one output
would interleave their files, which is never what anyone wants. A run that finds the lock taken from it (its
heartbeat sees another run id, or something that is not a lock) stops before it writes again.

When a lock is stale, and whose clock says so. Two clocks describe a lock: the holder's own
(``heartbeat_at``, written by a host whose clock may be wrong) and the storage's (the object's last-modified
time: the file's mtime, S3's LastModified), both compared with this host's clock. A live holder rewrites the
lock every ``HEARTBEAT_S``, so its last-modified time keeps moving whatever its own clock says. A lock is
stale when

- its holder ran on this host and its pid is gone (a killed driver): at once;
- it was last written over ``STALE_AFTER_S`` ago and its heartbeat does not say otherwise, i.e. the heartbeat
  is also over ``STALE_AFTER_S`` old, or it lies in the future (a holder whose clock runs ahead: its heartbeat
  cannot be believed, so only the last-modified time counts);
- it is not a lock at all (not JSON, half-written, a field missing or of the wrong type) and was last written
  over ``HEARTBEAT_S`` ago: a live holder writes a whole, valid lock at least that often.

A holder whose clock runs behind is protected by the same rule: its last-modified time stays fresh. A lock
that cannot be read at all (a folder where the file should be) is never broken: the run exits 2 saying what
to remove.

Breaking a stale lock is read-check-delete-create; it deletes only the bytes it judged stale, two runs
breaking the same stale lock at the same moment are told apart by the create, and a run that still lost its
lock sees it at its next heartbeat.
"""

from __future__ import annotations

import json
import math
import os
import reprlib
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace

from qvlm.errors import InputError
from workers.storage import AlreadyExists, NotFound, StorageError

LOCK_KEY = "_qvlm/lock.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0
ATTEMPTS = 3  # breaks of a stale lock, or reads that find no readable lock where the create found one

_FIELDS = {"job": str, "spec_hash": str, "run_id": str, "host": str, "pid": int, "created_at": float,
           "heartbeat_at": float}
_KINDS = {str: "a string", int: "an integer", float: "a finite number"}


class LockError(InputError):
    """The output is locked by a live run, its lock is unusable, or this run lost its lock (exit 2)."""


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
        except (PermissionError, OverflowError, ValueError):
            return False  # alive, another user's; or a pid no process can have
        return False

    def describe(self, now: float) -> str:
        return (f"job '{self.job}' (spec {self.spec_hash[:8]}, run {self.run_id[:8]}, pid {self.pid} on {self.host}, "
                f"last heartbeat {now - self.heartbeat_at:.0f}s ago)")


def parse_lock(data: bytes) -> LockInfo:
    """The lock in ``data``; ValueError saying what is wrong with it (not JSON, a field missing or mistyped)."""
    try:
        doc = json.loads(data)
    except ValueError as exc:  # UnicodeDecodeError is a ValueError too
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"a JSON {type(doc).__name__}, not an object")
    missing = [k for k in _FIELDS if k not in doc]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    for key, kind in _FIELDS.items():
        if not _is_kind(doc[key], kind):
            raise ValueError(f"{key} is {reprlib.repr(doc[key])}, not {_KINDS[kind]}")
    if doc["pid"] <= 0:
        raise ValueError(f"pid is {doc['pid']}, not a process id")
    return LockInfo(**{k: doc[k] for k in _FIELDS})


def _is_kind(value, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, kind)


def lock_where(storage) -> str:
    return f"{storage.uri.rstrip('/')}/{LOCK_KEY}"


@dataclass(frozen=True)
class FoundLock:
    """The lock as found in storage: its bytes, when the storage says it was last written, and its holder (None
    when the bytes are not a lock; ``problem`` says why)."""

    raw: bytes
    modified_at: float
    holder: LockInfo | None
    problem: str | None

    def stale_reason(self, now: float, heartbeat_s: float = HEARTBEAT_S,
                     stale_after_s: float = STALE_AFTER_S) -> str | None:
        """Why this lock no longer protects a live run, or None while it may (see the module docstring)."""
        written_ago = now - self.modified_at
        if self.holder is None:
            if written_ago <= heartbeat_s:
                return None
            return (f"it is not a valid lock ({self.problem}) and was last written {written_ago:.0f}s ago, over the "
                    f"heartbeat interval ({heartbeat_s:.0f}s)")
        if self.holder.holder_dead():
            return "its process is gone"
        beat_ago = now - self.holder.heartbeat_at
        if written_ago <= stale_after_s or 0 <= beat_ago <= stale_after_s:
            return None
        if beat_ago < 0:
            return (f"its heartbeat is {-beat_ago:.0f}s in the future (the holder's clock is ahead) and the lock was "
                    f"last written {written_ago:.0f}s ago, by this host's clock")
        return f"no heartbeat for over {stale_after_s / 60:.0f} minutes"

    def describe(self, now: float) -> str:
        if self.holder is None:
            return f"an invalid lock ({self.problem}), last written {now - self.modified_at:.0f}s ago"
        return self.holder.describe(now)


def find_lock(storage) -> FoundLock | None:
    """The lock in ``storage``, valid or not; None when there is no readable lock file."""
    try:
        raw = storage.get_bytes(LOCK_KEY)
        modified_at = storage.modified_at(LOCK_KEY)
    except NotFound:
        return None
    try:
        return FoundLock(raw, modified_at, parse_lock(raw), None)
    except ValueError as exc:
        return FoundLock(raw, modified_at, None, str(exc))


def read_lock(storage) -> LockInfo | None:
    """The holder of a valid lock, else None (no lock, or one that is not valid)."""
    found = find_lock(storage)
    return found.holder if found is not None else None


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
        breaks = unreadable = waits = 0
        while breaks < ATTEMPTS and waits < ATTEMPTS:
            try:
                self.storage.put_bytes(LOCK_KEY, self._encode(), if_absent=True)
                return self._start_heartbeat()
            except AlreadyExists:
                pass
            try:
                found, now = find_lock(self.storage), time.time()
            except StorageError as exc:  # there, but unreadable (permissions): this run cannot judge it
                raise LockError(self._unusable(str(exc))) from None
            if found is None:  # released between our create and our read, or not a file at all
                unreadable += 1
                if unreadable >= ATTEMPTS:
                    raise LockError(self._unusable("is it a folder?"))
                continue
            reason = found.stale_reason(now, self.heartbeat_s, self.stale_after_s)
            if reason is None and found.holder is not None:
                raise LockError(self._refusal(found.holder, now))
            if reason is None:
                self._wait_for_writer(found, now)
                waits += 1
                continue
            self.echo(f"[{self.info.job}] taking over the lock {lock_where(self.storage)} of {found.describe(now)}: "
                      f"{reason}", flush=True)
            self._break(found)
            breaks += 1
        raise LockError(f"{lock_where(self.storage)}: another run took the lock at the same moment, or keeps rewriting "
                        "it; try again")

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
                f"taken over by the next run once neither its heartbeat nor the file has changed for "
                f"{self.stale_after_s / 60:.0f} minutes (at once on the same host). output.overwrite: true does not "
                f"break a live lock.")

    def _unusable(self, why: str) -> str:
        where = lock_where(self.storage)
        remove = f"aws s3 rm {where}" if where.startswith("s3://") else f"rm -r '{where}'"
        return (f"{where} exists but cannot be read as a lock file ({why}), so no run can lock this output: "
                f"remove it ({remove}) if no qvlm run is writing this output, then re-submit")

    def _wait_for_writer(self, found: FoundLock, now: float) -> None:
        """An invalid lock written moments ago may be a lock being written: wait out the heartbeat interval."""
        wait = max(0.1, self.heartbeat_s - (now - found.modified_at) + 1)
        self.echo(f"[{self.info.job}] {lock_where(self.storage)} is not a valid lock ({found.problem}) but was written "
                  f"{now - found.modified_at:.0f}s ago; waiting {wait:.0f}s in case a run is writing it", flush=True)
        time.sleep(wait)

    def _break(self, found: FoundLock) -> None:
        again = find_lock(self.storage)
        if again is not None and again.raw == found.raw:  # unchanged since judged stale: no heartbeat in between
            self.storage.delete(LOCK_KEY)

    def _encode(self) -> bytes:
        return json.dumps(asdict(self.info), sort_keys=True, indent=1).encode()

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="qvlm-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                found = find_lock(self.storage)
                if found is None or found.holder is None or found.holder.run_id != self.info.run_id:
                    self.lost = self._lost_to(found)
                    return
                self.info = replace(self.info, heartbeat_at=time.time())
                self.storage.put_bytes(LOCK_KEY, self._encode())
            except StorageError as exc:  # storage trouble: the next beat tries again; the lock goes stale only if it lasts
                self.echo(f"[{self.info.job}] lock heartbeat failed: {exc}", flush=True)

    def _lost_to(self, found: FoundLock | None) -> str:
        by = f" by {found.describe(time.time())}" if found is not None else ""
        return (f"{self.storage.uri}: this run's lock was taken over{by}; stopping before writing more (was this "
                "run's heartbeat stalled?)")
