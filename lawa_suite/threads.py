"""Thread counts set for a block of work and put back after it: a library call never leaves the process's torch
thread count changed (a bench's ``threads=``, a post-hoc pass's one thread per op)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["torch_threads"]


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op thread count is ``count`` while the block runs and what it was before afterwards (also when
    the block raises); ``None`` or 0 leaves it as it is."""
    import torch  # lazily: what imports this module need not load torch

    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count:
            torch.set_num_threads(before)
