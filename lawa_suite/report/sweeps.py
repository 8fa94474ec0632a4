"""The post-hoc sweeps of a bench in its report: the metric against the swept setting (sigma_rel, k), like EDM2's
Figure 5, from one training run per seed.

Each sweep output was scored with the raw checkpoint of its step on the run's held-out batches (``sweeps.py``), so
its gain over raw is paired within the run, as the online averagers' is, and summarised over seeds with the same
95% t-interval. The online averagers' final values are drawn beside the sweep as references.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lawa_suite.report.paired import final_gains, gain, t_interval
from lawa_suite.report.curves import fmt, load_metrics
from lawa_suite.plotting import figure, palette, save
from lawa_suite.rundir import METRICS_FILE, SWEEPS_DIR

if TYPE_CHECKING:
    from lawa_suite.report.records import LrSummary

__all__ = ["SweepPoint", "read_sweeps", "sweep_section"]


@dataclass
class SweepPoint:
    """One output folder of a sweep (one setting), at the last step it was scored, over the seeds of one lr."""
    folder: str
    config: dict[str, Any]
    values: list[float]           # the headline metric, one per seed
    gains: list[float]            # paired gain over raw of the same run and step, one per seed


def read_sweeps(runs: Sequence[Any], headline: str, direction: str) -> dict[str, list[SweepPoint]]:
    """sweep name -> its points (output folders), read from every run's ``posthoc/<sweep>/``."""
    points: dict[str, dict[str, SweepPoint]] = defaultdict(dict)
    for run in runs:
        root = Path(run.path) / SWEEPS_DIR
        if not root.is_dir():
            continue
        for sweep in sorted(p for p in root.iterdir() if (p / METRICS_FILE).is_file()):
            curves, _ = load_metrics(sweep / METRICS_FILE)
            raw = dict(curves.get("raw", {}).get(headline, []))
            manifest = json.loads((sweep / "manifest.json").read_text())
            for entry in manifest["averagers"]:
                series = curves.get(entry["folder"], {}).get(headline, [])
                if not series or series[-1][0] not in raw:
                    continue
                step, value = series[-1]
                point = points[sweep.name].setdefault(entry["folder"], SweepPoint(entry["folder"], entry["config"],
                                                                                   [], []))
                point.values.append(value)
                point.gains.append(gain(direction, raw[step], value))
    return {name: list(found.values()) for name, found in points.items()}


def _varying(points: list[SweepPoint]) -> list[str]:
    """The keys whose values differ between a sweep's points, in the averager's key order."""
    keys = list(points[0].config)
    return [k for k in keys if len({json.dumps(p.config.get(k)) for p in points}) > 1]


def _number(value: Any) -> float | None:
    value = value[0] if isinstance(value, list) and len(value) == 1 else value
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def sweep_section(by_lr: Sequence[LrSummary], out: Path, png_stem: str, colour_names: Iterable[str] = ()) -> list[str]:
    """Markdown for every sweep of one task: a table per lr (metric and paired gain over raw, with intervals) and
    one PNG per sweep with the metric against the swept key. ``colour_names``: every weights name the report
    draws, for its one palette (the online averagers' lines)."""
    colours = palette([*colour_names, *(r["weights"] for s in by_lr for r in s.rows)])
    found = {s.lr: read_sweeps(s.runs, s.headline, s.direction) for s in by_lr}
    names = sorted({name for sweeps in found.values() for name in sweeps})
    lines: list[str] = []
    for name in names:
        lines += [f"### Post-hoc sweep `{name}` (one training run per seed)", ""]
        png = f"{png_stem}-sweep-{name}.png"
        drawn = _plot(name, by_lr, found, out / png, colours)
        for s in by_lr:
            points = found[s.lr].get(name, [])
            if not points:
                continue
            lines += [f"lr={s.lr:g}: every output scored with the raw checkpoint of its step on the same held-out "
                      f"batches; gain = paired difference from raw (positive = better).", "",
                      f"| setting | {s.headline} (mean [95% interval]) | gain over raw |", "|---|---|---|"]
            for p in points:
                value, paired = t_interval(p.values), t_interval(p.gains)
                lines.append(f"| {p.folder} | {value.text('{:.4f}')} | {paired.text()}: {paired.verdict} |")
            for r in (r for r in s.rows if r["weights"] != "raw"):  # the online averagers at the end, for reference
                paired = t_interval(final_gains(s.runs, "raw", r["weights"], s.headline, s.direction))
                lines.append(f"| {r['weights']} (online, final) | {fmt(r['final'])} (seed mean) | "
                             + (f"{paired.text()}: {paired.verdict} |" if paired else "- |"))
            lines.append("")
        if drawn:
            lines += [f"![{name}]({png})", ""]
    return lines


def _plot(name: str, by_lr: Sequence[LrSummary], found: dict[float, dict[str, list[SweepPoint]]],
          path: Path, colours: dict[str, str]) -> bool:
    """The metric against the first varying key (a line per value of the others), an axis per lr, the online
    averagers' final seed means as dashed lines; False when there is no numeric key to draw against."""
    panels = [s for s in by_lr if found[s.lr].get(name)]
    if not panels:
        return False
    varying = _varying(found[panels[0].lr][name])
    if not varying or any(_number(p.config.get(varying[0])) is None for s in panels for p in found[s.lr][name]):
        return False
    x_key, rest = varying[0], varying[1:]
    fig, axes = figure(1, len(panels), (4.5 * len(panels), 3.4))
    for ax, s in zip(axes[0], panels):
        lines: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
        for p in found[s.lr][name]:
            interval = t_interval(p.values)
            label = ", ".join(f"{k}={p.config[k]}" for k in rest) or name
            lines[label].append((_number(p.config[x_key]), interval.mean, interval.mean - interval.low))
        for label, pts in lines.items():
            pts.sort()
            ax.errorbar([x for x, _, _ in pts], [y for _, y, _ in pts], yerr=[e for _, _, e in pts], marker="o",
                        capsize=3, label=label)
        for r in s.rows:
            ax.axhline(r["final"], ls="--", lw=0.8, color=colours[r["weights"]],
                       label=f"{r['weights']} (online)")
        ax.set_title(f"lr={s.lr:g}", fontsize=9)
        ax.set_xlabel(x_key)
        ax.set_ylabel(f"final {s.headline}")
        ax.legend(fontsize=6)
    fig.suptitle(f"post-hoc sweep {name}: mean over seeds, 95% interval", fontsize=9)
    save(fig, path, dpi=110)
    return True
