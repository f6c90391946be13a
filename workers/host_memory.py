"""Make a worker process give the host memory of its freed temporaries back to the system.

glibc serves an allocation from its heap, not from a mapping of its own, when it is below the mmap threshold, and
it raises that threshold (up to 32 MiB) each time a mapped block is freed. A stage's temporaries (one batch's
activations, a slice of a weight in float32) are of that size, so once the first ones are freed the later ones land
in the heap, whose pages stay with the process when they are freed: its RSS keeps the largest set of temporaries it
ever held beside what it holds next. Writing one 13B layer's block file took 563 MiB over the RSS before it so, and
226 MiB with the threshold fixed (bench/export_memory.py). A fixed threshold keeps every allocation of
``MMAP_THRESHOLD`` or more a mapping of its own, unmapped when it is freed; what that costs is the page faults of
touching fresh pages again, small beside the arithmetic done on them.
"""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD = 1 << 20


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold at ``MMAP_THRESHOLD`` for this process; returns whether it was set (False where
    the C library has no ``mallopt``, as on macOS, or refuses it)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
