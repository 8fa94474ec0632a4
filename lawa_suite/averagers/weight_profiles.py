"""Averager profiles: the weight an averager's output gives each step of the run, read off the class itself.

Every averager here is linear in the weights it observes, so feeding it a trajectory of one-hot vectors (step ``s``
observes the unit vector ``e_s``) makes its average the vector of weights it gives each step, computed by its own
update code: exact, whatever the method (plugins included). Above ``EXACT_LIMIT`` steps, step ``s`` observes the
unit vector of its bin instead, which gives each bin's total weight, still exactly. From the weights: their sum
(1 for an average), the centre of mass and the relative standard deviation on ``t / T``, EDM2's ``sigma_rel``.
``suite profile`` draws them side by side (``draw``), each panel on a log scale where a linear one would hide much of
its weight in bars too short to see (EMA's first step holds decay**T of it, a spike above the rest).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lawa_suite.averagers.base import Averager
from lawa_suite.errors import ConfigError
from lawa_suite.plotting import figure, save

__all__ = ["EXACT_LIMIT", "MAX_STEPS", "Profile", "profile", "draw"]

MAX_STEPS = 100_000  # a profile observes every step (~20 us each, per averager): 100,000 steps take seconds

EXACT_LIMIT = 4096  # up to this many steps, one coordinate per step; above, DEFAULT_BINS bins
DEFAULT_BINS = 512


@dataclass
class Profile:
    """The weights an averager's output after ``total`` steps gives the run: per step, or per bin of steps."""
    label: str
    total: int
    weights: np.ndarray        # per step 1..total, or per bin
    binned: bool

    @property
    def positions(self) -> np.ndarray:
        """Where each coordinate lies on t/T: the step itself, or the middle of its bin."""
        n = len(self.weights)
        if self.binned:
            return (np.arange(n) + 0.5) / n
        return np.arange(1, n + 1) / self.total

    @property
    def total_weight(self) -> float:
        return float(self.weights.sum())

    @property
    def centre(self) -> float:
        return float((self.weights * self.positions).sum() / self.weights.sum())

    @property
    def extrapolates(self) -> bool:
        """Some step has a negative weight (BEMA's theta_0): the output lies outside the weights' convex hull."""
        return bool((self.weights < -1e-15).any())

    @property
    def sigma_rel(self) -> float:
        """The profile's standard deviation on t/T (EDM2's sigma_rel); 0 for a single step, NaN where weights are
        negative (no distribution to measure)."""
        if self.extrapolates:
            return math.nan
        c = self.centre
        var = float((self.weights * (self.positions - c) ** 2).sum() / self.weights.sum())
        return math.sqrt(max(var, 0.0))

    def summary(self) -> str:
        spread = ("negative weights (an extrapolation)" if self.extrapolates else f"sigma_rel {self.sigma_rel:.4f}")
        return (f"{self.label}: weights sum to {self.total_weight:.6f}, centre {self.centre:.3f} T, {spread}"
                + (f" ({len(self.weights)} bins)" if self.binned else ""))


def profile(cls: type[Averager], config: Mapping[str, Any], total: int, bins: int | None = None,
            label: str = "") -> Profile | None:
    """The profile of ``cls(**config)`` after observing every step ``1..total``; None if it is not ready by then.
    ``bins``: coordinates (default: one per step up to ``EXACT_LIMIT`` steps, else ``DEFAULT_BINS``)."""
    if not 1 <= total <= MAX_STEPS:
        raise ConfigError(f"steps: expected an integer in 1..{MAX_STEPS}, got {total}")
    if bins is None:
        bins = total if total <= EXACT_LIMIT else DEFAULT_BINS
    bins = min(bins, total)
    averager = cls(**config)
    averager.start_run(total)
    for step in range(1, total + 1):
        if not averager.wants(step):
            continue
        one_hot = torch.zeros(bins, dtype=torch.float64)  # float64: the weights, not their rounding
        one_hot[(step - 1) * bins // total] = 1.0
        averager.observe(step, {"w": one_hot}, checked=True)
    average = averager.average()
    if average is None:
        return None
    return Profile(label or cls.name, total, average["w"].numpy().copy(), bins != total)


def draw(profiles: Sequence[Profile], path: Path, title: str = "") -> Path:
    """One PNG: a panel per profile, its weight per unit of t/T (bars), with its centre and sigma_rel."""
    cols = min(3, len(profiles))
    rows = -(-len(profiles) // cols)
    fig, axes = figure(rows, cols, (4.2 * cols, 2.8 * rows))
    for ax, p in zip(axes.flat, profiles):
        shown = _display_bins(p, 200)
        width = 1.0 / len(shown)
        density = shown / width
        ax.bar((np.arange(len(shown)) + 0.5) * width, density, width=width,
               color=np.where(density >= 0, "tab:blue", "tab:red"))
        scale = _scale(density)
        if scale == "log":
            positive = density[density > 0]
            ax.set_yscale("log")
            ax.set_ylim(max(positive.min(), positive.max() * 1e-6) / 2, positive.max() * 2)
        elif scale == "symlog":
            ax.set_yscale("symlog", linthresh=np.abs(density).max() * 1e-3)
        if scale != "linear":
            ax.set_ylabel(f"weight per unit t/T ({scale} scale)", fontsize=8)
        ax.axvline(p.centre, color="black", lw=0.8, ls="--")
        spread = "negative weights" if p.extrapolates else f"sigma_rel {p.sigma_rel:.3f}"
        ax.set_title(f"{p.label}\ncentre {p.centre:.2f} T, {spread}, sum {p.total_weight:.3f}", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_xlabel("t / T", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(profiles):]:
        ax.axis("off")
    if not axes[0][0].get_ylabel():
        axes[0][0].set_ylabel("weight per unit t/T", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    save(fig, path, dpi=110)
    return path


def _scale(density: np.ndarray, short: float = 0.02, hidden: float = 0.05) -> str:
    """"linear", or "log" ("symlog" with negative weights) when bars drawn shorter than ``short`` of the tallest
    carry more than ``hidden`` of the weight: on a linear scale that weight would not show."""
    size = np.abs(density)
    tallest = size.max() if len(size) else 0.0
    if tallest == 0:
        return "linear"
    unseen = size[(size > 0) & (size < short * tallest)].sum()
    if unseen <= hidden * size.sum():
        return "linear"
    return "symlog" if (density < 0).any() else "log"


def _display_bins(p: Profile, at_most: int) -> np.ndarray:
    """The weights summed into at most ``at_most`` equal bins of t/T, for drawing."""
    n = len(p.weights)
    if n <= at_most:
        return p.weights
    index = np.arange(n) * at_most // n
    return np.bincount(index, weights=p.weights, minlength=at_most)
