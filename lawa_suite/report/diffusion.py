"""Claim (f): averaging improves a diffusion model (EMA is standard practice there), judged on what can answer.

FID is the claim's own metric, but an FID of a few samples is noise: the CPU reference's 64 samples through the
offline stand-in network (metric ``fid_standin``) differ by 20-40 between seeds. The same evaluations record the
held-out denoising loss (``loss``: fixed timesteps and noise, the same for every weights), a paired measurement
that does answer. So each averager is judged on both, at the end and in the first 75% of the run, and the verdict
is carried by the first metric whose interval excludes zero, FID first (the claim's own); where both are
conclusive and disagree, the evidence says so. ``metrics_that_answer`` and ``carried`` serve claim (h) too.
"""

from __future__ import annotations

from collections.abc import Sequence

from lawa_suite.report.curves import direction_of, metric_directions
from lawa_suite.report.paired import EARLY_MID, Interval, final_gains, phase_gains, t_interval
from lawa_suite.report.records import LrSummary, RunRecord, Verdict
from lawa_suite.rundir import dotted

__all__ = ["FID_METRICS", "DENOISING_LOSS", "fid_metric", "fid_note", "metrics_that_answer", "carried",
           "number_format", "claim_f", "F_PHASES"]

FID_METRICS = ("fid", "fid_standin")
DENOISING_LOSS = "loss"  # a diffusion task's held-out denoising loss (fixed timesteps and noise)
F_PHASES = {"end": None, "early-mid": EARLY_MID}


def fid_metric(runs: Sequence[RunRecord]) -> str | None:
    """The FID metric the runs recorded (``fid`` or the stand-in's ``fid_standin``), or None."""
    recorded = {m for run in runs for m in run.curves.get("raw", {})}
    return next((m for m in FID_METRICS if m in recorded), None)


def fid_note(run: RunRecord, metric: str) -> str:
    """``metric`` with the sample count it rests on (the run's ``<task>.fid.samples``) and, for the stand-in, what
    scored it."""
    keys = dotted(run.config)
    samples = next((v for k, v in keys.items() if k.endswith("fid.samples")), None)
    final = next((v for k, v in keys.items() if k.endswith("fid.final_samples")), 0)
    at = next((v for k, v in keys.items() if k.endswith("fid.final_at")), [1.0])
    text = f"{metric} on {samples} samples" if samples is not None else f"{metric} (its sample count not saved)"
    if samples is not None and final:  # fid.final_samples: a larger set at the first evaluation from each fraction
        text += f" ({final} from {', '.join(f'{float(f):.0%}' for f in at)} of the run)"
    if metric == "fid_standin":
        text += " through the offline random-feature stand-in network, not Inception"
    return text


def metrics_that_answer(runs: Sequence[RunRecord], headline: str) -> list[str]:
    """The metrics a claim is judged on, in the order they carry it: the headline; for an FID-scored task, its FID
    and then the denoising loss."""
    fid = fid_metric(runs)
    if fid is None:
        return [headline]
    recorded = {m for run in runs for m in run.curves.get("raw", {})}
    return [fid, *([DENOISING_LOSS] if DENOISING_LOSS in recorded else [])]


def joint_level(metrics: Sequence[str]) -> float:
    """The confidence of each metric's interval when a verdict looks at ``metrics`` in turn: 95% shared among them
    (Bonferroni), so the chance that any of them declares a difference that is not there stays at 5%."""
    return 1 - 0.05 / len(metrics)


def carried(intervals: dict[str, Interval | None]) -> tuple[str, str]:
    """(outcome, the metric that carried it): the first metric, in order, whose interval is conclusive; else
    inconclusive, carried by none (``""``)."""
    for metric, interval in intervals.items():
        if interval is not None and interval.verdict != "inconclusive":
            return interval.verdict, metric
    return "inconclusive", ""


def number_format(metric: str) -> str:
    """FID in hundredths, a loss or an accuracy in ten-thousandths."""
    return "{:+.2f}" if metric in FID_METRICS else "{:+.4f}"


def describe(intervals: dict[str, Interval | None], by: str, names: dict[str, str]) -> str:
    """Evidence text: which metric carried it, each metric's interval, and a disagreement if there is one."""
    parts = [f"{names.get(m, m)}: " + (f"{i.text(number_format(m))} ({i.verdict})" if i else "no evaluations")
             for m, i in intervals.items()]
    if len(parts) == 1:
        return parts[0]
    parts[0] = f"{joint_level(list(intervals)):.1%} intervals, {len(parts)} metrics looked at; " + parts[0]
    conclusive = {i.verdict for i in intervals.values() if i is not None and i.verdict != "inconclusive"}
    head = f"carried by {by}" if by else "neither metric settles it"
    if len(conclusive) > 1:
        head += " (the metrics disagree)"
    return f"{head}; " + "; ".join(parts)


def claim_f(row: str, s: LrSummary) -> list[Verdict]:
    """Each averager's paired gain over raw, at the end and in the first 75% of the run, on the FID and the
    denoising loss; a verdict per averager and phase. Only for tasks scored by an FID."""
    fid = fid_metric(s.runs)
    if fid is None:
        return []
    directions = metric_directions(s.runs[0].task, s.runs[0].path)
    metrics = metrics_that_answer(s.runs, fid)
    names = {fid: fid_note(s.runs[0], fid), DENOISING_LOSS: "held-out denoising loss"}
    verdicts = []
    for name in [w for w in s.bands if w != "raw"]:
        for phase, window in F_PHASES.items():
            intervals = {}
            for metric in metrics:
                direction = direction_of(metric, directions)
                gains = (final_gains(s.runs, "raw", name, metric, direction) if window is None
                         else phase_gains(s.runs, "raw", name, metric, direction, *window))
                intervals[metric] = t_interval(gains, joint_level(metrics))
            if all(i is None for i in intervals.values()):
                continue  # not averaging in this phase (SWA from 75% has no early-mid evaluation)
            outcome, by = carried(intervals)
            shown = by or metrics[-1]
            summary = intervals[shown].text(number_format(shown)) + f" ({shown})" if intervals[shown] else ""
            verdicts.append(Verdict("f", f"{row}, {name}, {phase}", outcome,
                                    f"gain over raw {'at the end' if window is None else 'in the first 75%'}, "
                                    + describe(intervals, by, names),
                                    row=row, entry=name, phase=phase, summary=summary, metric=by))
    return verdicts
