"""EMA: an exponential moving average of the weights, updated every ``every`` steps from step ``start``.

At observed steps ``s >= start`` with ``(s - start) % every == 0`` the first one copies the weights and each
later one does ``avg = lerp(avg, w, 1 - decay**every)``, so ``decay`` is per optimizer step whatever the
update interval (ema-pytorch, NeMo and Lightning apply it per update instead, which changes the averaging
horizon with ``every``). With ``every=1, start=0`` this is ``torch.optim.swa_utils.AveragedModel(
multi_avg_fn=get_ema_multi_avg_fn(decay))`` with one fused ``_foreach_lerp_`` per step.

``warmup=true`` lowers the decay early in the run, as timm's ``ModelEmaV3`` and diffusers' ``EMAModel`` do
(Crowson's inverse-gamma warm-up): ``t`` steps after the first update the decay is
``min(decay, 1 - (1 + t / inv_gamma) ** -power)``; with ``power=1`` and a decay near 1 that is the running mean. Their
defaults are ``inv_gamma=1, power=2/3`` (decay 0.999 at 31.6K steps); ``power=3/4`` reaches it at 10K.

The accumulators are float32 (float64 for float64 tensors) on the weights' device, so a bf16 model's EMA
keeps moving: in bf16 an update of ``(1 - 0.999) * (w - avg)`` is usually rounded away.

The helpers below are shared by the other averagers (SWA and LAWA import them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lawa_suite import registry
from lawa_suite.averagers.base import Averager, accumulator_copy, cast_like, follow_devices, is_count, staged_like
from lawa_suite.config import require

__all__ = ["EMA", "ema_update_"]


@torch.no_grad()
def ema_update_(avg: list[Tensor], new: list[Tensor], weight: float) -> None:
    """``avg[i] <- avg[i] + weight * (new[i] - avg[i])`` in place, one fused multi-tensor kernel.

    ``new`` is cast to each accumulator's dtype only where it differs (a bf16 model into fp32 accumulators).
    """
    torch._foreach_lerp_(avg, cast_like(new, avg), weight)


@registry.averagers.register("ema")
class EMA(Averager):
    """Exponential moving average with per-step ``decay``, updated every ``every`` steps from ``start``."""

    name = "ema"
    elementwise = True

    @dataclass
    class Config:
        decay: float = 0.999  # per optimizer step; an update every `every` steps uses decay**every
        every: int = 1        # update on every `every`-th step from `start`
        start: int = 0        # first step that may update (the first update copies the weights)
        warmup: bool = False  # lower the decay early: min(decay, 1 - (1 + t/inv_gamma)^-power), t steps after the first
        inv_gamma: float = 1.0   # warm-up time scale (timm, diffusers: 1)
        power: float = 2 / 3     # warm-up power (timm, diffusers: 2/3; 3/4 for shorter runs)

        def __post_init__(self) -> None:
            require(isinstance(self.inv_gamma, (int, float)) and self.inv_gamma > 0, "inv_gamma", "a number > 0",
                    self.inv_gamma)
            require(isinstance(self.power, (int, float)) and self.power > 0, "power", "a number > 0", self.power)
            require(isinstance(self.decay, (int, float)) and 0.0 < self.decay < 1.0, "decay",
                    "a number in (0, 1)", self.decay)
            require(is_count(self.every, 1), "every", "an integer >= 1", self.every)
            require(is_count(self.start, 0), "start", "an integer >= 0", self.start)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._avg: list[Tensor] = []  # float accumulators in layout order; empty until the first update
        self._first: int | None = None  # step of the first update (the warm-up counts from it)

    @property
    def ready(self) -> bool:
        return bool(self._avg)

    def wants(self, step: int) -> bool:
        return step >= self.config.start and (step - self.config.start) % self.config.every == 0

    def step_decay(self, steps_since_first: int) -> float:
        """The per-step decay ``t`` steps after the first update: ``decay``, or lower during the warm-up."""
        c = self.config
        if not c.warmup:
            return c.decay
        return min(c.decay, 1.0 - (1.0 + steps_since_first / c.inv_gamma) ** -c.power)

    def _update(self, step: int, floats: list[Tensor]) -> None:
        if not self._avg:
            self._avg = accumulator_copy(floats)
            self._first = step
            return
        self._avg = follow_devices(self._avg, floats)
        weight = 1.0 - self.step_decay(step - (self._first or 0)) ** self.config.every
        ema_update_(self._avg, staged_like(floats, self._avg, self._staging), weight)

    @classmethod
    def span_hint(cls, config: Any) -> str:
        span = 1 / (1 - config.decay)
        return (f"ema.decay={config.decay} averages over about {span:,.0f} observations (1/(1 - decay)), and post "
                f"hoc an observation is a saved checkpoint: a decay of 1 - 1/N averages over about N of them")

    @classmethod
    def documented_profile(cls, config: Any, total: int) -> list[float] | None:
        """Geometric: update ``u_i`` gets ``a_i * prod_{j > i} (1 - a_j)`` with ``a_1 = 1`` (the first update copies)
        and ``a_j = 1 - decay_j ** every`` (``decay_j`` lowered by the warm-up)."""
        updates = [s for s in range(1, total + 1) if s >= config.start and (s - config.start) % config.every == 0]
        if not updates:
            return None
        warm = cls(**dataclasses.asdict(config))
        weights, keep = [0.0] * total, 1.0
        for u in reversed(updates):
            a = 1.0 if u == updates[0] else 1.0 - warm.step_decay(u - updates[0]) ** config.every
            weights[u - 1] = a * keep
            keep *= 1.0 - a
        return weights

    def _averaged_floats(self) -> list[Tensor]:
        # Copies: the base casts with .to(dtype), which returns the accumulator itself for fp32 models, and a
        # caller that edits the returned average in place must not edit the EMA.
        return [a.clone() for a in self._avg]

    def _average_view(self) -> list[Tensor]:
        return list(self._avg)  # the accumulators are the average: evaluation copies straight from them

    def _extra_state(self) -> dict[str, Any]:
        return {"average": list(self._avg), "first": self._first}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._avg = [t.detach().clone() for t in state["average"]]
        self._first = state.get("first")  # states saved before the warm-up existed need none
