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
subtract the leaving one, or the periodic recompute) runs on the averager's own background thread (``WindowWorker``,
ended by ``close()`` or with the averager), overlapping the next training steps. Anything that reads the sum
(``average()``, ``state_dict()``, the next snapshot) first waits for it, so results are bit for bit those of doing
it inline. The leaving snapshot's buffers are reused once its subtraction is done, so ``store=cpu`` holds ``k + 1``
snapshots after the window first slides (``k`` plus that spare). With ``store=disk`` the files are written on that
thread too. The stores live in ``_window.py``.

With weights on a CUDA device, neither the training thread nor the training stream waits for a snapshot: the
stream gets one device-to-device copy of the weights into flat staging blocks; the copy to host memory (one pinned
block per dtype) and the window-sum arithmetic (on the device, reading the staged weights for the new member and a
non-blocking upload of the leaving one) run on a side stream after it (``_window.DeviceToHost``). An event after
that side work is what the host waits on before reading a copy (``state_dict()``, wma's average); the training
stream waits for it on the device before reading the sum (``average()``) or overwriting the staging blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lawa_suite import registry
from lawa_suite.averagers._window import (MemorySnapshots, RereadSnapshots, SnapshotStore, WindowConfig,
                                          window_folder, window_replay, window_store)
from lawa_suite.averagers._window_worker import WindowWorker
from lawa_suite.averagers.base import (Averager, ReplayTrack, SnapshotFolder, accumulation_dtype, cast_like,
                                       follow_devices, staged_like)

__all__ = ["LAWA", "window_push_", "window_resum_", "window_mean"]


# -- the window sum: pure helpers ---------------------------------------------------------------------
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


# -- the averager ---------------------------------------------------------------------------------------
@registry.averagers.register("lawa")
class LAWA(Averager):
    """Mean of the latest ``k`` snapshots taken at steps divisible by ``nu``."""

    name = "lawa"
    elementwise = True

    @dataclass
    class Config(WindowConfig):
        """k, nu, store, dir: the window's keys (``_window.WindowConfig``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._worker = WindowWorker(f"{self.name}-window")
        self._store: SnapshotStore = window_store(self.config, self._worker)
        self._sum: list[Tensor] = []  # sum of the window's snapshots in the accumulation dtype, layout order
        self._evictions = 0           # snapshots that left the window; the sum is recomputed every k of them
        self._pending: Future | None = None  # the window-sum job running on the background thread (store=cpu)

    @property
    def ready(self) -> bool:
        return len(self._store) == self.config.k

    @property
    def snapshot_steps(self) -> list[int]:
        """Steps of the snapshots in the window, oldest first."""
        return self._store.steps

    # -- post hoc: the window is in steps ------------------------------------------------------------------
    posthoc_clock = "steps"

    @classmethod
    def plan_replay(cls, config: Any, steps: list[int],
                    targets: list[int] | None) -> tuple[list[ReplayTrack], list[str]]:
        """The output at saved step ``t`` is the mean of the saved steps ``t, t - nu, ..., t - (k-1)*nu``
        (``window_replay``: one replay per residue of ``nu``, bit for bit the online LAWA)."""
        return window_replay(config.k, config.nu, steps, targets)

    @classmethod
    def documented_profile(cls, config: Any, total: int) -> list[float] | None:
        """1/k on the newest k multiples of nu up to ``total``; None before k exist (not ready)."""
        newest = total - total % config.nu
        window = {newest - j * config.nu for j in range(config.k)}
        if min(window) < config.nu:
            return None
        return [1.0 / config.k if s in window else 0.0 for s in range(1, total + 1)]

    def replay_from(self, read: Callable[[int], list[Tensor]]) -> None:
        """Keep the window as clocks and re-read a member when it leaves, instead of copying k snapshots."""
        if len(self._store):
            raise ValueError("lawa: replay_from must come before the first snapshot")
        self._store = RereadSnapshots(read)

    def averaged_clocks(self) -> list[int] | None:
        return self._store.steps

    def wants(self, step: int) -> bool:
        return step % self.config.nu == 0

    def _update(self, step: int, floats: list[Tensor]) -> None:
        newest = self._store.newest_step
        if newest is not None and step <= newest:  # a repeated step would count twice (and overwrite a disk file)
            raise ValueError(f"lawa: snapshot steps must increase: got step {step} after {newest}")
        self._finish_job()  # (on CUDA the side stream keeps the order: no wait here)
        if self._sum:
            self._sum = follow_devices(self._sum, floats)
        if self._on_cuda(floats):
            # staged on this stream; the host copy and the arithmetic queued on the side stream after it
            arithmetic = self._take_snapshot(step, floats, queued=True)
            self._store.queue(arithmetic)  # type: ignore[attr-defined]
        elif isinstance(self._store, MemorySnapshots):
            # copy now (the weights change at the next step); do the arithmetic on the stored copy, off this thread
            arithmetic = self._take_snapshot(step, floats, queued=False)
            self._pending = self._worker.submit(arithmetic)
        else:  # disk or a post-hoc reader: the arithmetic reads from where the snapshots are, inline
            self._take_snapshot(step, floats, queued=False)()

    def _on_cuda(self, floats: list[Tensor]) -> bool:
        """Whether this snapshot takes the queued path: the window in host memory, the weights on CUDA."""
        return isinstance(self._store, MemorySnapshots) and bool(floats) and all(t.is_cuda for t in floats)

    def _take_snapshot(self, step: int, floats: list[Tensor], queued: bool) -> Callable[[], None]:
        """Put ``floats`` into the window now; return the window-sum arithmetic that goes with it. ``queued``: the
        CUDA path, whose arithmetic runs on the side stream (uploads of host copies from pinned memory queued too)."""
        store, k = self._store, self.config.k
        if not self._sum:  # allocated here, on the training thread and stream; filled by the arithmetic
            self._sum = [torch.empty_like(t, dtype=accumulation_dtype(t.dtype), memory_format=torch.contiguous_format)
                         for t in floats]
            new = self._append(step, floats, queued)
            return lambda: torch._foreach_copy_(self._sum, new)
        if len(store) < k:
            new = self._append(step, floats, queued)
            return lambda: window_push_(self._sum, staged_like(new, self._sum, self._staging, queued))
        self._evictions += 1
        if self._evictions % k == 0:  # drift control: an exact sum of the window, amortised O(1)
            store.drop_oldest()  # its buffers take the new snapshot
            store.append(step, floats)
            members = store.members() if queued else store  # type: ignore[attr-defined]
            return lambda: window_resum_(self._sum, members, queued)
        old = store.pop_oldest()
        new = self._append(step, floats, queued)

        def slide() -> None:
            torch._foreach_sub_(self._sum, staged_like(old, self._sum, self._staging, queued))
            window_push_(self._sum, staged_like(new, self._sum, self._staging, queued))
            store.recycle(old)  # the next snapshot is copied into these buffers (queued after this upload)
        return slide

    def _append(self, step: int, floats: list[Tensor], queued: bool) -> list[Tensor]:
        """Append ``floats`` to the window; return what the arithmetic reads: the stored copy when it runs later on
        the background thread, the device staging on CUDA (the weights change at the next step), else ``floats``
        (it runs now, inline)."""
        self._store.append(step, floats)
        if queued:
            return self._store.newest_on_device()  # type: ignore[attr-defined]
        return self._store.newest() if isinstance(self._store, MemorySnapshots) else floats

    def _finish_job(self) -> None:
        """Wait for the background window-sum job (store=cpu on the CPU), re-raising its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def wait(self) -> None:
        """Wait for the background window-sum job (re-raising its error), and on CUDA for the side stream's copies
        and arithmetic of the last snapshot: after this the host may read the copies and the sum."""
        self._finish_job()
        self._store.flush()

    def snapshot_folder(self) -> SnapshotFolder | None:
        return window_folder(self.config)

    def close(self) -> None:
        """Finish the queued work (files on disk included) and end the background thread, also when that work
        failed (its error is raised after)."""
        try:
            self.wait()
        finally:
            self._worker.close()

    def _averaged_floats(self) -> list[Tensor]:
        self._finish_job()
        if isinstance(self._store, MemorySnapshots):
            self._store.wait_on_device()  # the mean is taken on the training stream: after the side stream's sum
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
