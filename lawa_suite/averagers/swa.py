"""SWA: the uniform mean of the weights at steps ``s >= start`` with ``(s - start) % every == 0``.

It equals ``torch.optim.swa_utils.AveragedModel``'s default average over the same observations, computed
as a running mean (one fused ``_foreach_lerp_`` with weight ``1/n`` per observation) in float32 (float64
for float64 tensors) on the weights' device. SWA's cyclic or constant learning-rate schedule is a training
option, not part of this observer.

``start`` is one float-typed key so that ``swa.start=100`` and ``swa.start=0.75`` both parse:
- ``0`` averages from the first observed step;
- a fraction in ``(0, 1)`` is that fraction of the run's total steps, resolved by ``start_run(total_steps)``
  to the first step ``s >= fraction * total_steps``;
- an integral value ``>= 1`` (``100`` or ``100.0``) is a step number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lawa_suite import registry
from lawa_suite.averagers.base import Averager, accumulator_copy, follow_devices, is_count, staged_like
from lawa_suite.averagers.ema import ema_update_
from lawa_suite.config import require

__all__ = ["SWA", "running_mean_update_", "is_fraction", "resolve_start"]


@torch.no_grad()
def running_mean_update_(avg: list[Tensor], new: list[Tensor], count: int) -> None:
    """Fold the ``count``-th observation ``new`` into the running mean ``avg`` of the previous ``count - 1``."""
    ema_update_(avg, new, 1.0 / count)


def is_fraction(start: float) -> bool:
    """True if ``start`` means a fraction of the run (``0 < start < 1``) rather than a step number."""
    return 0.0 < start < 1.0


def resolve_start(start: float, total_steps: int | None) -> int:
    """The first step SWA may average: ``start`` itself, or the first step at ``start * total_steps`` or later."""
    if not is_fraction(start):
        return int(start)
    if total_steps is None:
        raise ValueError(f"swa: start={start} is a fraction of the run's total steps, which this averager was "
                         f"not told: call start_run(total_steps) before observing, or give start in steps")
    # Rounded first: 0.07 * 100 is 7.000000000000001 in binary floating point, and ceil of that is 8.
    return math.ceil(round(start * total_steps, 6))


@registry.averagers.register("swa")
class SWA(Averager):
    """Uniform average of every ``every``-th step from ``start`` (a step, or a fraction of the run)."""

    name = "swa"
    elementwise = True

    @dataclass
    class Config:
        start: float = 0.75   # a step number (integral, >= 1), a fraction of the run in (0, 1), or 0 = from the start
        every: int = 1        # average every `every`-th step from `start`

        def __post_init__(self) -> None:
            valid = (isinstance(self.start, (int, float)) and not isinstance(self.start, bool) and
                     math.isfinite(self.start) and (self.start == 0 or is_fraction(self.start) or
                                                    (self.start >= 1 and float(self.start).is_integer())))
            require(valid, "start", "a step number (an integer >= 0) or a fraction of the run in (0, 1)", self.start)
            require(is_count(self.every, 1), "every", "an integer >= 1", self.every)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._total_steps: int | None = None
        self._avg: list[Tensor] = []  # float accumulators in layout order; empty until the first observation
        self._count = 0               # observations in the mean

    def start_run(self, total_steps: int) -> None:
        if not is_count(total_steps, 1):
            raise ValueError(f"swa: total_steps must be an integer >= 1, got {total_steps!r}")
        self._total_steps = total_steps

    @property
    def start_step(self) -> int:
        """The first step that may be averaged (a ValueError for a fraction before ``start_run``)."""
        return resolve_start(self.config.start, self._total_steps)

    @property
    def ready(self) -> bool:
        return self._count > 0

    def wants(self, step: int) -> bool:
        start = self.start_step
        return step >= start and (step - start) % self.config.every == 0

    def _update(self, step: int, floats: list[Tensor]) -> None:
        self._count += 1
        if self._count == 1:
            self._avg = accumulator_copy(floats)
            return
        self._avg = follow_devices(self._avg, floats)
        running_mean_update_(self._avg, staged_like(floats, self._avg, self._staging), self._count)

    @classmethod
    def documented_profile(cls, config: Any, total: int) -> list[float] | None:
        """Uniform over the observed steps from the start step (a fraction resolved against ``total``)."""
        start = resolve_start(config.start, total)
        used = [s for s in range(1, total + 1) if s >= start and (s - start) % config.every == 0]
        return [1.0 / len(used) if s in set(used) else 0.0 for s in range(1, total + 1)] if used else None

    def _averaged_floats(self) -> list[Tensor]:
        # Copies: the base casts with .to(dtype), which returns the accumulator itself for fp32 models.
        return [a.clone() for a in self._avg]

    def _average_view(self) -> list[Tensor]:
        return list(self._avg)  # the accumulators are the average: evaluation copies straight from them

    def _extra_state(self) -> dict[str, Any]:
        return {"average": list(self._avg), "count": self._count, "total_steps": self._total_steps}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._avg = [t.detach().clone() for t in state["average"]]
        self._count = int(state["count"])
        self._total_steps = state["total_steps"]
