"""Learning rates as the papers chose them: the tuned lr (raw's best final value), and each averager's gain over raw
against the lr (the LAWA paper's Figure 2), paired within runs, with 95% intervals over seeds.

The LAWA papers compare a high learning rate that still trains with the tuned one; an lr whose raw final value is
far worse than the tuned lr's is a different regime (it trains badly), and the report says so: ``TRAINS_WITHIN``
is how far (relative) raw's final value may lie from the tuned lr's for the lr to count as one that trains.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lawa_suite.report.paired import EARLY_MID, final_gains, phase_gains, t_interval
from lawa_suite.report.curves import fmt
from lawa_suite.plotting import figure, palette, save

if TYPE_CHECKING:
    from lawa_suite.report.records import LrSummary

__all__ = ["TRAINS_WITHIN", "tuned", "still_trains", "lr_section"]

TRAINS_WITHIN = 0.05  # an lr "still trains" when raw's final value is within 5% of the tuned lr's


def _raw_final(s: LrSummary) -> float | None:
    row = next((r for r in s.rows if r["weights"] == "raw"), None)
    return None if row is None else row["final"]


def tuned(by_lr: Sequence[LrSummary]) -> LrSummary | None:
    """The lr whose raw weights end best (seed mean of the final evaluation)."""
    scored = [s for s in by_lr if _raw_final(s) is not None]
    if not scored:
        return None
    best = max if scored[0].direction == "max" else min
    return best(scored, key=lambda s: _raw_final(s))  # type: ignore[arg-type, return-value]


def still_trains(s: LrSummary, best: LrSummary) -> bool:
    """Whether raw's final value at ``s``'s lr lies within ``TRAINS_WITHIN`` of the tuned lr's."""
    raw, tuned_raw = _raw_final(s), _raw_final(best)
    return raw is not None and tuned_raw is not None and abs(raw - tuned_raw) <= TRAINS_WITHIN * max(abs(tuned_raw),
                                                                                                  1e-12)


def _regime(s: LrSummary, best: LrSummary) -> str:
    if s is best:
        return "tuned (raw's best final)"
    off = abs(_raw_final(s) - _raw_final(best)) / max(abs(_raw_final(best)), 1e-12)  # type: ignore[operator]
    side = "higher" if s.lr > best.lr else "lower"
    return f"{side}, raw {off:.1%} off the tuned: " + ("still trains" if off <= TRAINS_WITHIN else "trains worse")


def lr_section(by_lr: Sequence[LrSummary], out: Path, png: str, colour_names: Iterable[str] = ()) -> list[str]:
    """Markdown: the tuned lr, each lr's regime and every averager's early-mid and final gain; a PNG of the gains
    against the lr. Empty with fewer than two lrs. ``colour_names``: every weights name the report draws, for its
    one palette."""
    best = tuned(by_lr)
    if len(by_lr) < 2 or best is None:
        return []
    names = [w for w in best.bands if w != "raw"]
    h = best.headline
    lines = [f"### Gain against the learning rate (tuned lr = {best.lr:g}: raw's best final {h})", "",
             f"Per lr: raw's final {h} (seed mean), whether the lr still trains (raw within {TRAINS_WITHIN:.0%} of the "
             f"tuned lr's), and each averager's paired gain over raw in the first {EARLY_MID[1]:.0%} of the run and "
             f"at the end (mean [95% interval] over seeds).", "",
             "| lr | raw final | regime | " + " | ".join(f"{n}: early-mid / final" for n in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for s in sorted(by_lr, key=lambda s: s.lr):
        cells = [f"{s.lr:g}", fmt(_raw_final(s)), _regime(s, best)]
        for name in names:
            early = t_interval(phase_gains(s.runs, "raw", name, s.headline, s.direction, *EARLY_MID))
            final = t_interval(final_gains(s.runs, "raw", name, s.headline, s.direction))
            cells.append(" / ".join(i.text() if i else "-" for i in (early, final)))
        lines.append("| " + " | ".join(cells) + " |")
    _plot(by_lr, names, out / png, palette([*colour_names, *names]))
    return lines + ["", f"![gain against lr]({png})", ""]


def _plot(by_lr: Sequence[LrSummary], names: list[str], path: Path, colours: dict[str, str]) -> None:
    ordered = sorted(by_lr, key=lambda s: s.lr)
    fig, grid = figure(1, 2, (9, 3.4))
    axes = grid[0]
    panels = ((axes[0], EARLY_MID, f"early-mid (first {EARLY_MID[1]:.0%})"), (axes[1], None, "final"))
    for ax, phase, title in panels:
        for name in names:
            xs, ys, errs = [], [], []
            for s in ordered:
                gains = (phase_gains(s.runs, "raw", name, s.headline, s.direction, *phase) if phase is not None
                         else final_gains(s.runs, "raw", name, s.headline, s.direction))
                interval = t_interval(gains)
                if interval is None or math.isnan(interval.mean):
                    continue
                xs.append(s.lr)
                ys.append(interval.mean)
                errs.append(interval.high - interval.mean)
            if xs:
                ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=name, color=colours[name])
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(f"gain over raw in {ordered[0].headline} (+ = better)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("paired gain over raw against the learning rate (mean over seeds, 95% interval)", fontsize=9)
    save(fig, path, dpi=110)
