"""Claim (g), from "When, Where and Why to Average Weights?" (Ajroldi et al., ICML 2025) and WSM: can averaging
replace learning-rate decay? A run with a constant (or WSD) schedule and averagers watching it is set against the
cosine run of the same task, lr and seed: each averager of the constant run is judged by the steps it needs to reach
the cosine run's raw smoothed final value, as a fraction of the steps the cosine run's raw weights needed
(crossings interpolated, ``targets.py``), and by its final value against the cosine run's raw final; both paired by
seed and summarised with 95% intervals.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from lawa_suite.report.curves import direction_of, metric_directions, metric_names
from lawa_suite.report.paired import gain, t_interval
from lawa_suite.report.records import RunRecord, Verdict, experiment_key
from lawa_suite.report.targets import saved_fraction

__all__ = ["SCHEDULE_KEYS", "matching_key", "headline_of", "claim_g"]

# what may differ between a run and its cosine reference: the schedule and its own keys
SCHEDULE_KEYS = {"schedule", "decay_fraction", "decay_shape", "min_lr"}


def matching_key(run: RunRecord, ignored: Callable[[str], bool] = lambda key: False) -> str:
    """What must match between runs set against each other: the experiment's keys but the schedule's and
    ``ignored`` ones, as one comparable string."""
    return repr(sorted((k, repr(v)) for k, v in experiment_key(run).items()
                       if k not in SCHEDULE_KEYS and not ignored(k)))


def _pairs(runs: Sequence[RunRecord]) -> dict[tuple[str, float, str], list[tuple[RunRecord, RunRecord]]]:
    """(task, lr, schedule) -> [(run, the cosine run it is set against)], one pair per seed."""
    cosine = {(matching_key(r), r.lr, r.seed): r for r in runs if r.config.get("schedule") == "cosine"}
    found: dict[tuple[str, float, str], list[tuple[RunRecord, RunRecord]]] = defaultdict(list)
    for run in runs:
        schedule = run.config.get("schedule")
        reference = cosine.get((matching_key(run), run.lr, run.seed))
        if schedule not in (None, "cosine") and reference is not None:
            label = schedule if schedule != "wsd" else f"wsd ({run.config.get('decay_shape')}, last " \
                                                       f"{float(run.config.get('decay_fraction', 0)):.0%})"
            found[(run.task, run.lr, label)].append((run, reference))
    return found


def headline_of(run: RunRecord, directions: Mapping[str, str]) -> str:
    """The first of the evaluator's metrics the run recorded (a reference scored by ``fid_standin`` has no ``fid``),
    else the first metric it recorded."""
    recorded = metric_names(run.curves.get("raw", {}), directions)  # a size (FID's sample count) is no metric
    return next((m for m in directions if m in recorded), None) or recorded[0]


def claim_g(runs: Sequence[RunRecord], labels: Mapping[Path, str] | None = None) -> list[Verdict]:
    """``labels``: run folder -> its experiment's label in the report (the row of the verdict matrix); the task's
    name when absent."""
    verdicts = []
    for (task, lr, schedule), pairs in sorted(_pairs(runs).items()):
        directions = metric_directions(task, pairs[0][1].path)
        metric = headline_of(pairs[0][1], directions)
        direction = direction_of(metric, directions)
        names = sorted({w for run, _ in pairs for w in run.curves if w != "raw"})
        for name in ["raw", *names]:
            saved, finals, never = [], [], 0
            for run, reference in pairs:
                target_raw = reference.curves.get("raw", {}).get(metric)
                mine = run.curves.get(name, {}).get(metric)
                if not target_raw or not mine:
                    continue
                found = saved_fraction(target_raw, mine, run.steps, direction)
                if found is None:
                    continue
                saved.append(found[0])
                never += found[1]
                finals.append(gain(direction, target_raw[-1][1], mine[-1][1]))
            steps, final = t_interval(saved), t_interval(finals)
            if steps is None or final is None:
                continue
            note = f", never reached in {never} seed(s) (counted as needing the whole run)" if never else ""
            row = f"{(labels or {}).get(pairs[0][0].path, task)} lr={lr:g}"
            verdicts.append(Verdict("g", f"{task} lr={lr:g}, {schedule} run's {name}", steps.verdict,
                                    f"steps saved to reach the cosine run's raw smoothed final {metric}, as a fraction "
                                    f"of that run's own: {steps.text('{:+.0%}')}{note}; final {metric} against the "
                                    f"cosine run's raw final: {final.text()} ({final.verdict})",
                                    row=row, entry=name, summary=f"{steps.text('{:+.0%}')} steps",
                                    metric=metric))
    return verdicts
