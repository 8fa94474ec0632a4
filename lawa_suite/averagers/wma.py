"""Weighted merges of the latest ``k`` snapshots taken every ``nu`` steps: checkpoint merging as a replacement for
learning-rate decay (WSM, Tian et al. 2025, arXiv 2507.17634; PMA, ByteDance Seed 2025, arXiv 2505.12082).

WSM shows that merging checkpoints of a constant-learning-rate run emulates a decay: the merge
``sum_j c_j theta_(n+j)`` equals ``theta_n - sum_i w_i g_(n+i-1)``, a run whose later updates were scaled by the
decay ``w``, when ``c_0 = 1 - w_1``, ``c_j = w_j - w_(j+1)`` and the newest ``c_(k-1) = w_(k-1)``, with
``w_i = shape(i / k)`` (Megatron-LM's ``tools/checkpoint/weighted_merge.py`` maps schedules the same way). Shapes:
``1-sqrt`` (``1 - sqrt(x)``, the cooldown of Hägele et al. 2024), ``cosine`` (``(1 + cos(pi x)) / 2``), ``linear``
(``1 - x``) and ``uniform`` (``c_j = 1/k``: LAWA). ``linear`` gives exactly the uniform weights: the finite differences
of a linear decay are constant, so LAWA is the merge that emulates a linear decay. Weights are non-negative and sum
to 1 for every shape; a decay that falls fast puts most weight on the oldest snapshot.

The window is LAWA's (``_window.py``): snapshots in host memory or on disk, never on the accelerator (copied off the
training stream; files written on the averager's own thread, ended by ``close()``), and post hoc the members are
re-read from the input. The weighted sum is formed when the average is read (``k`` fused
multiply-adds), not at every snapshot.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lawa_suite import registry
from lawa_suite.averagers._window import (RereadSnapshots, SnapshotStore, WindowConfig, window_folder, window_replay,
                                          window_store)
from lawa_suite.averagers._window_worker import WindowWorker
from lawa_suite.averagers.base import Averager, ReplayTrack, SnapshotFolder, accumulation_dtype
from lawa_suite.config import choice, require

__all__ = ["WMA", "SHAPES", "merge_coefficients"]

SHAPES: dict[str, Callable[[float], float]] = {
    "1-sqrt": lambda x: 1.0 - math.sqrt(x),
    "cosine": lambda x: 0.5 * (1.0 + math.cos(math.pi * x)),
    "linear": lambda x: 1.0 - x,
}


def merge_coefficients(k: int, shape: str) -> list[float]:
    """WSM's merge weights of ``k`` snapshots, oldest first, for a decay ``shape`` (or ``uniform``)."""
    if shape == "uniform" or k == 1:
        return [1.0 / k] * k
    decay = [SHAPES[shape](i / k) for i in range(k)]
    c = [decay[i] - decay[i + 1] for i in range(k - 1)] + [decay[-1]]
    c[0] = 1.0 - sum(c[1:])  # = 1 - decay[1]; written so the weights sum to 1 in floating point too
    return c


@registry.averagers.register("wma")
class WMA(Averager):
    """Weighted merge of the latest ``k`` snapshots at steps divisible by ``nu``, weights from a decay shape."""

    name = "wma"
    elementwise = True

    @dataclass
    class Config(WindowConfig):
        """LAWA's window keys (k, nu, store, dir; ``_window.WindowConfig``) and the decay shape."""
        shape: str = choice("1-sqrt", "1-sqrt", "cosine", "linear", "uniform")  # the decay the merge emulates

        def __post_init__(self) -> None:
            super().__post_init__()
            require(self.shape in (*SHAPES, "uniform"), "shape", f"one of {', '.join([*SHAPES, 'uniform'])}",
                    self.shape)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.coefficients = merge_coefficients(self.config.k, self.config.shape)
        self._worker = WindowWorker(f"{self.name}-window")  # writes store=disk files in the background
        self._store: SnapshotStore = window_store(self.config, self._worker)

    @property
    def ready(self) -> bool:
        return len(self._store) == self.config.k

    def wants(self, step: int) -> bool:
        return step % self.config.nu == 0

    def _update(self, step: int, floats: list[Tensor]) -> None:
        if len(self._store) == self.config.k:
            self._store.drop_oldest()  # its buffers take the new snapshot
        self._store.append(step, floats)

    @torch.no_grad()
    def _averaged_floats(self) -> list[Tensor]:
        total: list[Tensor] = []
        for c, snapshot in zip(self.coefficients, self._store):  # (a host read: waits for queued copies first)
            if not total:
                total = [t.to(accumulation_dtype(t.dtype)) * c for t in snapshot]
            else:
                torch._foreach_add_(total, [t.to(a.dtype) for t, a in zip(snapshot, total)], alpha=c)
        return total

    # -- post hoc: the window is in steps, as LAWA's ------------------------------------------------------
    posthoc_clock = "steps"

    @classmethod
    def plan_replay(cls, config: Any, steps: list[int],
                    targets: list[int] | None) -> tuple[list[ReplayTrack], list[str]]:
        return window_replay(config.k, config.nu, steps, targets)

    def replay_from(self, read: Callable[[int], list[Tensor]]) -> None:
        if len(self._store):
            raise ValueError("wma: replay_from must come before the first snapshot")
        self._store = RereadSnapshots(read)

    def averaged_clocks(self) -> list[int] | None:
        return self._store.steps

    @classmethod
    def documented_profile(cls, config: Any, total: int) -> list[float] | None:
        """The merge weights on the newest k multiples of nu up to ``total``, oldest first; None before k exist."""
        newest = total - total % config.nu
        window = [newest - j * config.nu for j in reversed(range(config.k))]
        if window[0] < config.nu:
            return None
        weights = dict(zip(window, merge_coefficients(config.k, config.shape)))
        return [weights.get(s, 0.0) for s in range(1, total + 1)]

    def _extra_state(self) -> dict[str, Any]:
        return {"steps": self._store.steps, "snapshots": list(self._store)}  # (iterating waits for queued copies)

    def snapshot_folder(self) -> SnapshotFolder | None:
        return window_folder(self.config)

    def close(self) -> None:
        """Finish the queued copies and file writes, and end the background thread, also when a write failed (its
        error is raised after)."""
        try:
            self._store.flush()
        finally:
            self._worker.close()

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._store.clear()
        for step, tensors in zip(state["steps"], state["snapshots"], strict=True):
            self._store.append(int(step), list(tensors))
