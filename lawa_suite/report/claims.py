"""The LAWA papers' claims, each judged per task (and learning rate) on paired per-seed differences (claim (e) lives in
``connectivity.py``, (f), averaging a diffusion model, in ``diffusion.py``, (g), averaging against learning-rate
decay, in ``schedules.py``, and (h), against schedule-free training, in ``schedulefree.py``).

Every number is a within-run difference computed per seed, summarised over seeds with a 95% t-interval
(``paired.py``), and every claim is stated as held, did not hold or inconclusive, with the numbers, whichever way
it falls. Claims (a) and (b) are about early and mid training, as the papers state them (Sanyal et al. 2024:
LAWA's gains are largest early, at high learning rates), so they are judged on the evaluations in the first 75%
of the run; the end-of-training comparison is reported beside them, not instead.
"""

from __future__ import annotations

from lawa_suite.report.connectivity import claim_e
from lawa_suite.report.diffusion import claim_f
from lawa_suite.report.lrs import TRAINS_WITHIN, still_trains, tuned
from lawa_suite.report.paired import EARLY_MID, INTERVAL_NOTE, Interval, combined, final_gains, phase_gains, t_interval
from lawa_suite.report.records import LrSummary, Verdict
from lawa_suite.report.targets import saved_fractions

__all__ = ["Verdict", "swa_like", "claims", "CLAIM_TEXT", "claims_section"]

OUTCOMES = ("held", "did not hold", "inconclusive")


def swa_like(summary: LrSummary) -> list[tuple[float, str]]:
    """SWA averagers (``swa`` and its instances) with their start as a fraction of the run, earliest first.

    An instance is recognised by its config section's ``of: swa``, not by its name: ``swa_early`` might as
    well be called ``late``, and ``swap_thing`` is not SWA.
    """
    found = []
    config = summary.runs[0].config
    for name in summary.bands:
        section = config.get(name)
        if not isinstance(section, dict) or "start" not in section:
            continue
        if section.get("of") == "swa" or name == "swa":
            start = float(section["start"])
            found.append((start if start < 1 else start / summary.steps, name))
    return sorted(found)


def _early_mid(s: LrSummary, baseline: str, name: str) -> Interval | None:
    return t_interval(phase_gains(s.runs, baseline, name, s.headline, s.direction, *EARLY_MID))


def _final(s: LrSummary, baseline: str, name: str) -> Interval | None:
    return t_interval(final_gains(s.runs, baseline, name, s.headline, s.direction))


def _beside(interval: Interval | None) -> str:
    return f"{interval.text()} ({interval.verdict})" if interval else "not available"


def claim_a(task: str, by_lr: list[LrSummary]) -> list[Verdict]:
    """LAWA gains more over raw at the higher learning rate: per seed, the early-mid gain at the high lr minus the
    one at the lowest (seeds paired across the two runs that share them). The high lr is the highest that still
    trains (raw within ``TRAINS_WITHIN`` of the tuned lr's final), as the papers compare: an lr at which raw trains
    far worse is another regime, named in the evidence."""
    if len(by_lr) < 2 or not all("lawa" in s.bands for s in by_lr):
        return []
    best = tuned(by_lr)
    training = [s for s in by_lr if best is not None and s.lr >= best.lr and still_trains(s, best)]
    high, low = (max(training, key=lambda s: s.lr) if training else by_lr[0]), by_lr[-1]
    if high is low:
        return []
    skipped = [f"{s.lr:g}" for s in by_lr if s.lr > high.lr]
    differences, finals = [], []
    for seed in sorted({r.seed for r in high.runs} & {r.seed for r in low.runs}):
        pair = [[r for r in s.runs if r.seed == seed] for s in (high, low)]
        early_mid = [phase_gains(runs, "raw", "lawa", high.headline, high.direction, *EARLY_MID) for runs in pair]
        final = [final_gains(runs, "raw", "lawa", high.headline, high.direction) for runs in pair]
        if all(early_mid):
            differences.append(early_mid[0][0] - early_mid[1][0])
        if all(final):
            finals.append(final[0][0] - final[1][0])
    interval = t_interval(differences)
    if interval is None:
        return []
    note = (f" (lr {', '.join(skipped)} left out: raw trains more than {TRAINS_WITHIN:.0%} worse there than at the "
            f"tuned lr={best.lr:g})" if skipped and best is not None else "")
    return [Verdict("a", task, interval.verdict,
                    f"LAWA's early-mid gain at lr={high.lr:g} minus at lr={low.lr:g}: {interval.text()}; "
                    f"early-mid gain itself {_beside(_early_mid(high, 'raw', 'lawa'))} vs "
                    f"{_beside(_early_mid(low, 'raw', 'lawa'))}; at the end: {_beside(t_interval(finals))}{note}",
                    row=f"{task} lr={high.lr:g}", entry=f"vs lr={low.lr:g}", summary=f"{interval.text()} "
                    f"({high.headline}, early-mid gain minus lr={low.lr:g}'s)", metric=high.headline)]


def claim_b(where: str, s: LrSummary) -> list[Verdict]:
    """LAWA beats every other averager early-mid: per rival, LAWA's paired advantage over it, per seed. Held if it
    held against every rival that was averaging; did not hold if it failed against one; else inconclusive."""
    rivals = [w for w in s.bands if w not in ("raw", "lawa")]
    if "lawa" not in s.bands or not rivals:
        return []
    duels, absent = {}, []
    for rival in rivals:
        interval = _early_mid(s, rival, "lawa")
        if interval is None:
            absent.append(rival)
        else:
            duels[rival] = interval
    if not duels:
        return []
    outcome = combined([i.verdict for i in duels.values()])
    evidence = "; ".join(f"LAWA over {r}: {i.text()} ({i.verdict}), at the end {_beside(_final(s, r, 'lawa'))}"
                         for r, i in duels.items())
    summary = "; ".join(f"over {r}: {i.text()}" for r, i in duels.items()) + f" ({s.headline})"
    return [Verdict("b", where, outcome, evidence + (f" ({', '.join(absent)} not yet averaging)" if absent else ""),
                    row=where, summary=summary, metric=s.headline)]


def claim_c(where: str, s: LrSummary) -> list[Verdict]:
    """SWA started late beats SWA started early at the end: per seed, the late one's final advantage."""
    swas = swa_like(s)
    if len(swas) < 2:
        return []
    (early_start, early), (late_start, late) = swas[0], swas[-1]
    interval = _final(s, early, late)
    if interval is None:
        return []
    return [Verdict("c", where, interval.verdict, f"final {s.headline} advantage of {late} (from {late_start:.0%}) "
                                                  f"over {early} (from {early_start:.0%}): {interval.text()}",
                    row=where, summary=f"{interval.text()} ({s.headline}, {late} over {early})", metric=s.headline)]


def claim_d(where: str, s: LrSummary) -> list[Verdict]:
    """LAWA reaches raw's final value in fewer steps: per seed, the fraction of raw's own steps to its smoothed
    final value that LAWA saved, crossings interpolated (``targets.py``)."""
    if "lawa" not in s.bands:
        return []
    saved, never = saved_fractions(s.runs, "lawa", s.headline, s.direction, "final")
    interval = t_interval(saved)
    if interval is None:
        return []
    note = f" (LAWA never reached it in {never} seed(s): counted as needing the whole run)" if never else ""
    return [Verdict("d", where, interval.verdict, f"steps saved to reach raw's smoothed final {s.headline}, as a "
                                                  f"fraction of raw's own: {interval.text('{:+.0%}')}{note}",
                    row=where, summary=f"{interval.text('{:+.0%}')} steps saved", metric=s.headline)]


def claims(task: str, by_lr: list[LrSummary]) -> list[Verdict]:
    verdicts = claim_a(task, by_lr)
    for s in by_lr:
        where = f"{task} lr={s.lr:g}"
        verdicts += claim_b(where, s) + claim_c(where, s) + claim_d(where, s) + claim_e(where, s) + claim_f(where, s)
    return verdicts


CLAIM_TEXT = {
    "a": f"LAWA's gain over raw is larger at the higher learning rate (early-mid: the first {EARLY_MID[1]:.0%})",
    "b": f"LAWA beats EMA and SWA in the early-mid part of training (the first {EARLY_MID[1]:.0%} of the run)",
    "c": "SWA started early does worse (final) than SWA started at 75%",
    "d": "the averaged (LAWA) run reaches raw's final metric in fewer steps",
    "e": "after an early phase, a run's checkpoints are linearly connected: the average of two scores better than "
         "their mean (bench key lmc)",
    "f": f"averaging improves a diffusion model (each averager against raw, at the end and in the first "
         f"{EARLY_MID[1]:.0%}), judged on FID and on the held-out denoising loss: the first whose interval excludes "
         f"zero carries the verdict, FID first; each interval at 97.5%, so that the two looks together keep a 5% "
         f"chance of a false verdict (Bonferroni)",
    "g": "averaging replaces learning-rate decay: the averagers of a constant (or WSD) run reach the cosine run's raw "
         "final value in fewer steps",
    "h": "averaging a constant-lr run matches schedule-free training: the constant run's averagers against the "
         "schedule-free run's raw weights (its eval sequence), at the end and in the first "
         f"{EARLY_MID[1]:.0%}, paired by seed (different runs: seed i against seed i); held = the averaged run is "
         "better, did not hold = schedule-free is, inconclusive = no difference these seeds can see (not a "
         "shown match)",
    "h-ref": "for (h), the reference it is read against: the cosine run's raw weights against the schedule-free "
             "run's raw, same pairing; held = the cosine schedule is better (not counted in (h))",
}

# claims judged on more than one metric: the section says which carried each verdict
BY_METRIC = ("f", "h", "h-ref")


def claims_section(verdicts: list[Verdict]) -> list[str]:
    """The report's "The claims" section: per claim, how the verdicts fell, then each with its numbers."""
    lines = ["## The claims", "", INTERVAL_NOTE, ""]
    for key, text in CLAIM_TEXT.items():
        found = [v for v in verdicts if v.claim == key]
        counts = ", ".join(f"{sum(v.outcome == o for v in found)} {o}" for o in OUTCOMES
                           if any(v.outcome == o for v in found))
        summary = f"{counts} (of {len(found)})" if found else "not testable with these runs"
        lines.append(f"- **({key}) {text}: {summary}{_carried_by(found) if key in BY_METRIC else ''}.**")
        lines += [f"  - {v.where}: {v.outcome}; {v.evidence}" for v in found]
    return lines + [""]


def _carried_by(found: list[Verdict]) -> str:
    """How many verdicts each metric carried (``""``: none settled it)."""
    counts: dict[str, int] = {}
    for verdict in found:
        counts[verdict.metric] = counts.get(verdict.metric, 0) + 1
    if not counts:
        return ""
    return "; carried by " + ", ".join(f"{m or 'no metric (inconclusive on all)'} in {n}"
                                       for m, n in sorted(counts.items(), key=lambda kv: (not kv[0], kv[0])))
