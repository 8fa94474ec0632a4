"""Paired statistics: an averager's gain over raw is a difference within one run (one trajectory, the same
held-out batches), so it is computed per seed first and only then summarised over seeds, with a 95% Student-t
interval. Between-seed spread of the absolute metric (the min-max bands) mostly measures how seeds differ;
the paired gain's interval measures whether averaging helped.

A gain is stated as **held** when its whole interval lies above zero, **did not hold** when it lies below, and
**inconclusive** when it spans zero, or when there is no spread to judge by: a single seed, or seeds that all gave
the same value (a model at chance scores the same in every seed; a zero-width interval then says nothing about
how seeds vary). Phases follow the papers: early (the first 25% of the steps), mid (25-75%), late (the last 25%),
and the final evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lawa_suite.report.records import RunRecord

__all__ = ["PHASES", "EARLY_MID", "Interval", "combined", "t_interval", "gain", "phase_gains", "final_gains",
           "phase_table", "INTERVAL_NOTE"]

PHASES = {"early": (0.0, 0.25), "mid": (0.25, 0.75), "late": (0.75, 1.0)}
EARLY_MID = (0.0, 0.75)
INTERVAL_NOTE = ("Gains are paired within each run (averaged weights minus raw weights of the same run, positive = "
                 "better), then summarised over seeds: mean [95% Student-t interval]. Held: the interval lies above "
                 "zero; did not hold: below; inconclusive: it spans zero, or one seed (or seeds that all gave the same "
                 "value) gives no interval.")


@dataclass(frozen=True)
class Interval:
    """A mean over seeds with its 95% t-interval (``low == high == mean`` for one seed: no interval)."""
    mean: float
    low: float
    high: float
    n: int

    @property
    def spread(self) -> bool:
        """Whether the seeds differ: n identical values give a zero-width interval that measures nothing (the
        tolerance absorbs the rounding of equal gains computed from different raw values)."""
        return self.n >= 2 and not math.isclose(self.low, self.high, rel_tol=1e-9, abs_tol=1e-12)

    @property
    def verdict(self) -> str:
        if self.spread and self.low > 0:
            return "held"
        if self.spread and self.high < 0:
            return "did not hold"
        return "inconclusive"

    def text(self, fmt: str = "{:+.4f}") -> str:
        if self.n < 2:
            return f"{fmt.format(self.mean)} (1 seed, no interval)"
        return f"{fmt.format(self.mean)} [{fmt.format(self.low)}, {fmt.format(self.high)}] over {self.n} seeds"


def combined(verdicts: Sequence[str]) -> str:
    """Several verdicts as one: did not hold if any did not, held if all held, else inconclusive."""
    if "did not hold" in verdicts:
        return "did not hold"
    return "held" if verdicts and all(v == "held" for v in verdicts) else "inconclusive"


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval | None:
    """Mean and Student-t interval of ``values`` (one per seed); None for no values."""
    n = len(values)
    if n == 0:
        return None
    mean = sum(values) / n
    if n == 1:
        return Interval(mean, mean, mean, 1)
    from scipy import stats  # scikit-learn's dependency, so always installed with the suite

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def gain(direction: str, raw: float, other: float) -> float:
    """How much better ``other`` is than ``raw`` (positive = better), in the metric's units."""
    return other - raw if direction == "max" else raw - other


def _paired(run: RunRecord, a: str, b: str, metric: str) -> list[tuple[int, float, float]]:
    """``(step, a's value, b's value)`` at the evaluations of ``run`` where both weights were scored."""
    first, second = (dict(run.curves.get(w, {}).get(metric, [])) for w in (a, b))
    return [(s, first[s], second[s]) for s in sorted(set(first) & set(second))]


def phase_gains(runs: Sequence[RunRecord], baseline: str, weights_name: str, metric: str, direction: str,
                lo: float, hi: float) -> list[float]:
    """Per run (seed): the mean gain of ``weights_name`` over ``baseline`` across its evaluations in the phase
    ``(lo, hi]`` of the run (fractions of its steps). Runs without such evaluations give nothing."""
    found = []
    for run in runs:
        gains = [gain(direction, x, y) for s, x, y in _paired(run, baseline, weights_name, metric)
                 if lo * run.steps < s <= hi * run.steps]
        if gains:
            found.append(sum(gains) / len(gains))
    return found


def final_gains(runs: Sequence[RunRecord], baseline: str, weights_name: str, metric: str,
                direction: str) -> list[float]:
    """Per run: the gain of ``weights_name`` over ``baseline`` at the run's final evaluation."""
    found = []
    for run in runs:
        pairs = _paired(run, baseline, weights_name, metric)
        if pairs and pairs[-1][0] == run.steps:
            found.append(gain(direction, pairs[-1][1], pairs[-1][2]))
    return found


def phase_table(runs: Sequence[RunRecord], names: Sequence[str], metric: str, direction: str,
                fmt: Callable[[Interval], str] | None = None) -> str:
    """Markdown: per averager, its paired gain over raw in each phase and at the end, with the verdict."""
    show = fmt or (lambda interval: f"{interval.text()}: {interval.verdict}")
    header = [f"gain over raw in {metric}", *(f"{p} ({lo:.0%}-{hi:.0%})" for p, (lo, hi) in PHASES.items()), "final"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        cells = [name]
        for lo, hi in PHASES.values():
            interval = t_interval(phase_gains(runs, "raw", name, metric, direction, lo, hi))
            if interval:
                cells.append(show(interval))
            elif phase_gains(runs, "raw", "raw", metric, direction, lo, hi):  # raw was scored in this phase
                cells.append("not ready yet")
            else:
                cells.append("no evaluation in this phase")
        interval = t_interval(final_gains(runs, "raw", name, metric, direction))
        cells.append(show(interval) if interval else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
