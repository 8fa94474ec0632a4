"""What one run found, in words: each averager's gain over raw by phase of training (early: the first 25% of the
steps, mid: 25-75%, late: the last 25%), drawn as a gain curve with the phases shaded, and a plain paragraph: how
each averager ended against raw, where averaging helped most, and how many evaluations each phase rests on, with
what one evaluation scored (held-out examples, tokens or images, generated samples) where the evaluator recorded it.

One run is one seed: the numbers are observations (how often and by how much an averager was ahead of raw at the
evaluations of a phase), not intervals; ``suite bench ... seeds=0,1,2,3,4`` gives the intervals.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lawa_suite.report.paired import PHASES, gain
from lawa_suite.report.curves import SIZE_WORDS, Curves, ordered
from lawa_suite.plotting import figure, palette, save

__all__ = ["PhaseGain", "phase_gains_of_run", "findings_lines"]


@dataclass
class PhaseGain:
    weights: str
    phase: str
    mean: float          # mean gain over raw at the phase's evaluations (positive = better)
    ahead: int           # evaluations at which it was better than raw
    evaluations: int


def phase_gains_of_run(curves: Curves, steps: int, metric: str, direction: str) -> list[PhaseGain]:
    raw = dict(curves.get("raw", {}).get(metric, []))
    found = []
    for weights in [w for w in ordered(curves) if w != "raw"]:
        paired = [(s, gain(direction, raw[s], v)) for s, v in curves[weights].get(metric, []) if s in raw]
        for phase, (lo, hi) in PHASES.items():
            gains = [g for s, g in paired if lo * steps < s <= hi * steps]
            if gains:
                found.append(PhaseGain(weights, phase, sum(gains) / len(gains), sum(g > 0 for g in gains), len(gains)))
    return found


def _sentence(gains: list[PhaseGain], metric: str) -> str:
    ahead = [g for g in gains if g.mean > 0 and g.ahead * 2 > g.evaluations]
    if not ahead:
        return f"In this run no averager was ahead of raw in {metric} on average in any phase of training."
    best = max(ahead, key=lambda g: g.mean)
    lo, hi = PHASES[best.phase]
    others = sorted({g.phase for g in ahead if g.weights == best.weights} - {best.phase}, key=list(PHASES).index)
    plural = "s" if len(others) > 1 else ""
    also = f"; it was also ahead in the {' and '.join(others)} phase{plural}" if others else ""
    single = " (a single evaluation)" if best.evaluations == 1 else ""
    return (f"Averaging helped most in the {best.phase} phase ({lo:.0%}-{hi:.0%} of the steps): {best.weights} was "
            f"ahead of raw at {best.ahead} of {best.evaluations} evaluations{single}, by {best.mean:+.4f} {metric} on "
            f"average{also}.")


def _standing(value: float) -> str:
    return "ahead of" if value > 0 else "behind" if value < 0 else "level with"


def _end(curves: Curves, metric: str, direction: str, unscored: dict[str, str]) -> str:
    """How each averager ended against raw: its gain at raw's final evaluation (+ = better), whichever way."""
    raw = curves.get("raw", {}).get(metric, [])
    if not raw:
        return ""
    last, raw_last = raw[-1]
    finals, absent = {}, []
    for weights in [w for w in ordered(curves) if w != "raw"]:
        values = dict(curves[weights].get(metric, []))
        if last in values:
            finals[weights] = gain(direction, raw_last, values[last])
        else:
            absent.append(weights)
    text = ""
    standings = {_standing(v) for v in finals.values()}
    if len(finals) == 1:
        (name, value), = finals.items()
        text = f"At the final evaluation (step {last}) {name} was {_standing(value)} raw in {metric}: {value:+.4f}."
    elif len(standings) == 1:  # all one way: said once, for all of them
        listed = ", ".join(f"{w} {v:+.4f}" for w, v in finals.items())
        text = f"At the final evaluation (step {last}) every averager was {standings.pop()} raw in {metric}: {listed}."
    elif finals:
        text = (f"At the final evaluation (step {last}), against raw in {metric}: "
                + ", ".join(f"{w} {v:+.4f} ({_standing(v).split()[0]})" for w, v in finals.items()) + ".")
    if absent:
        text += f" Not scored at step {last}: {', '.join(absent)}."
    if unscored:
        text += "".join(f" {w} was never scored: {why}." for w, why in unscored.items())
    return text.strip()


def _rests_on(curves: Curves, steps: int, metric: str, sizes: Curves) -> str:
    """How many evaluations each phase's numbers rest on, and what one evaluation scores where the records say
    (``sizes``: the evaluator's recorded sizes, ``curves.load_curves_and_sizes``)."""
    raw_steps = [s for s, _ in curves.get("raw", {}).get(metric, [])]
    counts = [f"{phase} {sum(lo * steps < s <= hi * steps for s in raw_steps)}" for phase, (lo, hi) in PHASES.items()]
    recorded = sizes.get("raw", {})
    described = [text for key, words in SIZE_WORDS.items()
                 if (text := _size(recorded.get(key, []), raw_steps, words))]
    each = f"; each scores {' and '.join(described)}" if described else ""
    return f"Evaluations per phase: {', '.join(counts)}{each}."


def _size(points: list[tuple[int, float]], raw_steps: list[int], words: str) -> str:
    """``"1,000 held-out examples"``: the size of raw's evaluations of the headline metric; a size some of them
    differ in (FID's larger sample set at the end) is named with its steps, evaluations that recorded none counted."""
    evaluated = set(raw_steps)
    at = {step: int(value) for step, value in points if step in evaluated}
    if not at:
        return ""
    values = list(at.values())
    usual = max(sorted(set(values)), key=values.count)  # the most common; a tie goes to the smaller
    others: dict[int, list[int]] = {}
    for step, value in sorted(at.items()):
        if value != usual:
            others.setdefault(value, []).append(step)
    notes = [f"{value:,} at step{'s' if len(at_steps) > 1 else ''} {', '.join(map(str, at_steps))}"
             for value, at_steps in sorted(others.items())]
    if missing := len(evaluated) - len(at):
        notes.append(f"not recorded at {missing} evaluation{'s' if missing > 1 else ''}")
    return f"{usual:,} {words}" + (f" ({'; '.join(notes)})" if notes else "")


def findings_lines(curves: Curves, steps: int, metric: str, direction: str, path: Path,
                   names: Iterable[str] | None = None, unscored: dict[str, str] | None = None,
                   sizes: Curves | None = None) -> list[str]:
    """Markdown: the plain paragraph, the phase table, and the gain curve (drawn to ``path``). ``names``: every
    weights name the report draws, for its one palette; ``unscored``: the run's averagers no evaluation scored,
    name -> why; ``sizes``: what each evaluation scored, as its records say (``curves.load_curves_and_sizes``)."""
    unscored = unscored or {}
    gains = phase_gains_of_run(curves, steps, metric, direction)
    if not gains:
        return []
    raw_steps = [s for s, _ in curves.get("raw", {}).get(metric, [])]
    names_found = list(dict.fromkeys(g.weights for g in gains))
    paragraph = " ".join(part for part in (_end(curves, metric, direction, unscored), _sentence(gains, metric),
                                           _rests_on(curves, steps, metric, sizes or {})) if part)
    lines = ["## What this run found", "",
             f"{paragraph} One run is one seed: these are observations, not intervals (`suite bench ... "
             f"seeds=0,1,2,3,4` gives intervals).", "",
             f"| gain over raw in {metric} (+ = better) | "
             + " | ".join(f"{p} ({lo:.0%}-{hi:.0%})" for p, (lo, hi) in PHASES.items()) + " |",
             "|---|" + "---|" * len(PHASES)]
    for name in names_found:
        cells = []
        for phase, (lo, hi) in PHASES.items():
            g = next((g for g in gains if g.weights == name and g.phase == phase), None)
            cells.append(f"{g.mean:+.4f} (ahead at {g.ahead}/{g.evaluations})" if g
                         else _no_gain(sum(lo * steps < s <= hi * steps for s in raw_steps)))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name in unscored:
        lines.append(f"| {name} | " + " | ".join(["no evaluation of its weights"] * len(PHASES)) + " |")
    _plot(curves, steps, metric, direction, path, palette([*(names or []), *curves]))
    return lines + ["", f"![gain over raw]({path.name})", ""]


def _no_gain(raw_evaluations: int) -> str:
    """A phase without a gain: nothing was evaluated in it, or raw was and the averager was not ready yet."""
    if raw_evaluations == 0:
        return "no evaluation in this phase"
    return f"not ready yet (raw alone at {raw_evaluations} evaluation{'s' if raw_evaluations != 1 else ''})"


def _plot(curves: Curves, steps: int, metric: str, direction: str, path: Path, colours: dict[str, str]) -> None:
    raw = dict(curves.get("raw", {}).get(metric, []))
    fig, axes = figure(size=(7, 3.6))
    ax = axes[0][0]
    for (phase, (lo, hi)), shade in zip(PHASES.items(), ("#f2f2f2", "#e4e4e4", "#f2f2f2")):
        ax.axvspan(lo * steps, hi * steps, color=shade, zorder=0)
        ax.text((lo + hi) / 2 * steps, 1.0, phase, transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                fontsize=8)
    for weights in [w for w in ordered(curves) if w != "raw"]:
        pairs = [(s, gain(direction, raw[s], v)) for s, v in curves[weights].get(metric, []) if s in raw]
        if pairs:
            ax.plot(*zip(*pairs), marker=".", label=weights, color=colours[weights])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlim(0, steps)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"gain over raw in {metric}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save(fig, path, dpi=110)
