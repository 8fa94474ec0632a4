"""The pictures of paired gains that follow the verdict matrix: a forest plot (each averager's gain over raw by
phase, a point per learning rate with its 95% interval over seeds; a panel per task and metric) and gain curves
(the mean over seeds of each run's own gain at every evaluation, with the 95% t band at that evaluation). Axes
take in every point and interval: a symmetric log scale where early gains dwarf the late ones."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lawa_suite.plotting import figure, save, signed_scale
from lawa_suite.report.paired import PHASES, Interval, final_gains, gain, phase_gains, t_interval
from lawa_suite.report.records import LrSummary, RunRecord

__all__ = ["GainPanel", "FOREST_PHASES", "phase_interval", "step_intervals", "forest_figure", "band_figure"]

FOREST_PHASES = (*PHASES, "final")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


@dataclass
class GainPanel:
    """One task's gains on one metric: its learning rates (highest first) and averagers."""
    title: str
    metric: str
    direction: str
    by_lr: Sequence[LrSummary]
    names: Sequence[str]


def phase_interval(runs: Sequence[RunRecord], name: str, metric: str, direction: str, phase: str) -> Interval | None:
    if phase == "final":
        return t_interval(final_gains(runs, "raw", name, metric, direction))
    return t_interval(phase_gains(runs, "raw", name, metric, direction, *PHASES[phase]))


def step_intervals(runs: Sequence[RunRecord], name: str, metric: str,
                   direction: str) -> list[tuple[int, Interval]]:
    """At each evaluation every run scored both raw and ``name``: the paired gain's mean and interval over runs."""
    per_run = []
    for run in runs:
        raw, mine = (dict(run.curves.get(w, {}).get(metric, [])) for w in ("raw", name))
        per_run.append({s: gain(direction, raw[s], mine[s]) for s in set(raw) & set(mine)})
    if not per_run:
        return []
    steps = sorted(set.intersection(*(set(g) for g in per_run)))
    return [(s, t_interval([g[s] for g in per_run])) for s in steps]  # type: ignore[misc]


def forest_figure(panels: Sequence[GainPanel], path: Path, colours: dict[str, str]) -> None:
    """A panel per task and metric; a row per averager and phase; a point per lr with its 95% interval."""
    height = max(len(p.names) * len(FOREST_PHASES) for p in panels) * 0.32 + 1.4
    fig, axes = figure(1, len(panels), (max(4.6 * len(panels), 7.5), height))
    for ax, panel in zip(axes[0], panels):
        labels, values = [], []
        rows = [(name, phase) for name in panel.names for phase in FOREST_PHASES]
        for y, (name, phase) in enumerate(rows):
            labels.append(f"{name} · {phase}")
            for k, s in enumerate(panel.by_lr):
                interval = phase_interval(s.runs, name, panel.metric, panel.direction, phase)
                if interval is None:
                    continue
                offset = (k - (len(panel.by_lr) - 1) / 2) * 0.18
                error = [[interval.mean - interval.low], [interval.high - interval.mean]]
                ax.errorbar(interval.mean, y + offset, xerr=error if interval.n > 1 else None, fmt=_MARKERS[k % 7],
                            color=colours.get(name, "grey"), ms=4, capsize=2, lw=1)
                values += [interval.low, interval.high]
        ax.axvline(0, color="black", lw=0.8)
        for y in range(len(FOREST_PHASES), len(rows), len(FOREST_PHASES)):
            ax.axhline(y - 0.5, color="#cccccc", lw=0.6)
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        signed_scale(ax, values, axis="x")
        better = "higher" if panel.direction == "max" else "lower"
        ax.set_xlabel(f"gain over raw in {panel.metric} (+ = better; {better} {panel.metric} is better)", fontsize=8)
        ax.set_title(panel.title, fontsize=9)
        ax.grid(alpha=0.3, axis="x")
        _lr_legend(ax, panel.by_lr)
    fig.suptitle("paired gain over raw by phase: mean over seeds, 95% t-interval", fontsize=9)
    save(fig, path, dpi=100)


def _lr_legend(ax, by_lr: Sequence[LrSummary]) -> None:
    from matplotlib.lines import Line2D  # lazily, as plotting.figure imports matplotlib

    handles = [Line2D([], [], marker=_MARKERS[k % 7], color="grey", ls="", label=f"lr={s.lr:g}")
               for k, s in enumerate(by_lr)]
    ax.legend(handles=handles, fontsize=7, loc="best")


def band_figure(panels: Sequence[GainPanel], path: Path, colours: dict[str, str]) -> None:
    """Rows: metrics; columns: learning rates. A line per averager: the mean paired gain over raw at each
    evaluation, a band for its 95% t-interval over seeds; phases shaded."""
    columns = max(len(p.by_lr) for p in panels)
    fig, axes = figure(len(panels), columns, (4.6 * columns, 3.2 * len(panels)))
    for row, panel in enumerate(panels):
        for col in range(columns):
            ax = axes[row][col]
            if col >= len(panel.by_lr):
                ax.set_axis_off()
                continue
            s, values = panel.by_lr[col], []
            for (_, (lo, hi)), shade in zip(PHASES.items(), ("#f4f4f4", "#e8e8e8", "#f4f4f4")):
                ax.axvspan(lo * s.steps, hi * s.steps, color=shade, zorder=0, lw=0)
            for name in panel.names:
                points = step_intervals(s.runs, name, panel.metric, panel.direction)
                if not points:
                    continue
                steps = [p[0] for p in points]
                ax.plot(steps, [p[1].mean for p in points], marker=".", lw=1.4, color=colours.get(name, "grey"),
                        label=name)
                if all(p[1].n > 1 for p in points):
                    ax.fill_between(steps, [p[1].low for p in points], [p[1].high for p in points],
                                    color=colours.get(name, "grey"), alpha=0.2, lw=0)
                values += [v for p in points for v in (p[1].low, p[1].high)]
            ax.axhline(0, color="black", lw=0.8)
            ax.set_xlim(0, s.steps * 1.02)
            signed_scale(ax, values)
            ax.set_title(f"{panel.title}, lr={s.lr:g}: gain in {panel.metric}", fontsize=9)
            ax.set_xlabel("optimizer step", fontsize=8)
            ax.grid(alpha=0.3)
            if col == 0 and ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.suptitle("gain over raw at each evaluation (+ = better): mean of the paired gains over seeds, band = 95% "
                 "t-interval; shading: early, mid, late", fontsize=9)
    save(fig, path, dpi=100)
