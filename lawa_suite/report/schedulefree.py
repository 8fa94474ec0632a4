"""Claim (h): averaging a constant-lr run matches schedule-free training (Defazio et al., "The Road Less Scheduled",
NeurIPS 2024), the optimizer built on the same idea as claim (g): no decay, an average inside the optimizer.

For every experiment with schedule-free runs (``<task>.optimizer: schedulefree`` in the saved config), its raw
weights (the optimizer's eval sequence, which is what the loop scores as raw) are the reference. Against them: each
averager of the constant-lr run and the raw weights of the cosine run, of the same task and settings otherwise.
Each family is taken at its own tuned lr (raw's best final value, mean over seeds: schedule-free is tuned apart, as
its authors tune it): every schedule-free lr of the bench gets a row, against the constant and cosine runs at theirs
(named when it differs). Runs of different optimizers or schedules are different runs, so they are paired by seed
(seed i against seed i: the same initialisation and data order, not the same trajectory), as claim (g) pairs them;
per seed, the gain at the final evaluation and the mean gain over the evaluations in the first 75%, then a 95%
t-interval over seeds. Held: the averaged constant run is better (interval above zero); did not hold: schedule-free
is better; inconclusive otherwise (an interval across zero does not show a match, only no difference this many seeds
can see). Beside them, as in (g), the steps each needs to reach the cosine run's raw smoothed final value, as a
fraction of the cosine run's own, and the schedule-free run's raw for the same target.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from lawa_suite.report.curves import direction_of, metric_directions
from lawa_suite.report.diffusion import carried, describe, joint_level, metrics_that_answer, number_format
from lawa_suite.report.paired import EARLY_MID, gain, t_interval
from lawa_suite.report.records import RunRecord, Verdict
from lawa_suite.report.schedules import headline_of, matching_key
from lawa_suite.report.targets import saved_fraction

__all__ = ["SCHEDULE_FREE", "optimizer_of", "claim_h", "H_PHASES"]

SCHEDULE_FREE = "schedulefree"  # the optimizer's name in a saved config (config.SCHEDULE_FREE: not imported here)
H_PHASES = {"end": None, "early-mid": EARLY_MID}

Triple = tuple[RunRecord, RunRecord | None, RunRecord | None]  # (schedule-free, constant, cosine) of one seed


def optimizer_of(run: RunRecord) -> str:
    """The run's optimizer: its task section's ``optimizer`` (where ``optimizer=`` on the command line lands)."""
    section = run.config.get(run.task)
    if isinstance(section, dict) and "optimizer" in section:
        return str(section["optimizer"])
    return str(run.config.get("optimizer", ""))


def _rest(run: RunRecord) -> str:
    """What must match between the runs set against each other: everything but the optimizer, the schedule and the
    averagers watching (their sections are named in the run's ``averager`` list)."""
    watching = {str(name) for name in run.config.get("averager") or []}
    return matching_key(run, lambda k: k in ("averager", "optimizer", f"{run.task}.optimizer")
                        or k.startswith("schedulefree.") or k.split(".")[0] in watching)


def _final_raw(run: RunRecord, metric: str) -> float | None:
    points = run.curves.get("raw", {}).get(metric, [])
    return points[-1][1] if points and points[-1][0] == run.steps else None


def _tuned_lr(by_lr: Mapping[float, list[RunRecord]]) -> float:
    """The lr whose runs' raw weights end best, mean over seeds, on the quietest metric that answers (the headline;
    a diffusion task's denoising loss): each family is compared at its own tuned lr, as a practitioner would run it.
    One lr: that one."""
    if len(by_lr) == 1:
        return next(iter(by_lr))
    first = next(iter(by_lr.values()))[0]
    directions = metric_directions(first.task, first.path)
    # the quietest metric that answers: for a diffusion task its denoising loss, not a 64-sample FID
    metric = metrics_that_answer([r for runs in by_lr.values() for r in runs], headline_of(first, directions))[-1]
    sign = -1.0 if direction_of(metric, directions) == "max" else 1.0
    scored = {}
    for lr, runs in by_lr.items():
        finals = [f for f in (_final_raw(r, metric) for r in runs) if f is not None]
        if finals:
            scored[lr] = sign * sum(finals) / len(finals)
    return min(scored, key=scored.get) if scored else min(by_lr)


def _triples(runs: Sequence[RunRecord]) -> dict[tuple[str, float, Path], list[Triple]]:
    """(task, schedule-free lr, a schedule-free run's folder's parent) -> one (schedule-free, constant, cosine) triple
    per seed; the constant and the cosine runs are each at their own tuned lr (``_tuned_lr``), not necessarily the
    schedule-free run's (schedule-free wants its own lr: Defazio et al. tune it apart)."""
    families: dict[tuple[str, str], dict[float, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        schedule = run.config.get("schedule")
        if optimizer_of(run) != SCHEDULE_FREE and schedule in ("constant", "cosine"):
            families[(_rest(run), schedule)][run.lr].append(run)
    chosen: dict[tuple[str, str, int], RunRecord] = {}
    for (rest, schedule), by_lr in families.items():
        for run in by_lr[_tuned_lr(by_lr)]:
            chosen.setdefault((rest, schedule, run.seed), run)
    found: dict[tuple[str, float, Path], list[Triple]] = defaultdict(list)
    for run in sorted((r for r in runs if optimizer_of(r) == SCHEDULE_FREE), key=lambda r: r.seed):
        constant, cosine = (chosen.get((_rest(run), schedule, run.seed)) for schedule in ("constant", "cosine"))
        if constant is not None or cosine is not None:
            found[(run.task, run.lr, run.path.parent)].append((run, constant, cosine))
    return found


def _gains(pairs: list[tuple[RunRecord, RunRecord]], name: str, metric: str, direction: str,
           window: tuple[float, float] | None) -> list[float]:
    """Per seed: ``name`` of the other run against the schedule-free run's raw, at the end or over the window."""
    found = []
    for free, other in pairs:
        reference = dict(free.curves.get("raw", {}).get(metric, []))
        mine = dict(other.curves.get(name, {}).get(metric, []))
        shared = sorted(set(reference) & set(mine))
        if window is None:
            if free.steps in shared and other.steps == free.steps:
                found.append(gain(direction, reference[free.steps], mine[free.steps]))
            continue
        inside = [s for s in shared if window[0] * free.steps < s <= window[1] * free.steps]
        if inside:
            found.append(sum(gain(direction, reference[s], mine[s]) for s in inside) / len(inside))
    return found


def _steps(triples: list[Triple], side: int, name: str, metric: str, direction: str) -> list[float]:
    """Per seed: the fraction of the cosine run's raw steps saved by ``name`` of the run at ``side`` of the triple
    (0: schedule-free, 1: constant) reaching the cosine raw's smoothed final ``metric``."""
    found = []
    for triple in triples:
        run, cosine = triple[side], triple[2]
        target = cosine.curves.get("raw", {}).get(metric) if cosine is not None else None
        mine = run.curves.get(name, {}).get(metric) if run is not None else None
        result = saved_fraction(target, mine, run.steps, direction) if target and mine else None
        if result is not None:
            found.append(result[0])
    return found


def _steps_text(triples: list[Triple], side: int, name: str, metric: str, direction: str) -> str:
    mine, free = (_steps(triples, s, n, metric, direction) for s, n in ((side, name), (0, "raw")))
    if not mine or not free:
        return ""
    differences = [a - b for a, b in zip(mine, free)] if len(mine) == len(free) else []
    text = (f"; steps saved to reach the cosine run's raw smoothed final {metric}, as a fraction of that run's own: "
            f"this one {t_interval(mine).text('{:+.0%}')}, the schedule-free raw {t_interval(free).text('{:+.0%}')}")
    return text + (f", difference {t_interval(differences).text('{:+.0%}')}" if differences else "")


def claim_h(runs: Sequence[RunRecord], labels: Mapping[Path, str] | None = None) -> list[Verdict]:
    """``labels``: run folder -> its experiment's label in the report (the row of the verdict matrix); the task's
    name when absent."""
    verdicts = []
    for (task, lr, _), triples in sorted(_triples(runs).items(), key=lambda item: (item[0][0], -item[0][1])):
        free = triples[0][0]
        row = f"{(labels or {}).get(free.path, task)} lr={lr:g}"
        directions = metric_directions(task, free.path)
        metrics = metrics_that_answer([t[0] for t in triples], headline_of(free, directions))
        constant_names = sorted({w for _, c, _ in triples if c is not None for w in c.curves if w != "raw"})
        sides = [(1, "constant", name) for name in constant_names] + [(2, "cosine", "raw")]
        for side, schedule, name in sides:
            pairs = [(t[0], t[side]) for t in triples if t[side] is not None]
            entry = f"{schedule} {name}" + (f" (lr={pairs[0][1].lr:g})" if pairs and pairs[0][1].lr != lr else "")
            # a family's lr is its tuned one, chosen on these same seeds' raw finals: a slight edge, said so
            chosen = " (its lr chosen on these seeds' raw finals)" if pairs and pairs[0][1].lr != lr else ""
            for phase, window in H_PHASES.items():
                intervals = {m: t_interval(_gains(pairs, name, m, direction_of(m, directions), window),
                                           joint_level(metrics)) for m in metrics}
                if all(i is None for i in intervals.values()):
                    continue
                outcome, by = carried(intervals)
                shown = by or metrics[-1]
                summary = intervals[shown].text(number_format(shown)) + f" ({shown})" if intervals[shown] else ""
                steps = _steps_text(triples, side, name, metrics[0], direction_of(metrics[0], directions)) \
                    if side == 1 and window is None else ""
                claim = "h" if side == 1 else "h-ref"  # the cosine raw is the reference (h) is read against
                verdicts.append(Verdict(
                    claim, f"{row}, {entry} against the schedule-free run's raw (eval sequence), {phase}", outcome,
                    f"gain over the schedule-free raw {'at the end' if window is None else 'in the first 75%'}, "
                    f"paired by seed over {len(pairs)} seed(s){chosen}: " + describe(intervals, by, {}) + steps,
                    row=row, entry=entry, phase=phase, summary=summary, metric=by))
    return verdicts
