"""LAWA (Latest Weight Averaging; Kaddour 2022, Sanyal et al. 2024): the mean of the latest ``k`` snapshots
taken every ``nu`` steps.

A snapshot is kept at every step divisible by ``nu``; the average is ready once ``k`` exist. The update is
O(1) in ``k``: a running sum of the window in float32 (float64 for float64 models), on the weights'
device, gains the new snapshot and loses the one leaving the window. Adding and subtracting in floating
point drifts over a long run (a large early snapshot leaves rounding error behind that no later
subtraction removes), so once every ``k`` evictions the sum is recomputed from the stored window instead:
``k`` additions every ``k`` evictions, amortised O(1), and the error never outlives two windows.

Snapshots are exact copies in the model's dtype (bf16 stays bf16), never on an accelerator: in host memory
(``store=cpu``) or as safetensors files in a folder (``store=disk``, read back only to subtract or
recompute; ``dir`` names the folder, one per averager, else a fresh temporary folder removed with the
averager). They are always real copies: ``.cpu()`` of a CPU tensor returns the tensor itself, which made the
original LAWA code store ``k`` aliases of the live weights when training on CPU.

With ``store=cpu`` the training thread pays for one copy per snapshot and nothing else: the copy goes into
the buffers of a snapshot that left the window earlier, and the window-sum arithmetic (add the new snapshot,
subtract the leaving one, or the periodic recompute) runs on one background thread that all LAWA averagers of
the process share, overlapping the next training steps. Anything that reads the sum (``average()``,
``state_dict()``, the next snapshot) first waits for it, so results are bit for bit those of doing it inline.
The leaving snapshot's buffers are reused once its subtraction is done, so ``store=cpu`` holds ``k + 1``
snapshots after the window first slides (``k`` plus that spare).

With ``store=cpu`` and weights on a CUDA device, the training thread never waits for the device either: the
snapshot goes into pinned host buffers with a non-blocking copy, and the window-sum arithmetic (on the device,
reading the live weights for the new member and a non-blocking upload of the leaving one) is queued on the
same stream right away, so no thread is needed and stream order keeps the copy ahead of the next optimizer
step. An event recorded after that work is what ``wait()`` (and so ``average()``, ``state_dict()`` and the
next snapshot, ``nu`` steps later) synchronizes on before the host reads the copies.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from lawa_suite import registry
from lawa_suite.averagers.base import Averager, accumulator_copy, cast_like, follow_devices, is_count, staged_like
from lawa_suite.config import choice, require

__all__ = ["LAWA", "snapshot_copy", "pinned_snapshot_copy", "window_push_", "window_resum_", "window_mean",
           "window_worker", "MemorySnapshots", "DiskSnapshots"]


# -- the window sum: pure helpers ---------------------------------------------------------------------
def snapshot_copy(floats: list[Tensor]) -> list[Tensor]:
    """Contiguous host copies of ``floats`` in their own dtype; always copies, even from CPU tensors."""
    return [t.detach().to("cpu", copy=True, memory_format=torch.contiguous_format) for t in floats]


def pinned_snapshot_copy(floats: list[Tensor]) -> list[Tensor]:
    """Host copies of CUDA tensors ``floats`` in pinned memory, queued on the current stream and not waited for:
    read them on the host only after synchronizing. Where pinned memory runs out, plain copies (they wait)."""
    try:
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in floats]
    except RuntimeError:  # cudaHostAlloc failed: page-locked memory is limited by the OS
        return snapshot_copy(floats)
    torch._foreach_copy_(host, [t.detach() for t in floats], non_blocking=True)
    return host


@torch.no_grad()
def window_push_(total: list[Tensor], new: list[Tensor], non_blocking: bool = False) -> None:
    """``total += new`` in place (``new`` cast to the accumulator's dtype and device; ``non_blocking``: an upload
    from pinned host memory is queued, not waited for)."""
    torch._foreach_add_(total, cast_like(new, total, non_blocking))


@torch.no_grad()
def window_resum_(total: list[Tensor], snapshots: Iterable[list[Tensor]], non_blocking: bool = False) -> None:
    """``total`` <- the exact sum of ``snapshots``, in place (no new accumulators)."""
    torch._foreach_zero_(total)
    for snapshot in snapshots:
        window_push_(total, snapshot, non_blocking)


@torch.no_grad()
def window_mean(total: list[Tensor], k: int) -> list[Tensor]:
    """New tensors ``total / k``."""
    return list(torch._foreach_div(total, float(k)))


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
    def drop_oldest(self) -> None: ...
    def clear(self) -> None: ...


class _StepWindow:
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


class MemorySnapshots(_StepWindow):
    """The window in host memory (``store=cpu``)."""

    def __init__(self) -> None:
        self._steps = deque()
        self._tensors: deque[list[Tensor]] = deque()
        self._spares: list[list[Tensor]] = []     # buffers of snapshots that left the window, reused by append

    def __iter__(self) -> Iterator[list[Tensor]]:
        return iter(list(self._tensors))

    def newest(self) -> list[Tensor]:
        """The newest snapshot's own buffers (read-only for the caller)."""
        return self._tensors[-1]

    def append(self, step: int, tensors: list[Tensor]) -> None:
        self._steps.append(step)
        self._tensors.append(self._copy(tensors))

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


class DiskSnapshots(_StepWindow):
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
            else:
                self._folder = tempfile.mkdtemp(prefix="lawa-snapshots-")
                weakref.finalize(self, shutil.rmtree, self._folder, True)
            self._made = True
        return self._folder

    def path(self, step: int) -> str:
        return os.path.join(self.folder, f"snapshot-{step:010d}.safetensors")

    def __iter__(self) -> Iterator[list[Tensor]]:
        return (self._read(step) for step in list(self._steps))

    def append(self, step: int, tensors: list[Tensor]) -> None:
        path = self.path(step)
        save_file({str(i): t for i, t in enumerate(snapshot_copy(tensors))}, path + ".tmp")
        os.replace(path + ".tmp", path)
        self._steps.append(step)

    def pop_oldest(self) -> list[Tensor]:
        tensors = self._read(self._steps[0])
        self.drop_oldest()
        return tensors

    def recycle(self, tensors: list[Tensor]) -> None:
        """Nothing to reuse: each snapshot is a file."""

    def drop_oldest(self) -> None:
        os.remove(self.path(self._steps.popleft()))

    def clear(self) -> None:
        while self._steps:
            self.drop_oldest()

    def _read(self, step: int) -> list[Tensor]:
        by_index = load_file(self.path(step), device="cpu")
        return [by_index[str(i)] for i in range(len(by_index))]


# -- the averager ---------------------------------------------------------------------------------------
@registry.averagers.register("lawa")
class LAWA(Averager):
    """Mean of the latest ``k`` snapshots taken at steps divisible by ``nu``."""

    name = "lawa"
    elementwise = True

    @dataclass
    class Config:
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

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._store: SnapshotStore = (DiskSnapshots(self.config.dir) if self.config.store == "disk"
                                      else MemorySnapshots())
        self._sum: list[Tensor] = []  # sum of the window's snapshots in the accumulation dtype, layout order
        self._evictions = 0           # snapshots that left the window; the sum is recomputed every k of them
        self._pending: Future | None = None  # the window-sum job running on the background thread (store=cpu)
        self._queued: Any = None      # CUDA event after the last snapshot's queued copies and arithmetic

    @property
    def ready(self) -> bool:
        return len(self._store) == self.config.k

    def use_store(self, store: SnapshotStore) -> None:
        """Keep the window in ``store`` (before the first snapshot). Post-hoc averaging passes a store that
        re-reads the saved checkpoints instead of copying them, so memory does not grow with ``k``."""
        if len(self._store):
            raise ValueError("lawa: use_store must come before the first snapshot")
        self._store = store

    @property
    def snapshot_steps(self) -> list[int]:
        """Steps of the snapshots in the window, oldest first."""
        return self._store.steps

    def wants(self, step: int) -> bool:
        return step % self.config.nu == 0

    def _update(self, step: int, floats: list[Tensor]) -> None:
        newest = self._store.newest_step
        if newest is not None and step <= newest:  # a repeated step would count twice (and overwrite a disk file)
            raise ValueError(f"lawa: snapshot steps must increase: got step {step} after {newest}")
        self.wait()  # on CUDA: the previous snapshot's event, nu steps old, long since passed
        if self._sum:
            self._sum = follow_devices(self._sum, floats)
        if self._on_cuda(floats):
            # copies and arithmetic queued on the device's stream, in order; the host goes on at once
            self._take_snapshot(step, floats, queued=True)()
            self._queued = torch.cuda.Event()
            self._queued.record(torch.cuda.current_stream(floats[0].device))
        elif isinstance(self._store, MemorySnapshots):
            # copy now (the weights change at the next step); do the arithmetic on the stored copy, off this thread
            arithmetic = self._take_snapshot(step, floats, queued=False)
            self._pending = window_worker().submit(arithmetic)
        else:  # disk or a post-hoc reader: the arithmetic reads from where the snapshots are, inline
            self._take_snapshot(step, floats, queued=False)()

    def _on_cuda(self, floats: list[Tensor]) -> bool:
        """Whether this snapshot takes the queued path: the window in host memory, the weights on CUDA."""
        return isinstance(self._store, MemorySnapshots) and bool(floats) and all(t.is_cuda for t in floats)

    def _take_snapshot(self, step: int, floats: list[Tensor], queued: bool) -> Callable[[], None]:
        """Put ``floats`` into the window now; return the window-sum arithmetic that goes with it. ``queued``: the
        CUDA path, whose uploads of host copies are queued too (they come from pinned memory)."""
        store, k = self._store, self.config.k
        # on the background thread the arithmetic reads the stored copy: the live weights change at the next step
        later = isinstance(store, MemorySnapshots) and not queued
        if not self._sum:
            new = self._append(step, floats, later)
            return lambda: setattr(self, "_sum", accumulator_copy(new))
        if len(store) < k:
            new = self._append(step, floats, later)
            return lambda: window_push_(self._sum, staged_like(new, self._sum, self._staging, queued))
        self._evictions += 1
        if self._evictions % k == 0:  # drift control: an exact sum of the window, amortised O(1)
            store.drop_oldest()  # its buffers take the new snapshot
            store.append(step, floats)
            return lambda: window_resum_(self._sum, store, queued)
        old = store.pop_oldest()
        new = self._append(step, floats, later)

        def slide() -> None:
            torch._foreach_sub_(self._sum, staged_like(old, self._sum, self._staging, queued))
            window_push_(self._sum, staged_like(new, self._sum, self._staging, queued))
            store.recycle(old)  # the next snapshot is copied into these buffers (queued after this upload)
        return slide

    def _append(self, step: int, floats: list[Tensor], later: bool) -> list[Tensor]:
        """Append ``floats`` to the window; return what the arithmetic reads: the stored copy when it runs
        ``later`` (on the background thread), else ``floats`` (it runs, or on CUDA is queued, now)."""
        self._store.append(step, floats)
        return self._store.newest() if later else floats

    def wait(self) -> None:
        """Wait for the background window-sum job (re-raising its error), and on CUDA for the queued copies and
        arithmetic of the last snapshot: after this the host copies may be read."""
        pending, self._pending = self._pending, None
        queued, self._queued = self._queued, None
        if pending is not None:
            pending.result()
        if queued is not None:
            queued.synchronize()

    def _averaged_floats(self) -> list[Tensor]:
        self.wait()
        return window_mean(self._sum, self.config.k)

    def _extra_state(self) -> dict[str, Any]:
        self.wait()
        # The disk store's snapshots are read back too, so a checkpoint is self-contained.
        return {"steps": self._store.steps, "snapshots": list(self._store), "sum": list(self._sum),
                "evictions": self._evictions}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.wait()
        self._store.clear()
        for step, tensors in zip(state["steps"], state["snapshots"], strict=True):
            self._store.append(int(step), list(tensors))
        self._sum = [t.detach().clone() for t in state["sum"]]
        self._evictions = int(state["evictions"])
