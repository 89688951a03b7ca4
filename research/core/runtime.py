"""Process-level settings applied by the launcher before any JAX work.

``tune_host_allocator``: glibc's malloc returns large freed blocks to the OS (blocks above the
mmap threshold are unmapped; the heap top is trimmed), so every train step of XLA:CPU, which
allocates and frees its temporaries per execution, faults its pages in again. Keeping freed memory
in the process removes that: the baby GPT's forward+backward went from 54.7 to 36.0 ms/step on this
2-core CPU (median of 20; experiments/bench/README.md). Resident memory then stays at its peak
instead of shrinking between steps; the peak itself does not change.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
_KEEP = 1 << 30  # keep up to 1 GiB of freed memory, and serve blocks up to 1 GiB from the heap


def tune_host_allocator() -> bool:
    """Raise glibc's trim and mmap thresholds. Returns True if applied (Linux with glibc only;
    set ``RESEARCH_DEFAULT_MALLOC=1`` to leave the allocator alone)."""
    if not sys.platform.startswith("linux") or os.environ.get("RESEARCH_DEFAULT_MALLOC") == "1":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, _KEEP)) and bool(libc.mallopt(M_TRIM_THRESHOLD, _KEEP))
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
