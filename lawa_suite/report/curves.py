"""A run's curves as read from its ``metrics.jsonl``, and what a metric's values mean (which way is better, which
is the headline): the types and small helpers every report module shares."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

from lawa_suite.report.meaning import METRICS, NOTES
from lawa_suite.rundir import read_metrics, read_metrics_meta

__all__ = ["Curves", "SIZE_KEYS", "SIZE_WORDS", "load_metrics", "load_curves_and_sizes",
           "metric_names", "metric_directions", "metric_notes", "ordered", "direction_of", "better", "first_reaching",
           "best_point", "fmt"]

Curves = dict[str, dict[str, list[tuple[int, float]]]]  # weights -> metric -> [(step, value)]

# What an evaluation rests on, when a record says so (an evaluator's ``details``), and the words for it: how many
# held-out examples (``accuracy``), tokens (``perplexity``), images or windows it scored, or generated samples an FID
# is of (``fid``'s ``fid_samples``). A size, not a metric: never drawn, a table column, a gain or a claim.
SIZE_WORDS = {"fid_samples": "generated samples for FID", "examples": "held-out examples",
              "tokens": "held-out tokens", "windows": "held-out windows", "images": "held-out images"}
SIZE_KEYS = tuple(SIZE_WORDS)


def load_metrics(path: Path) -> tuple[Curves, list[tuple[int, float]]]:
    """Validation curves per weights and metric, and the training-loss curve, from ``metrics.jsonl``. Where the run
    recorded its metrics (``metrics-meta.json``), only those are curves: an evaluator's other numbers beside them
    (its sizes, ``SIZE_KEYS``: ``load_curves_and_sizes`` reads those) are facts about a score, not scores. A run
    from before runs recorded their metrics gives every number, as it always did: ``metric_names`` leaves its sizes
    out."""
    curves, train, _ = load_curves_and_sizes(path)
    return curves, train


def load_curves_and_sizes(path: Path) -> tuple[Curves, list[tuple[int, float]], Curves]:
    """``load_metrics``'s curves and training loss, and the sizes (``weights -> size key -> [(step, size)]``: what
    each evaluation rests on, where its records say; empty for runs made before evaluators recorded them), from one
    read of ``metrics.jsonl``.
    A key the run recorded as a metric (``metrics-meta.json``) is a metric even if a size shares its name."""
    curves: Curves = defaultdict(lambda: defaultdict(list))
    sizes: Curves = defaultdict(lambda: defaultdict(list))
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
            if key in ("step", "split", "weights") or not isinstance(value, (int, float)):
                continue
            if kept is None or key in kept:
                curves[weights][key].append((step, float(value)))
            if key in SIZE_WORDS and (kept is None or key not in kept):
                sizes[weights][key].append((step, float(value)))
    return curves, train, sizes


def metric_names(names: Iterable[str], directions: Mapping[str, str]) -> list[str]:
    """``names`` (keys of a run's curves) less the sizes (``SIZE_KEYS``) that are no metric: a size is one unless
    the evaluator declared a metric of that name (``directions``)."""
    return [m for m in names if m in directions or m not in SIZE_WORDS]


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
