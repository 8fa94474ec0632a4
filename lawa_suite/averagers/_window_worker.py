"""The background thread an averager owns for its window jobs (``WindowWorker``: LAWA's window sum on the CPU, the
disk store's writes), ended by the averager's ``close()``, and kept safe across ``fork``.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


__all__ = ["WindowWorker"]


class WindowWorker:
    """One background thread for one averager's window jobs (LAWA's window sum on the CPU, the disk store's writes),
    started on the first job; jobs run in the order they were submitted. ``close()`` finishes the queued jobs and
    ends the thread (a later job starts another); a worker that is garbage collected ends its thread too.

    Fork-safe: before ``fork`` every started worker finishes its queued jobs (the child gets no copy of the thread:
    a queued job would never run there and a half-done one would leave its sums torn), and in the child each starts
    a fresh thread on its next job. The hook that does this is registered when the first thread starts, never at
    import."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, job: Callable[..., Any], *args: Any) -> Future:
        if self._pool is None:
            _watch_forks(self)  # (before the thread starts, and outside this worker's lock, which the fork hook takes)
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)
            return self._pool.submit(job, *args)

    @property
    def threads(self) -> list[threading.Thread]:
        """The live thread (none before the first job and after ``close()``)."""
        pool = self._pool
        return [t for t in getattr(pool, "_threads", ()) if t.is_alive()]

    def drain(self) -> None:
        """Return once every job submitted so far has run (one thread, jobs in order: a no-op job runs last)."""
        with self._lock:
            if self._pool is not None:
                self._pool.submit(_nothing).result()

    def close(self) -> None:
        """Run the queued jobs, then end the thread."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def _forget_in_child(self) -> None:
        self._lock, self._pool = threading.Lock(), None


def _nothing() -> None:
    pass


_started: weakref.WeakSet[WindowWorker] | None = None  # workers that started a thread: made with the first one
_started_lock = threading.Lock()


def _watch_forks(worker: WindowWorker) -> None:
    global _started
    with _started_lock:
        if _started is None:
            _started = weakref.WeakSet()
            os.register_at_fork(before=_drain_before_fork, after_in_parent=_release_after_fork,
                                after_in_child=_forget_in_child)
        _started.add(worker)


def _drain_before_fork() -> None:
    _started_lock.acquire()  # (no worker starts while the process forks; released after, in the parent)
    for worker in list(_started or ()):
        try:
            worker.drain()
        except RuntimeError:  # shut down (interpreter exit): nothing left queued
            pass


def _release_after_fork() -> None:
    _started_lock.release()


def _forget_in_child() -> None:
    global _started_lock
    _started_lock = threading.Lock()
    for worker in list(_started or ()):
        worker._forget_in_child()


