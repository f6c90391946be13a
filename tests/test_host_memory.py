"""A worker process gives the memory of its freed temporaries back to the system (workers/host_memory.py)."""

import subprocess
import sys
import textwrap

import pytest

# In a fresh interpreter: a 16 MiB tensor freed (glibc then serves blocks up to that size from its heap, which keeps
# their pages), then 32 tensors of 8 MiB of which one is kept. Prints the RSS before them, at their peak and after.
PATTERN = textwrap.dedent("""
    import sys, torch
    from workers.host_memory import return_freed_memory
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
    if not return_freed_memory():
        print("unset")
        sys.exit()
    t = torch.ones(4 << 20)
    del t
    before = rss()
    held = [torch.ones(2 << 20) for _ in range(32)]
    peak = rss()
    keep = held[-1]
    del held
    print(before, peak, rss())
""")


def test_a_worker_gives_back_the_pages_of_the_temporaries_it_freed():
    out = subprocess.run([sys.executable, "-c", PATTERN], capture_output=True, text=True, check=True).stdout.split()
    if out == ["unset"]:
        pytest.skip("this C library has no mallopt (glibc's): nothing to set")
    before, peak, after = map(int, out)
    assert peak - before >= 240  # the 256 MiB were resident
    assert after - before <= 8 + 8  # one 8 MiB tensor kept, and some slack: the rest went back
