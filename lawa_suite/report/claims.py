"""The four claims a bench tests, each judged per task and learning rate from the seed-mean summaries."""

from __future__ import annotations

from dataclasses import dataclass

from lawa_suite.report.bench import EARLY_MID, SETTLED_FROM, LrSummary, mean_gain
from lawa_suite.report.run import better, fmt

__all__ = ["Verdict", "swa_like", "claims", "CLAIM_TEXT", "claims_section"]


@dataclass
class Verdict:
    claim: str
    where: str
    held: bool | None      # None: could not be tested here
    evidence: str


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


def claims(task: str, by_lr: list[LrSummary]) -> list[Verdict]:
    verdicts: list[Verdict] = []
    if len(by_lr) >= 2 and all("lawa" in s.bands for s in by_lr):
        high, low = by_lr[0], by_lr[-1]
        g_high, g_low = mean_gain(high, "lawa", SETTLED_FROM, 1.0), mean_gain(low, "lawa", SETTLED_FROM, 1.0)
        if g_high is not None and g_low is not None:
            verdicts.append(Verdict("a", task, g_high > g_low,
                                    f"LAWA's mean gain over raw in the second half of the run: {g_high:+.4f} at "
                                    f"lr={high.lr:g} vs {g_low:+.4f} at lr={low.lr:g}"))
    for s in by_lr:
        where = f"{task} lr={s.lr:g}"
        others = [w for w in s.bands if w not in ("raw", "lawa")]
        if "lawa" in s.bands and others:
            # each rival against LAWA over the early-mid evaluations where both are averaging (SWA from 75% has
            # none: it is left out and named)
            lo, hi = EARLY_MID[0] * s.steps, EARLY_MID[1] * s.steps
            duels, absent = [], []
            for rival in others:
                steps = [st for st in s.bands["lawa"].steps if lo < st <= hi and s.bands[rival].at(st) is not None]
                if not steps:
                    absent.append(rival)
                    continue
                mine = sum(s.bands["lawa"].at(st) for st in steps) / len(steps)  # type: ignore[misc]
                theirs = sum(s.bands[rival].at(st) for st in steps) / len(steps)  # type: ignore[misc]
                duels.append((rival, steps, mine, theirs, better(s.direction, mine, theirs)))
            if duels:
                verdicts.append(Verdict("b", where, all(d[4] for d in duels), "; ".join(
                    f"mean {s.headline} at steps {st[0]}-{st[-1]}: lawa {fmt(m)} vs {r} {fmt(t)}"
                    for r, st, m, t, _ in duels) + (f" ({', '.join(absent)} not yet averaging)" if absent else "")))
        swas = swa_like(s)
        if len(swas) >= 2:
            (early_start, early), (late_start, late) = swas[0], swas[-1]
            e, l_ = s.bands[early].mean[-1], s.bands[late].mean[-1]
            verdicts.append(Verdict("c", where, better(s.direction, l_, e),
                                    f"final {s.headline}: {early} (from {early_start:.0%}) {fmt(e)} vs {late} "
                                    f"(from {late_start:.0%}) {fmt(l_)}"))
        rows = {r["weights"]: r for r in s.rows}
        if "raw" in rows and "lawa" in rows:
            raw_at, lawa_at = rows["raw"]["to_final"], rows["lawa"]["to_final"]
            held = lawa_at is not None and raw_at is not None and lawa_at < raw_at
            verdicts.append(Verdict("d", where, held, f"raw's smoothed final {s.headline} {fmt(s.target_final)} "
                                    f"reached by raw at step {raw_at}, by LAWA at "
                                    f"{lawa_at if lawa_at is not None else 'never'}; " + ", ".join(
                                        f"{w} {r['to_final'] if r['to_final'] is not None else 'never'}"
                                        for w, r in rows.items() if w not in ("raw", "lawa"))))
    return verdicts


CLAIM_TEXT = {
    "a": "LAWA's gain over raw is larger at the higher learning rate",
    "b": f"LAWA beats EMA and SWA in the early-mid part of training (evaluations up to {EARLY_MID[1]:.0%} of the run)",
    "c": "SWA started early does worse (final) than SWA started at 75%",
    "d": "the averaged (LAWA) run reaches raw's final metric in fewer steps",
}


def claims_section(verdicts: list[Verdict]) -> list[str]:
    """The report's "The claims" section: per claim, how often it held, then each verdict with its evidence."""
    lines = ["## The claims", ""]
    for key, text in CLAIM_TEXT.items():
        found = [v for v in verdicts if v.claim == key]
        tested = [v for v in found if v.held is not None]
        held = sum(v.held for v in tested)  # type: ignore[misc]
        summary = f"held in {held} of {len(tested)}" if tested else "not testable with these runs"
        lines.append(f"- **({key}) {text}: {summary}.**")
        lines += [f"  - {v.where}: {'held' if v.held else 'did not hold'}; {v.evidence}" for v in found]
    return lines + [""]
