"""BEMA, the bias-corrected EMA (Block and Zhang 2025, "EMA Without the Lag: Bias-Corrected Iterate Averaging
Schemes", arXiv 2508.00180; Hugging Face TRL's ``BEMACallback``, from github.com/abblock/bema).

An EMA lags behind the weights it follows; BEMA adds back a decaying share of the distance travelled. At observed
steps ``s >= start`` with ``(s - start) % every == 0`` the first one sets ``theta_0`` and the EMA to the weights; at
later ones, ``t = s - start`` steps after it,

    ema <- (1 - b_t) ema + b_t w,        b_t = max((rho + gamma t) ** -kappa, min_beta)
    output = alpha_t (w - theta_0) + ema,  alpha_t = (rho + gamma t) ** -eta

with TRL's defaults ``kappa = 0.5`` (``ema_power``), ``eta = 0.2`` (``bias_power``), ``rho = 10`` (``lag``),
``gamma = 1`` (``multiplier``). TRL counts ``t`` from step 0 of training and takes ``theta_0`` from the weights before
training; here the first observation is ``theta_0`` and ``t`` counts from it (the same when ``start=0`` up to
the one step before the first observation). ``eta = 0`` is the strongest correction (output = the newest weights
plus the EMA's lag), not "off" (TRL PR #6390). The output's weights over the trajectory still sum to 1, but
``theta_0``'s is negative: BEMA is an extrapolation, not a convex average. Memory: the EMA, ``theta_0`` and the
newest weights, in float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lawa_suite import registry
from lawa_suite.averagers.base import Averager, accumulator_copy, follow_devices, is_count, staged_like
from lawa_suite.averagers.ema import ema_update_
from lawa_suite.config import require

__all__ = ["BEMA"]


@registry.averagers.register("bema")
class BEMA(Averager):
    """Bias-corrected EMA: ``alpha_t (w - theta_0) + ema`` with power-law ``b_t`` and ``alpha_t``."""

    name = "bema"
    elementwise = True

    @dataclass
    class Config:
        kappa: float = 0.5      # EMA power: b_t = (rho + gamma t)^-kappa (TRL ema_power)
        eta: float = 0.2        # correction power: alpha_t = (rho + gamma t)^-eta (TRL bias_power)
        rho: float = 10.0       # lag: a virtual starting age (TRL lag)
        gamma: float = 1.0      # time multiplier (TRL multiplier)
        min_beta: float = 0.0   # lower bound on b_t (TRL min_ema_multiplier)
        every: int = 1          # update on every `every`-th step from `start` (TRL update_freq: 400)
        start: int = 0          # first step that may update; it sets theta_0 (TRL update_after)

        def __post_init__(self) -> None:
            for key in ("kappa", "eta"):
                value = getattr(self, key)
                require(isinstance(value, (int, float)) and value >= 0, key, "a number >= 0", value)
            require(isinstance(self.rho, (int, float)) and self.rho >= 1, "rho", "a number >= 1 (so b_t <= 1)",
                    self.rho)
            require(isinstance(self.gamma, (int, float)) and self.gamma > 0, "gamma", "a number > 0", self.gamma)
            require(isinstance(self.min_beta, (int, float)) and 0 <= self.min_beta <= 1, "min_beta",
                    "a number in [0, 1]", self.min_beta)
            require(is_count(self.every, 1), "every", "an integer >= 1", self.every)
            require(is_count(self.start, 0), "start", "an integer >= 0", self.start)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._ema: list[Tensor] = []
        self._theta0: list[Tensor] = []
        self._newest: list[Tensor] = []
        self._first: int | None = None   # the step of theta_0

    def rates(self, t: int) -> tuple[float, float]:
        """``(b_t, alpha_t)`` ``t`` steps after ``theta_0``."""
        c = self.config
        age = c.rho + c.gamma * t
        return max(age ** -c.kappa, c.min_beta), age ** -c.eta

    @property
    def ready(self) -> bool:
        return bool(self._ema)

    def wants(self, step: int) -> bool:
        return step >= self.config.start and (step - self.config.start) % self.config.every == 0

    def _update(self, step: int, floats: list[Tensor]) -> None:
        if not self._ema:
            self._theta0 = accumulator_copy(floats)
            self._ema = accumulator_copy(floats)
            self._newest = accumulator_copy(floats)
            self._first = step
            return
        self._ema = follow_devices(self._ema, floats)
        self._theta0 = follow_devices(self._theta0, floats)
        self._newest = follow_devices(self._newest, floats)
        new = staged_like(floats, self._ema, self._staging)
        ema_update_(self._ema, new, self.rates(step - (self._first or 0))[0])
        torch._foreach_copy_(self._newest, new)

    @torch.no_grad()
    def _averaged_floats(self) -> list[Tensor]:
        if self.last_step is None or self._first is None or self.last_step == self._first:
            return [e.clone() for e in self._ema]
        alpha = self.rates(self.last_step - self._first)[1]
        out = torch._foreach_sub(self._newest, self._theta0)
        torch._foreach_mul_(out, alpha)
        torch._foreach_add_(out, self._ema)
        return list(out)

    @classmethod
    def documented_profile(cls, config: Any, total: int) -> list[float] | None:
        """EMA weights ``b_i prod_{j > i} (1 - b_j)`` (the first observation ``theta_0`` takes what is left), plus
        ``alpha_T`` on the newest observation and ``-alpha_T`` on ``theta_0``."""
        updates = [s for s in range(1, total + 1) if s >= config.start and (s - config.start) % config.every == 0]
        if not updates:
            return None
        bema = cls(**{f: getattr(config, f) for f in config.__dataclass_fields__})
        weights, keep = [0.0] * total, 1.0
        for u in reversed(updates[1:]):
            b = bema.rates(u - updates[0])[0]
            weights[u - 1] = b * keep
            keep *= 1.0 - b
        weights[updates[0] - 1] = keep
        if len(updates) > 1:
            alpha = bema.rates(updates[-1] - updates[0])[1]
            weights[updates[-1] - 1] += alpha
            weights[updates[0] - 1] -= alpha
        return weights

    def _extra_state(self) -> dict[str, Any]:
        return {"ema": list(self._ema), "theta0": list(self._theta0), "newest": list(self._newest),
                "first": self._first}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._ema = [t.detach().clone() for t in state["ema"]]
        self._theta0 = [t.detach().clone() for t in state["theta0"]]
        self._newest = [t.detach().clone() for t in state["newest"]]
        self._first = state["first"]
