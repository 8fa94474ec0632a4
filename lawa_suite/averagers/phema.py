"""Power-function EMA (Karras et al., CVPR 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models",
arXiv 2312.02696; NVlabs/edm2 ``training/phema.py``), with one track per ``sigma_rel``.

At an update at optimizer step ``t`` (counting from 1), ``avg = lerp(avg, w, 1 - beta_t)`` with
``beta_t = (1 - dt/t) ** (gamma + 1)`` (EDM2 Eq. 127), ``dt`` the steps since the previous update (0 before the
first, so the first update copies). ``dt`` is what keeps ``every > 1`` right: ema-pytorch's ``KarrasEMA`` uses
``dt = 1`` whatever its ``update_every``, and with its default of 100 its "sigma_rel 0.10" EMA is centred at 7% of
training instead of 89%. The average after step ``T`` weighs step ``t`` in proportion to ``t ** gamma`` on
``[0, T]``: a profile that grows with the run, described by its relative standard deviation ``sigma_rel``
(``gamma`` is the largest real root of ``g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2)``, s = sigma_rel; EDM2 Eq. 126,
Algorithm 2). ``sigma_rel`` must lie in (0, 0.289): 0.289 = 1/sqrt(12) is the uniform average from step 0.

Several ``sigma_rel`` values are several tracks, all updated from the same observation, as EDM2 keeps 0.05 and 0.10.
The first track is this averager's average (what is scored and exported); to score another track online run it
as a named instance (``phema_b.of=phema phema_b.sigma_rel=0.05``). With ``snapshot_every`` the loop stores every
track's average in the run folder (``averages/<name>/``) every so many steps, with its step, sigma_rel and gamma in
the file's metadata: the input of EDM2's post-hoc reconstruction of other lengths (``phema_synthesis``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from lawa_suite import registry
from lawa_suite.averagers.base import (Averager, ReplayTrack, StoredAverage, Synthesis, accumulator_copy,
                                       follow_devices, is_count, staged_like)
from lawa_suite.averagers.ema import ema_update_
from lawa_suite.config import require

__all__ = ["PowerEMA", "sigma_to_gamma", "gamma_to_sigma", "power_beta", "profile_inner", "synthesis_coefficients",
           "SIGMA_REL_MAX", "STORED_FORMAT", "MAX_PROFILE_ERROR"]

SIGMA_REL_MAX = 1 / math.sqrt(12)  # the uniform average over [0, T]: no power profile is wider
STORED_FORMAT = "lawa-suite-phema/1"
# The largest relative L2 distance between a reconstructed profile and the requested one that post-hoc synthesis
# accepts. With EDM2's two tracks (0.05, 0.10) stored 16 times a run it is about 0.04 at sigma_rel 0.03, 0.02 at
# 0.20 and 0.08 at 0.25; 8 stores give 0.10 at 0.03. Narrower or wider requests need more, or other, tracks.
MAX_PROFILE_ERROR = 0.10


def sigma_to_gamma(sigma_rel: float) -> float:
    """The exponent of the power profile whose relative standard deviation is ``sigma_rel`` (EDM2 Algorithm 2)."""
    s = sigma_rel ** -2
    return float(np.roots([1.0, 7.0, 16.0 - s, 12.0 - s]).real.max())


def gamma_to_sigma(gamma: float) -> float:
    """The relative standard deviation of the profile ``t ** gamma`` on [0, 1] (EDM2 Eq. 123)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_beta(gamma: float, t: int, dt: int) -> float:
    """EDM2 Eq. 127: the weight the average keeps at an update at step ``t``, ``dt`` steps after the previous one."""
    return (1.0 - dt / t) ** (gamma + 1.0)


def profile_inner(t_a: np.ndarray, g_a: np.ndarray, t_b: np.ndarray, g_b: np.ndarray) -> np.ndarray:
    """The inner product of the power profiles ``(g+1) t^g / T^(g+1)`` on [0, T] ending at ``t_a`` and ``t_b``:
    ``(g_a+1)(g_b+1) / (g_a+g_b+1) * m^(g_a+g_b+1) / (t_a^(g_a+1) t_b^(g_b+1))`` with m = min(t_a, t_b), written
    with ratios so large exponents do not overflow (EDM2 Eq. 151)."""
    m = np.minimum(t_a, t_b)
    return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * (m / t_a) ** (g_a + 1) * (m / t_b) ** (g_b + 1) / m


def synthesis_coefficients(steps: list[int], gammas: list[float], step: int,
                           gamma: float) -> tuple[np.ndarray, float]:
    """EDM2's post-hoc reconstruction (Algorithm 3): the least-squares combination of the stored profiles
    (``steps[i]``, ``gammas[i]``) closest to the profile ending at ``step`` with exponent ``gamma``, normalised to sum
    to 1; and the relative L2 distance between the two profiles."""
    t, g = np.asarray(steps, dtype=np.float64), np.asarray(gammas, dtype=np.float64)
    gram = profile_inner(t[:, None], g[:, None], t[None, :], g[None, :])
    target = profile_inner(t, g, np.float64(step), np.float64(gamma))
    x = np.linalg.lstsq(gram, target, rcond=None)[0]  # lstsq: two tracks may store the same profile
    x = x / x.sum()
    own = float(profile_inner(np.float64(step), np.float64(gamma), np.float64(step), np.float64(gamma)))
    error = float(x @ gram @ x - 2 * x @ target + own)
    return x, math.sqrt(max(error, 0.0) / own)


def _sigma_list(value: Any) -> list[float]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


@registry.averagers.register("phema")
class PowerEMA(Averager):
    """EDM2's power-function EMA, one track per ``sigma_rel``; the first track is the average."""

    name = "phema"
    elementwise = True

    @dataclass
    class Config:
        # relative standard deviations of the tracks' profiles, each in (0, 0.289); the first is the average
        sigma_rel: list[float] = field(default_factory=lambda: [0.10])
        every: int = 1           # update on every `every`-th step (beta accounts for the steps in between)
        # store every track's average each `snapshot_every` steps (a multiple of `every`) for post-hoc
        # reconstruction of other sigma_rel; 0 = never. Where they are kept does not change the average.
        snapshot_every: int = field(default=0, metadata={"affects_average": False})
        # post hoc: refuse a reconstruction whose profile is further than this from the requested one (relative L2)
        max_error: float = field(default=MAX_PROFILE_ERROR, metadata={"affects_average": False})

        def __post_init__(self) -> None:
            values = _sigma_list(self.sigma_rel)
            ok = bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                      and 0.0 < v < SIGMA_REL_MAX for v in values)
            require(ok and len(set(values)) == len(values), "sigma_rel",
                    f"distinct numbers in (0, {SIGMA_REL_MAX:.3f}) (1/sqrt(12) is the uniform average)",
                    self.sigma_rel)
            self.sigma_rel = [float(v) for v in values]
            require(is_count(self.every, 1), "every", "an integer >= 1", self.every)
            require(isinstance(self.max_error, (int, float)) and self.max_error > 0, "max_error", "a number > 0",
                    self.max_error)
            require(is_count(self.snapshot_every, 0) and self.snapshot_every % self.every == 0, "snapshot_every",
                    f"0 (never) or a multiple of every={self.every}", self.snapshot_every)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gammas = [sigma_to_gamma(s) for s in self.config.sigma_rel]
        self._tracks: list[list[Tensor]] = []  # per track: float accumulators in layout order
        self._updated = 0                      # step of the last update (0: none yet)

    @property
    def ready(self) -> bool:
        return bool(self._tracks)

    def wants(self, step: int) -> bool:
        return step % self.config.every == 0

    def _update(self, step: int, floats: list[Tensor]) -> None:
        dt = step - self._updated
        self._updated = step
        if not self._tracks:  # beta is 0 at the first update (dt == t): every track copies
            self._tracks = [accumulator_copy(floats) for _ in self.gammas]
            return
        for i, gamma in enumerate(self.gammas):
            self._tracks[i] = follow_devices(self._tracks[i], floats)
            ema_update_(self._tracks[i], staged_like(floats, self._tracks[i], self._staging),
                        1.0 - power_beta(gamma, step, dt))

    def stored_averages(self, step: int) -> list[StoredAverage]:
        every = self.config.snapshot_every
        if not (every and step % every == 0 and self._updated == step and self.layout is not None):
            return []
        stored = []
        for sigma, gamma, track in zip(self.config.sigma_rel, self.gammas, self._tracks):
            metadata = {"format": STORED_FORMAT, "step": str(step), "sigma_rel": repr(sigma), "gamma": repr(gamma),
                        "every": str(self.config.every)}
            stored.append(StoredAverage(f"step-{step:08d}-sigma-{sigma:.4f}", self._full(track), metadata))
        return stored

    def _full(self, floats: list[Tensor]) -> dict[str, Tensor]:
        """The track by name: floats as accumulated (float32: a reconstruction's coefficients can be large and of both
        signs, so the model's bf16 would not do), the newest non-float tensors, and aliases under both names."""
        assert self.layout is not None
        values = dict(zip(self.layout.float_names, floats)) | dict(zip(self.layout.other_names, self._others))
        for alias, source in self.layout.aliases:
            values[alias] = values[source]
        return {n: values[n] for n in self.layout.names if n in values}

    # -- post hoc from stored averages: EDM2's reconstruction of any sigma_rel ------------------------------------
    stored_format = STORED_FORMAT

    @classmethod
    def plan_synthesis(cls, config: Any, stored: list[Mapping[str, str]],
                       targets: list[int]) -> tuple[list[Synthesis], list[str]]:
        """At each target step, the combination of the averages stored at or before it that best gives the profile of
        ``sigma_rel`` (the first value); refused where a target has no stored average or the profile error exceeds
        ``max_error``."""
        sigma = config.sigma_rel[0]
        gamma = sigma_to_gamma(sigma)
        steps = [int(m["step"]) for m in stored]
        gammas = [float(m["gamma"]) for m in stored]
        have = sorted(set(steps))
        plans, problems = [], []
        for target in targets:
            if target not in have:
                problems.append(f"step {target} has no stored average (stored at steps {_spans(have)})")
                continue
            used = [i for i, s in enumerate(steps) if s <= target]
            x, error = synthesis_coefficients([steps[i] for i in used], [gammas[i] for i in used], target, gamma)
            if error > config.max_error:
                tracks = sorted({round(gamma_to_sigma(g), 4) for g in gammas})
                problems.append(f"sigma_rel={sigma} at step {target}: the {len(used)} stored averages (tracks "
                                f"sigma_rel {', '.join(map(str, tracks))}) reconstruct its profile with relative "
                                f"error {error:.3f} > max_error={config.max_error}; store more often "
                                f"(snapshot_every) or a track nearer {sigma}")
                continue
            coefficients = [0.0] * len(stored)
            for i, c in zip(used, x):
                coefficients[i] = float(c)
            plans.append(Synthesis(target, coefficients, {"sigma_rel": sigma, "gamma": gamma,
                                                          "profile_error": error}))
        return plans, problems

    # -- post hoc over saved raw checkpoints: the profile is in steps, as online ----------------------------
    posthoc_clock = "steps"

    @classmethod
    def plan_replay(cls, config: Any, steps: list[int],
                    targets: list[int] | None) -> tuple[list[ReplayTrack], list[str]]:
        """One replay on the steps themselves: ``dt`` is the gap between saved steps, so the output is EDM2's EMA
        with an update at each saved step (exact where checkpoints are ``every`` apart)."""
        return [ReplayTrack(list(steps), steps[-1], list(targets) if targets is not None else [steps[-1]])], []

    @classmethod
    def span_hint(cls, config: Any) -> str:
        sigma = config.sigma_rel[0]
        return (f"phema.sigma_rel={sigma} weighs step t in proportion to t^{sigma_to_gamma(sigma):.2f} over the whole "
                f"run: with few checkpoints most of the weight falls on the newest")

    @classmethod
    def documented_profile(cls, config: Any, total: int) -> list[float] | None:
        """EDM2's profile ``(gamma + 1) t^gamma / T^(gamma + 1)`` on [0, T] (T the last update), integrated over
        the steps each update stands for: update ``t_i`` gets ``(t_i^(gamma+1) - t_(i-1)^(gamma+1)) / T^(gamma+1)``
        (the product of Eq. 127's betas telescopes to exactly this)."""
        gamma = sigma_to_gamma(config.sigma_rel[0])
        last = total - total % config.every
        weights, previous = [0.0] * total, 0
        for t in range(config.every, last + 1, config.every):
            weights[t - 1] = ((t / last) ** (gamma + 1)) - ((previous / last) ** (gamma + 1))
            previous = t
        return weights

    def _averaged_floats(self) -> list[Tensor]:
        return [a.clone() for a in self._tracks[0]]

    def _average_view(self) -> list[Tensor]:
        return list(self._tracks[0])  # the first track's accumulators are the average

    def _extra_state(self) -> dict[str, Any]:
        return {"tracks": [list(track) for track in self._tracks], "updated": self._updated}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._tracks = [[t.detach().clone() for t in track] for track in state["tracks"]]
        self._updated = int(state["updated"])


def _spans(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) if len(steps) <= 6 else f"{steps[0]}, {steps[1]}, ..., {steps[-1]}"
