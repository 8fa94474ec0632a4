"""Where LAWA's window of snapshots lives (host memory, files, or the post-hoc input re-read). The host copies that
fill it are ``_host_copies.py``'s (from CUDA: off the training stream, ``DeviceToHost``), and the thread an averager
owns for its window jobs is ``_window_worker.py``'s (``WindowWorker``). Private to the averagers package (the
registry does not import modules whose name starts with ``_``); another windowed averager may share it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections import deque
from dataclasses import dataclass, field
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from lawa_suite.averagers.base import ReplayTrack, SnapshotFolder, is_count
from lawa_suite.config import choice, require
from lawa_suite.errors import ConfigError
from lawa_suite.files import write_atomic
from lawa_suite.run_lock import lock_folder
from lawa_suite.averagers._host_copies import DeviceToHost, snapshot_copy
from lawa_suite.averagers._window_worker import WindowWorker

__all__ = ["WindowConfig", "window_store", "window_folder", "window_replay", "SnapshotStore", "StepWindow",
           "MemorySnapshots", "ReadBackWindow", "DiskSnapshots", "RereadSnapshots", "snapshots_in_use"]


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


def window_store(config: WindowConfig, worker: WindowWorker) -> SnapshotStore:
    """The empty window ``config.store`` asks for; ``worker`` (the averager's) writes the disk store's files."""
    return DiskSnapshots(config.dir, worker) if config.store == "disk" else MemorySnapshots()


def window_folder(config: WindowConfig) -> SnapshotFolder | None:
    """The folder a window keeps its files in, when the user named one (``store=disk`` with ``dir``)."""
    return SnapshotFolder("dir", Path(config.dir)) if config.store == "disk" and config.dir else None


# -- where the window's snapshots live ------------------------------------------------------------------
class SnapshotStore(Protocol):
    """An ordered window of ``(step, tensors)`` snapshots, oldest first. Iterating it is a host read: it waits for
    queued copies first."""

    @property
    def steps(self) -> list[int]: ...
    @property
    def newest_step(self) -> int | None: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[list[Tensor]]: ...
    def append(self, step: int, tensors: list[Tensor]) -> None: ...  # keeps its own copy (the caller's may change)
    def pop_oldest(self) -> list[Tensor]: ...
    def recycle(self, tensors: list[Tensor]) -> None: ...  # a popped snapshot's buffers, free for reuse (or ignored)
    def flush(self) -> None: ...  # queued device-to-host copies have landed and queued writes are complete
    def drop_oldest(self) -> None: ...
    def clear(self) -> None: ...


class StepWindow:
    """The steps of the snapshots in the window, oldest first (shared by every store)."""

    _steps: deque[int]

    @property
    def steps(self) -> list[int]:
        return list(self._steps)

    @property
    def newest_step(self) -> int | None:
        return self._steps[-1] if self._steps else None

    def __len__(self) -> int:
        return len(self._steps)

    def flush(self) -> None:
        """Return once every snapshot can be read on the host and every queued write is done."""


class MemorySnapshots(StepWindow):
    """The window in host memory (``store=cpu``). From a CUDA device a snapshot is copied by ``DeviceToHost``: staged
    on the device, copied to one pinned block per dtype on a side stream, an event after it. Every host read of a
    snapshot (iterating the store, ``newest``) waits on that event first; device work that reads the
    snapshots goes on the side stream through ``queue`` and reads them with ``members`` (no host wait)."""

    def __init__(self) -> None:
        self._steps = deque()
        self._tensors: deque[list[Tensor]] = deque()
        self._spares: list[list[Tensor]] = []     # buffers of snapshots that left the window, reused by append
        self._to_host = DeviceToHost()
        self._staged: list[Tensor] = []           # the newest CUDA snapshot on the device (staging; read by queue)

    def __iter__(self) -> Iterator[list[Tensor]]:
        self.flush()
        return iter(list(self._tensors))

    def members(self) -> list[list[Tensor]]:
        """The snapshots without waiting for their copies: for device work queued on the side stream (``queue``)."""
        return list(self._tensors)

    def newest(self) -> list[Tensor]:
        """The newest snapshot's own buffers (read-only for the caller)."""
        self.flush()
        return self._tensors[-1]

    def newest_on_device(self) -> list[Tensor]:
        """The newest CUDA snapshot's device staging (read-only; valid for work queued through ``queue``)."""
        return self._staged

    def append(self, step: int, tensors: list[Tensor]) -> None:
        self._steps.append(step)
        self._tensors.append(self._copy(tensors))

    def queue(self, work: Callable[[], None]) -> None:
        """Queue ``work`` (device arithmetic on the snapshots) on the side stream after the copies, and move the
        event after it: the training stream never waits for it, a reader waits on the event (``flush``,
        ``wait_on_device``)."""
        with self._to_host.side():
            work()
        self._to_host.record()

    def flush(self) -> None:
        self._to_host.synchronize()

    def wait_on_device(self) -> None:
        """Order the training stream after the side work (what it wrote may be read there; the host goes on)."""
        self._to_host.wait_for_side()

    def _copy(self, tensors: list[Tensor]) -> list[Tensor]:
        """Into spare buffers when they fit (one fused copy, no fresh pages to fault in), else fresh ones. From a
        CUDA device the copy is queued off the training stream, not waited for (``DeviceToHost``)."""
        from_cuda = bool(tensors) and all(t.is_cuda for t in tensors)
        spare = self._spares.pop() if self._spares else None
        if spare is not None and not (len(spare) == len(tensors) and all(
                b.shape == t.shape and b.dtype == t.dtype for b, t in zip(spare, tensors))
                and (not from_cuda or all(b.is_pinned() for b in spare))):
            spare = None
        if from_cuda:
            self._staged, host = self._to_host.copy(tensors, spare)
            self._to_host.record()
            return host
        if spare is not None:
            torch._foreach_copy_(spare, [t.detach() for t in tensors])
            return spare
        return snapshot_copy(tensors)

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
        self.flush()  # (no copy may still land in buffers this drops)
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
    """The window as one safetensors file per snapshot (``store=disk``); host memory holds only their steps and the
    snapshots still being written.

    ``folder`` is created if needed; an empty one means a fresh temporary folder, made on first use and
    removed when this store is garbage collected. Files are written under a temporary name and renamed, so
    a crash never leaves a half-written snapshot under a real name. The training thread only takes the host copy
    (from CUDA queued off the training stream, ``DeviceToHost``); ``worker`` writes the file (after the copy's
    event) in the background. Reading a snapshot back or deleting it waits for its own write; ``flush`` for all
    of them (before a checkpoint and at ``close``).
    """

    def __init__(self, folder: str = "", worker: WindowWorker | None = None) -> None:
        self._folder = folder
        self._made = False  # the folder is made on first use: an averager that never snapshots leaves no trace
        self._steps = deque()
        self._worker = worker if worker is not None else WindowWorker("disk-snapshots")
        self._writes: dict[int, Future] = {}  # step -> its file's write, until it is known done
        self._to_host = DeviceToHost()

    @property
    def folder(self) -> str:
        if not self._made:
            if self._folder:
                os.makedirs(self._folder, exist_ok=True)
                self._lock = lock_folder(Path(self._folder), snapshots_in_use(self._folder))
                weakref.finalize(self, self._lock.release)  # (its file goes with it)
            else:
                self._folder = tempfile.mkdtemp(prefix="lawa-snapshots-")
                weakref.finalize(self, shutil.rmtree, self._folder, True)
            self._made = True
        return self._folder

    def path(self, step: int) -> str:
        return os.path.join(self.folder, f"snapshot-{step:010d}.safetensors")

    def append(self, step: int, tensors: list[Tensor]) -> None:
        copied = None
        if tensors and all(t.is_cuda for t in tensors):
            host = self._to_host.copy(tensors)[1]
            copied = self._to_host.record()
        else:
            host = snapshot_copy(tensors)
        # (a bound method: the job keeps this store, and so its folder, alive until the file is written)
        self._writes[step] = self._worker.submit(self._write, self.path(step), host, copied)
        self._steps.append(step)

    def _write(self, path: str, host: list[Tensor], copied: Any) -> None:
        """A window file (on the worker): once the host copy has landed, written under a temporary name and renamed.
        Scratch, not a record: a checkpoint holds the window itself, so no fsync is worth its stall."""
        if copied is not None:
            copied.synchronize()
        tensors = {str(i): t for i, t in enumerate(host)}
        write_atomic(Path(path), lambda p: save_file(tensors, str(p)), durable=False)

    def _written(self, step: int) -> None:
        """Wait for ``step``'s file (re-raising its write's error)."""
        write = self._writes.pop(step, None)
        if write is not None:
            write.result()

    def flush(self) -> None:
        for step in list(self._writes):
            self._written(step)

    def drop_oldest(self) -> None:
        step = self._steps.popleft()
        self._written(step)
        os.remove(self.path(step))

    def _read(self, step: int) -> list[Tensor]:
        self._written(step)
        by_index = load_file(self.path(step), device="cpu")
        return [by_index[str(i)] for i in range(len(by_index))]


def snapshots_in_use(folder: str | Path) -> Callable[[str], ConfigError]:
    """The error for a window folder whose lock (``run_lock.lock_folder``: ``.<name>.lock`` beside it, held while the
    store lives) another holds: two windows in one folder, of two runs or two averagers of one run, would delete each
    other's snapshots."""
    return lambda holder: ConfigError(f"dir: {folder} holds the snapshots of another window in use (held by "
                                      f"{holder}: another run, or another averager of this run); give each its own "
                                      f"folder, or leave dir empty for a temporary one")


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
