"""The report's record types: one run folder read back (``RunRecord``), a seed-mean curve (``Band``), one (task, lr)
cell of a bench (``LrSummary``), a claim's verdict (``Verdict``), and what a run computed (``experiment_key``).
Every other report module builds on these; this one builds on no other report module but the curves' types."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lawa_suite.report.curves import Curves, load_metrics
from lawa_suite.report.meaning import with_added_keys
from lawa_suite.rundir import CONFIG_FILE, METRICS_FILE, dotted, read_saved

__all__ = ["RunRecord", "read_run", "Band", "LrSummary", "Verdict", "NOT_THE_EXPERIMENT", "experiment_key"]


@dataclass
class RunRecord:
    """One run folder, read back: its identity from config.yaml, its curves from metrics.jsonl."""
    path: Path
    task: str
    preset: str
    lr: float
    seed: int
    steps: int
    config: dict[str, Any]
    curves: Curves
    train: list[tuple[int, float]]

    @property
    def last_step(self) -> int:
        return max((p[-1][0] for c in self.curves.values() for p in c.values() if p), default=0)


def read_run(path: Path) -> RunRecord:
    config = read_saved(path / CONFIG_FILE)
    curves, train = load_metrics(path / METRICS_FILE)
    return RunRecord(path, config["task"], config.get("preset", ""), float(config["lr"]), int(config["seed"]),
                     int(config["steps"]), config, curves, train)


@dataclass
class Band:
    """A seed-mean curve with its min-max band, over the steps every seed evaluated."""
    steps: list[int]
    mean: list[float]
    low: list[float]
    high: list[float]
    seeds: int

    def at(self, step: int) -> float | None:
        return self.mean[self.steps.index(step)] if step in self.steps else None

    @property
    def points(self) -> list[tuple[int, float]]:
        """(step, seed-mean value) pairs."""
        return list(zip(self.steps, self.mean))


@dataclass
class LrSummary:
    """One (task, lr) cell of the report: per weights, the seed-mean band and its numbers."""
    lr: float
    runs: list[RunRecord]
    bands: dict[str, Band]
    headline: str
    direction: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return self.runs[0].steps


@dataclass
class Verdict:
    """One claim judged at one place. The optional fields place it in the report's verdict matrix: ``row`` (the
    experiment and lr), ``column`` (the claim, with its phase where a claim is judged by phase), ``entry`` (which
    averager or comparison, when a cell holds several), ``summary`` (the gain and interval behind it, short) and
    ``metric`` (the metric that carried it)."""
    claim: str
    where: str
    outcome: str           # held | did not hold | inconclusive
    evidence: str
    row: str = ""
    entry: str = ""
    phase: str = ""
    summary: str = ""
    metric: str = ""

    @property
    def column(self) -> str:
        return f"({self.claim}) {self.phase}".strip()


# Keys in which true replicates may differ: where the run lives and how it was watched, not what it computed.
# The seed is what replicates are; lr is the report's own axis.
NOT_THE_EXPERIMENT = {"seed", "lr", "out", "progress", "trackers", "resume", "reset_averagers", "data.cache",
                      "checkpoint.every", "checkpoint.keep"}


def experiment_key(run: RunRecord) -> dict[str, Any]:
    """What a run computed, from its saved config (dotted keys): two runs are seeds of one experiment only if these
    are equal. A key added to the suite after a run was made (``compile``, ``distributed``) counts at the value that
    run computed with (``meaning.ADDED_KEYS``), so a reference run over several versions stays one experiment, and
    the grouping depends on the run folders alone, not on the installed suite."""
    return {k: v for k, v in with_added_keys(run.task, dotted(run.config)).items() if k not in NOT_THE_EXPERIMENT}
