"""Where two locations meet (one is, is inside or contains the other), once both are resolved: what keeps a job's
output off its model and calibration data. Local paths are resolved (symlinks and '..' cannot hide a meeting);
S3 prefixes compare by bucket and key segments."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def place(uri: str) -> Optional[tuple[str, ...]]:
    """A URI as path segments under its root (``s3://bucket`` or ``/``), for containment checks; None for
    other schemes and hub ids. Local paths are resolved, so symlinks and '..' cannot hide that two paths meet."""
    if uri.startswith("s3://"):
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return ("s3://", bucket, *[p for p in key.split("/") if p])
    if "://" in uri and not uri.startswith("file://"):
        return None
    path = Path(uri.removeprefix("file://")).expanduser()
    return resolved(path).parts if path.is_absolute() else None


def resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        raise ValueError(f"{path} is a symbolic link loop (or a link chain too long to follow); "
                         "point it at a real folder") from None


def meets(out: tuple[str, ...], other: tuple[str, ...]) -> Optional[str]:
    """How a resolved output place meets another resolved place: "is", "is inside", "contains" or None."""
    if out == other:
        return "is"
    if out[:len(other)] == other:
        return "is inside"
    if other[:len(out)] == out:
        return "contains"
    return None


def output_meets(output_uri: str, other: str) -> Optional[str]:
    """How an output meets another location once both are resolved: "is", "is inside", "contains" or None."""
    out, there = place(output_uri), place(other)
    return meets(out, there) if out and there else None


