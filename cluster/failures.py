"""What went wrong inside Ray, said once: the error a worker raised, without the wrappers Ray puts around it."""

from __future__ import annotations


def root_cause(exc: BaseException) -> BaseException:
    """The error a Ray worker or actor raised (``RayTaskError`` repeats the remote traceback in its message and
    carries the original as ``cause``; an actor's death carries what killed it), else ``exc`` itself."""
    while type(exc).__name__.startswith(("RayTaskError", "ActorDiedError")) and \
            isinstance(getattr(exc, "cause", None), BaseException) and exc.cause is not exc:
        exc = exc.cause
    return exc


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` of the root cause."""
    cause = root_cause(exc)
    first = (str(cause).strip().splitlines() or [""])[0]
    return f"{type(cause).__name__}: {first[:limit]}"
