"""A run's curves as read from its ``metrics.jsonl``, and what a metric's values mean (which way is better, which
is the headline): the types and small helpers every report module shares."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from lawa_suite.report.meaning import METRICS, NOTES
from lawa_suite.rundir import read_metrics, read_metrics_meta

__all__ = ["Curves", "SIZE_KEYS", "load_metrics", "metric_directions", "metric_notes", "ordered", "direction_of",
           "better", "first_reaching", "best_point", "fmt"]

Curves = dict[str, dict[str, list[tuple[int, float]]]]  # weights -> metric -> [(step, value)]

# what an evaluation rests on (how many images, windows, tokens it scored), when a record says so: not a metric
SIZE_KEYS = ("images", "examples", "windows", "tokens")


def load_metrics(path: Path) -> tuple[Curves, list[tuple[int, float]]]:
    """Validation curves per weights and metric, and the training-loss curve, from ``metrics.jsonl``. Where the run
    recorded its metrics (``metrics-meta.json``), only those are curves: an evaluator's other numbers beside them
    (FID's ``fid_samples``) are facts about a score, not scores."""
    curves: Curves = defaultdict(lambda: defaultdict(list))
    train: list[tuple[int, float]] = []
    meta = read_metrics_meta(Path(path).parent)
    kept = set(meta["metrics"]) if meta else None
    for record in read_metrics(Path(path)):  # a cut-short last line is skipped with a warning; others are errors
        step, split, weights = record["step"], record.get("split"), record.get("weights", "raw")
        if split == "train":
            if record.get("loss") is not None:
                train.append((step, record["loss"]))
            continue
        for key, value in record.items():
            if key not in ("step", "split", "weights") and isinstance(value, (int, float)) \
                    and (kept is None or key in kept):
                curves[weights][key].append((step, float(value)))
    return curves, train


def metric_directions(task: str, run: Path | None = None) -> dict[str, str]:
    """``metric -> "max"|"min"`` of the evaluator, the headline first: as the run folder ``run`` recorded them
    (``metrics-meta.json``), else the built-in task's; empty for a task the report does not know and a run that
    recorded none (a plugin's, from before runs recorded them): its metrics are then taken in the order its
    records give them (``direction_of``)."""
    meta = read_metrics_meta(run) if run is not None else None
    return dict(meta["metrics"]) if meta else dict(METRICS.get(task, {}))


def metric_notes(task: str, metrics: list[str], run: Path | None = None) -> list[str]:
    """The sentence for each of ``metrics`` whose name alone could mislead (the run's own notes first)."""
    meta = read_metrics_meta(run) if run is not None else None
    notes = {**NOTES, **(meta["notes"] if meta else {})}
    return [f"`{m}`: {notes[m]}." for m in metrics if m in notes]


def ordered(curves: Iterable[str]) -> list[str]:
    """Weights names, raw first, then averagers alphabetically."""
    return sorted(curves, key=lambda w: (w != "raw", w))


def direction_of(metric: str, directions: dict[str, str]) -> str:
    """``"max"`` or ``"min"``: the evaluator's word, else a guess from the metric's name."""
    if metric in directions:
        return directions[metric]
    return "max" if any(word in metric for word in ("acc", "top", "score")) else "min"


def better(direction: str, a: float, b: float) -> bool:
    """Whether ``a`` is strictly better than ``b``."""
    return a > b if direction == "max" else a < b


def first_reaching(points: Iterable[tuple[int, float]], target: float, direction: str) -> int | None:
    """The first step whose value is ``target`` or better, or None."""
    for step, value in points:
        if value == target or better(direction, value, target):
            return step
    return None


def best_point(points: Iterable[tuple[int, float]], direction: str) -> tuple[float, int]:
    """The best value and its step; ties go to the earliest step."""
    best_step, best = None, None
    for step, value in points:
        if best is None or better(direction, value, best):
            best_step, best = step, value
    return best, best_step


def fmt(value: float) -> str:
    """A table cell's number: four decimals, one for large values (FID in the hundreds)."""
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
