"""The tunable sizes of a post-hoc run, in one object passed down (tests shrink them to exercise edge cases), and
an opt-in tweak of the C allocator for a process that does nothing else."""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass

__all__ = ["Limits", "keep_slices_in_heap"]


@dataclass(frozen=True)
class Limits:
    # largest slice of a tensor one elementwise averager sees (a multiple of 4096). 2 MiB of float32: torch's CPU
    # allocator hands back fresh pages (a fault per 4 KiB) for each block of 4 MiB or more, not for 2 MiB or less;
    # on 2026-12-03's 2-core EPYC (1 MiB L2 a core) LAWA k=5 over 124M parameters took 0.79 s with 2 MiB slices,
    # 0.88 s with 1 MiB and 1.00 s with 512 KiB (per-slice Python costs more than the cache saves)
    block_elements: int = 1 << 19
    block_budget: int = 64 << 20    # bytes of slices all averagers may hold together; slices shrink for big grids
    batch_slices: int = 2           # slices handed to an averaging thread (and then to the writers) at a time
    max_open_outputs: int = 256     # past this many outputs, files are reopened for each tensor
    check_bytes: int = 4 << 20      # inputs are checked for NaN/Inf in pieces this size (bounds the temporary masks)
    average_threads: int = 2        # slices averaged at once, each on a thread of its own with one torch thread
    read_threads: int = 8           # a file's sha256 runs in order, so a thread per file lets the OS balance cores
    direct_buffer: int = 4 << 20    # the aligned write buffer of an output (less each when there are many outputs)

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name}: expected an integer >= 1, got {value!r}")


def keep_slices_in_heap() -> bool:
    """Opt-in, for a process that does nothing but average and exit (``benchmarks/posthoc.py`` sets it): glibc then
    serves the averagers' slices (2 MiB each, allocated and freed thousands of times) from its heap and keeps freed
    memory there, instead of mapping fresh zeroed pages for each (a page fault per 4 KiB): LAWA k=5 over 124M
    parameters took 0.71 s against 0.75 s (medians of 9, 2026-12-03). It changes the allocator of the whole process
    for good, so no library function or command calls it. Returns whether it was applied (glibc on Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 256 << 20))
