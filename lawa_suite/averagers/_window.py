"""Where LAWA's window of snapshots lives (host memory, files, or the post-hoc input re-read), the host copies
that fill it, and the one background thread that does the window-sum arithmetic of every LAWA in a process.

Snapshots are always real copies: ``.cpu()`` of a CPU tensor returns the tensor itself, which made the original
LAWA code store ``k`` aliases of the live weights when training on CPU. Private to the averagers package (the
registry does not import modules whose name starts with ``_``); another windowed averager may share it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import weakref
from collections import deque
from dataclasses import dataclass, field
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from lawa_suite.averagers.base import ReplayTrack, is_count
from lawa_suite.config import choice, require
from lawa_suite.files import lock_beside, write_atomic

__all__ = ["WindowConfig", "window_store", "window_replay", "snapshot_copy", "pinned_snapshot_copy", "window_worker",
           "SnapshotStore", "StepWindow", "MemorySnapshots", "ReadBackWindow", "DiskSnapshots", "RereadSnapshots"]


# -- the keys of a window of snapshots (LAWA's, wma's) -------------------------------------------------------
@dataclass
class WindowConfig:
    k: int = 5                                 # snapshots in the window
    nu: int = 100                              # a snapshot at every step divisible by nu
    # where snapshots live: host memory or safetensors files (may change on resume: the average does not)
    store: str = choice("cpu", "cpu", "disk", affects_average=False)
    # folder for store=disk (one per averager); empty = a temporary one
    dir: str = field(default="", metadata={"affects_average": False})

    def __post_init__(self) -> None:
        require(is_count(self.k, 1), "k", "an integer >= 1", self.k)
        require(is_count(self.nu, 1), "nu", "an integer >= 1", self.nu)
        require(self.store in ("cpu", "disk"), "store", "one of cpu, disk", self.store)
        require(isinstance(self.dir, str), "dir", "a folder path (empty = a temporary folder)", self.dir)


def window_store(config: WindowConfig) -> SnapshotStore:
    """The empty window ``config.store`` asks for."""
    return DiskSnapshots(config.dir) if config.store == "disk" else MemorySnapshots()


# -- host copies ---------------------------------------------------------------------------------------------
def snapshot_copy(floats: list[Tensor]) -> list[Tensor]:
    """Contiguous host copies of ``floats`` in their own dtype; always copies, even from CPU tensors."""
    return [t.detach().to("cpu", copy=True, memory_format=torch.contiguous_format) for t in floats]


def pinned_snapshot_copy(floats: list[Tensor]) -> list[Tensor]:
    """Host copies of CUDA tensors ``floats`` in pinned memory, queued on the current stream and not waited for:
    read them on the host only after synchronizing. Where pinned memory runs out, plain copies (they wait)."""
    try:
        host = pinned_like(floats)
    except RuntimeError:  # cudaHostAlloc failed: page-locked memory is limited by the OS
        return snapshot_copy(floats)
    torch._foreach_copy_(host, [t.detach() for t in floats], non_blocking=True)
    return host


def pinned_like(floats: list[Tensor]) -> list[Tensor]:
    """Empty pinned host tensors shaped like ``floats``: views into one pinned buffer per dtype. PyTorch's caching
    host allocator rounds every block up to a power of two, so a pinned tensor per weight cost about 1.5x the
    model (1.66x for GPT-2 small), k + 1 times over in LAWA's window, on every DDP rank; one block per snapshot
    rounds once."""
    sizes: dict[torch.dtype, int] = {}
    for t in floats:
        sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
    flat = {dtype: torch.empty(n, dtype=dtype, pin_memory=True) for dtype, n in sizes.items()}
    offsets = dict.fromkeys(sizes, 0)
    views = []
    for t in floats:
        start = offsets[t.dtype]
        views.append(flat[t.dtype][start:start + t.numel()].view(t.shape))
        offsets[t.dtype] = start + t.numel()
    return views


# -- the background thread ----------------------------------------------------------------------------------
_worker: ThreadPoolExecutor | None = None
_worker_lock = threading.Lock()


def window_worker() -> ThreadPoolExecutor:
    """The one background thread that does the window-sum arithmetic of every LAWA averager in this process
    (one thread: jobs of one averager run in submission order, and training keeps the other cores)."""
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lawa-window")
        return _worker


def _drain_before_fork() -> None:
    """Finish every queued window job before ``fork``: the child gets no copy of the thread, so a job still
    queued would never run there and a half-done one would leave its sums torn."""
    with _worker_lock:
        if _worker is not None:
            try:
                _worker.submit(lambda: None).result()  # one thread, jobs in order: this one runs last
            except RuntimeError:  # shut down (interpreter exit): nothing left queued
                pass


def _forget_worker_in_child() -> None:
    global _worker, _worker_lock
    _worker, _worker_lock = None, threading.Lock()  # the child starts its own thread when it first needs one


os.register_at_fork(before=_drain_before_fork, after_in_child=_forget_worker_in_child)


# -- where the window's snapshots live ------------------------------------------------------------------
class SnapshotStore(Protocol):
    """An ordered window of ``(step, tensors)`` snapshots, oldest first."""

    @property
    def steps(self) -> list[int]: ...
    @property
    def newest_step(self) -> int | None: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[list[Tensor]]: ...
    def append(self, step: int, tensors: list[Tensor]) -> None: ...  # keeps its own copy (the caller's may change)
    def pop_oldest(self) -> list[Tensor]: ...
    def recycle(self, tensors: list[Tensor]) -> None: ...  # a popped snapshot's buffers, free for reuse (or ignored)
    def wait_copies(self) -> None: ...  # before the host reads snapshots: queued device-to-host copies have landed
    def drop_oldest(self) -> None: ...
    def clear(self) -> None: ...


class StepWindow:
    """The steps of the snapshots in the window, oldest first (shared by both stores)."""

    _steps: deque[int]

    @property
    def steps(self) -> list[int]:
        return list(self._steps)

    @property
    def newest_step(self) -> int | None:
        return self._steps[-1] if self._steps else None

    def __len__(self) -> int:
        return len(self._steps)

    def wait_copies(self) -> None:
        """Return once every snapshot can be read on the host (a queued device-to-host copy has landed)."""


class MemorySnapshots(StepWindow):
    """The window in host memory (``store=cpu``). From a CUDA device a snapshot's copy is queued on the current
    stream and an event recorded after it: ``wait_copies`` waits for it before the host reads a snapshot (device
    arithmetic queued on the same stream after the copy needs no wait)."""

    def __init__(self) -> None:
        self._steps = deque()
        self._tensors: deque[list[Tensor]] = deque()
        self._spares: list[list[Tensor]] = []     # buffers of snapshots that left the window, reused by append
        self._copied: Any = None                  # CUDA event after the newest queued copy

    def __iter__(self) -> Iterator[list[Tensor]]:
        return iter(list(self._tensors))

    def newest(self) -> list[Tensor]:
        """The newest snapshot's own buffers (read-only for the caller)."""
        return self._tensors[-1]

    def append(self, step: int, tensors: list[Tensor]) -> None:
        self._steps.append(step)
        self._tensors.append(self._copy(tensors))
        if tensors and tensors[0].is_cuda:
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(tensors[0].device))

    def wait_copies(self) -> None:
        copied, self._copied = self._copied, None
        if copied is not None and not copied.query():
            copied.synchronize()

    def _copy(self, tensors: list[Tensor]) -> list[Tensor]:
        """Into spare buffers when they fit (one fused copy, no fresh pages to fault in), else fresh ones. From a
        CUDA device the copy is queued, not waited for (pinned buffers; see ``pinned_snapshot_copy``)."""
        from_cuda = bool(tensors) and all(t.is_cuda for t in tensors)
        spare = self._spares.pop() if self._spares else None
        if spare is not None and all(b.shape == t.shape and b.dtype == t.dtype for b, t in zip(spare, tensors)) \
                and len(spare) == len(tensors) and (not from_cuda or all(b.is_pinned() for b in spare)):
            torch._foreach_copy_(spare, [t.detach() for t in tensors], non_blocking=from_cuda)
            return spare
        return pinned_snapshot_copy(tensors) if from_cuda else snapshot_copy(tensors)

    def pop_oldest(self) -> list[Tensor]:
        self._steps.popleft()
        return self._tensors.popleft()

    def recycle(self, tensors: list[Tensor]) -> None:
        """Hand back a popped snapshot the caller is done with: a later append copies into it. At most two are
        kept: one for the next snapshot while the previous one's buffers are still being subtracted."""
        self._spares = [*self._spares, tensors][-2:]

    def drop_oldest(self) -> None:
        self.recycle(self.pop_oldest())

    def clear(self) -> None:
        self._steps.clear()
        self._tensors.clear()
        self._spares = []


class ReadBackWindow(StepWindow):
    """A window that keeps steps and reads a snapshot back (``_read``) when it is needed: when it leaves the
    window, or when the sum is recomputed. Subclasses say where snapshots live: ``append``, ``_read`` and
    ``drop_oldest`` (which forgets the oldest step and whatever holds its snapshot)."""

    def _read(self, step: int) -> list[Tensor]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[list[Tensor]]:
        return (self._read(step) for step in list(self._steps))

    def newest(self) -> list[Tensor]:
        return self._read(self._steps[-1])

    def pop_oldest(self) -> list[Tensor]:
        tensors = self._read(self._steps[0])
        self.drop_oldest()
        return tensors

    def recycle(self, tensors: list[Tensor]) -> None:
        """Nothing to reuse: a popped snapshot was read back, not kept."""

    def drop_oldest(self) -> None:
        self._steps.popleft()

    def clear(self) -> None:
        while self._steps:
            self.drop_oldest()


class DiskSnapshots(ReadBackWindow):
    """The window as one safetensors file per snapshot (``store=disk``); host memory holds only their steps.

    ``folder`` is created if needed; an empty one means a fresh temporary folder, made on first use and
    removed when this store is garbage collected. Files are written under a temporary name and renamed, so
    a crash never leaves a half-written snapshot under a real name.
    """

    def __init__(self, folder: str = "") -> None:
        self._folder = folder
        self._made = False  # the folder is made on first use: an averager that never snapshots leaves no trace
        self._steps = deque()

    @property
    def folder(self) -> str:
        if not self._made:
            if self._folder:
                os.makedirs(self._folder, exist_ok=True)
                self._lock = _hold_folder(self._folder)
                weakref.finalize(self, os.close, self._lock)
            else:
                self._folder = tempfile.mkdtemp(prefix="lawa-snapshots-")
                weakref.finalize(self, shutil.rmtree, self._folder, True)
            self._made = True
        return self._folder

    def path(self, step: int) -> str:
        return os.path.join(self.folder, f"snapshot-{step:010d}.safetensors")

    def append(self, step: int, tensors: list[Tensor]) -> None:
        copies = {str(i): t for i, t in enumerate(snapshot_copy(tensors))}
        # scratch, not a record: a checkpoint holds the window itself, so no fsync is worth its stall
        write_atomic(Path(self.path(step)), lambda p: save_file(copies, str(p)), durable=False)
        self._steps.append(step)

    def drop_oldest(self) -> None:
        os.remove(self.path(self._steps.popleft()))

    def _read(self, step: int) -> list[Tensor]:
        by_index = load_file(self.path(step), device="cpu")
        return [by_index[str(i)] for i in range(len(by_index))]


def _hold_folder(folder: str) -> int:
    """An exclusive ``flock`` on ``.<folder name>.lock`` beside ``folder``, held while the store lives (the kernel
    drops it when the process dies): two windows in one folder, of two runs or two averagers of one run, would
    delete each other's snapshots. Returns the open descriptor."""
    import fcntl

    fd = os.open(lock_beside(Path(folder)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        from lawa_suite.errors import ConfigError
        raise ConfigError(f"dir: {folder} holds the snapshots of another window in use (another run, or another "
                          f"averager of this run); give each its own folder, or leave dir empty for a temporary "
                          f"one") from None
    except OSError:  # a file system without flock: nothing to hold
        pass
    return fd


class RereadSnapshots(ReadBackWindow):
    """The window as steps only, for post-hoc replays: a snapshot is read again through ``read(step)`` (a view
    of the memory-mapped input) instead of being copied, so memory does not grow with ``k``."""

    def __init__(self, read: Callable[[int], list[Tensor]]) -> None:
        self._read = read  # type: ignore[method-assign]
        self._steps = deque()

    def append(self, step: int, tensors: list[Tensor]) -> None:
        self._steps.append(step)  # no copy: the input still holds the snapshot


# -- post hoc: a window in steps over saved checkpoints ------------------------------------------------------
def window_replay(k: int, nu: int, steps: list[int], targets: list[int] | None) -> tuple[list[ReplayTrack], list[str]]:
    """The replays that give a window of ``k`` snapshots ``nu`` steps apart over saved ``steps``: the output at saved
    step ``t`` is made of the saved steps ``t, t - nu, ..., t - (k-1)*nu``; a member the input lacks is a problem
    naming it, and a window reaching before the first saved step is not ready (no output, no problem). Without
    ``targets``: the window ending at the newest saved multiple of ``nu``, the state the online averager ends with.

    Targets are grouped by ``t mod nu``: each group is one replay of the online class whose clock is ``step - residue``,
    so its snapshots (taken at clocks divisible by ``nu``) fall exactly on the window members."""
    have, first = set(steps), steps[0]
    if targets is None:
        ends = [s for s in steps if s % nu == 0]
        if not ends:
            return [], [f"no saved step is a multiple of nu={nu}"]
        targets = [ends[-1]]
    problems, ready = [], []
    for t in targets:
        window = [t - j * nu for j in range(k)]
        if window[-1] < first:
            continue
        missing = [s for s in reversed(window) if s not in have]
        if missing:
            problems.append(f"the window of step {t} needs step(s) {', '.join(map(str, missing))}, which the "
                            f"input does not hold")
        else:
            ready.append(t)
    if not ready and not problems:
        problems.append(f"no window fits: {k} checkpoints {nu} steps apart span {(k - 1) * nu} steps before the "
                        f"step they end at, and the input holds steps {first}..{steps[-1]}")
    by_residue: dict[int, list[int]] = {}
    for t in ready:
        by_residue.setdefault(t % nu, []).append(t)
    return [ReplayTrack([s - r for s in steps], steps[-1] - r, wanted)
            for r, wanted in sorted(by_residue.items())], problems
