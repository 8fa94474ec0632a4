"""Steps to target, AlgoPerf style (Ajroldi et al., ICML 2025, who report LAWA and EMA reaching the target in about
78% of the baseline's steps): within each run, targets from raw's own curve (its smoothed final value, the mean of
its last ``SMOOTH`` evaluations, and its best value), the first crossing of each weights' curve interpolated
linearly between the evaluations around it, and the steps saved as a fraction of raw's own crossing of the same
target. Summarised over seeds with the 95% t-interval of ``paired.py``: held when the whole interval saves steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lawa_suite.report.paired import Interval, t_interval

if TYPE_CHECKING:
    from lawa_suite.report.records import RunRecord

__all__ = ["SMOOTH", "TARGETS", "crossing", "run_targets", "saved_fraction", "saved_fractions", "steps_table"]

SMOOTH = 3   # evaluations in raw's smoothed final value: a single noisy final raw value flatters the averages
TARGETS = {"final": "raw's smoothed final", "best": "raw's best"}


def _reached(value: float, target: float, direction: str) -> bool:
    return value >= target if direction == "max" else value <= target


def crossing(points: Sequence[tuple[int, float]], target: float, direction: str) -> float | None:
    """The step at which the curve first reaches ``target``, interpolated linearly between the evaluation before
    and the first that reaches it (the first evaluation itself if it already does); None if it never does."""
    for i, (step, value) in enumerate(points):
        if _reached(value, target, direction):
            if i == 0 or value == points[i - 1][1]:
                return float(step)
            before_step, before = points[i - 1]
            return before_step + (target - before) / (value - before) * (step - before_step)
    return None


def run_targets(raw: Sequence[tuple[int, float]], direction: str) -> dict[str, float]:
    """The two targets of one run, from its raw curve."""
    tail = [v for _, v in raw[-SMOOTH:]]
    values = [v for _, v in raw]
    return {"final": sum(tail) / len(tail), "best": max(values) if direction == "max" else min(values)}


def saved_fraction(reference: Sequence[tuple[int, float]], curve: Sequence[tuple[int, float]], steps: int,
                   direction: str, kind: str = "final") -> tuple[float, bool] | None:
    """``(1 - steps curve needed / steps reference needed, whether curve never got there)`` to reach the
    ``kind`` target of the ``reference`` (raw) curve; a curve that never reaches it counts as needing the whole
    run (``steps``). None when the reference itself gives no positive step to compare with."""
    target = run_targets(reference, direction)[kind]
    reference_at, curve_at = crossing(reference, target, direction), crossing(curve, target, direction)
    if not reference_at:
        return None
    return 1.0 - (curve_at if curve_at is not None else steps) / reference_at, curve_at is None


def saved_fractions(runs: Sequence[RunRecord], name: str, metric: str, direction: str,
                    kind: str) -> tuple[list[float], int]:
    """Per run: the fraction of raw's own steps that ``name`` saved reaching raw's ``kind`` target
    (``saved_fraction``). Also: in how many runs it never did."""
    saved, never = [], 0
    for run in runs:
        raw, other = run.curves.get("raw", {}).get(metric), run.curves.get(name, {}).get(metric)
        found = saved_fraction(raw, other, run.steps, direction, kind) if raw and other else None
        if found is not None:
            saved.append(found[0])
            never += found[1]
    return saved, never


def _cell(interval: Interval | None, never: int) -> str:
    if interval is None:
        return "-"
    note = f", not reached in {never} seed(s)" if never else ""
    return f"{interval.text('{:+.0%}')}: {interval.verdict}{note}"


def steps_table(runs: Sequence[RunRecord], names: Sequence[str], metric: str, direction: str) -> str:
    """Markdown: per averager, the steps it saved against raw's own steps to each target, with intervals."""
    lines = [f"| steps saved to reach (in {metric}) | " + " | ".join(TARGETS.values()) + " |",
             "|---|" + "---|" * len(TARGETS)]
    for name in names:
        cells = []
        for kind in TARGETS:
            saved, never = saved_fractions(runs, name, metric, direction, kind)
            cells.append(_cell(t_interval(saved), never))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
