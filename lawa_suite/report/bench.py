"""The cross-run report: many runs (a bench), grouped by task and learning rate, mean over seeds.

``suite report <bench dir or run dirs> out=DIR`` writes report.md, report.html (the same content, the PNGs
embedded, the verdict matrix coloured) and PNGs per task. It opens with answers at a glance (``glance.py``: the
verdict matrix, forest plots, gain curves with interval bands), then the claims' record, then a section per task.
Gains over raw are paired within each run (``paired.py``); steps to target are too: each run's own raw curve gives
the targets, crossings are interpolated, and the steps saved are a fraction of raw's own steps to the same target
(``targets.py``).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lawa_suite.files import write_text_atomic
from lawa_suite.plotting import figure, palette, save, wide_range
from lawa_suite.report.claims import CLAIM_TEXT, claims, claims_section
from lawa_suite.report.curves import (
    best_point,
    direction_of,
    fmt,
    metric_directions,
    metric_names,
    metric_notes,
    ordered,
)
from lawa_suite.report.diffusion import DENOISING_LOSS, fid_metric, fid_note
from lawa_suite.report.gainplots import GainPanel
from lawa_suite.report.glance import glance_section
from lawa_suite.report.html import to_html
from lawa_suite.report.lrs import lr_section
from lawa_suite.report.matrix import MATRIX_BLOCK, matrix_html
from lawa_suite.report.paired import phase_table
from lawa_suite.report.records import Band, LrSummary, RunRecord, Verdict, experiment_key, read_run
from lawa_suite.report.run import find_runs
from lawa_suite.report.schedulefree import claim_h
from lawa_suite.report.schedules import claim_g
from lawa_suite.report.sweeps import sweep_section
from lawa_suite.report.targets import SMOOTH, steps_table

__all__ = ["seed_band", "summarise_lr", "lr_table", "plot_task", "group_runs", "task_section", "write_bench_report"]


def seed_band(runs: list[RunRecord], weights_name: str, metric: str) -> Band | None:
    series = [dict(r.curves.get(weights_name, {}).get(metric, [])) for r in runs]
    if not series or not all(series):
        return None
    steps = sorted(set.intersection(*(set(s) for s in series)))
    if not steps:
        return None
    values = [[s[step] for s in series] for step in steps]
    return Band(steps, [sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values],
                len(series))


def summarise_lr(lr: float, runs: list[RunRecord], headline: str, direction: str) -> LrSummary:
    weights = ordered({w: None for r in runs for w in r.curves})  # type: ignore[arg-type]
    bands = {w: b for w in weights if (b := seed_band(runs, w, headline)) is not None}
    summary = LrSummary(lr, runs, bands, headline, direction)
    for name, band in bands.items():
        best, best_step = best_point(band.points, direction)
        summary.rows.append({"weights": name, "final": band.mean[-1], "final_low": band.low[-1],
                             "final_high": band.high[-1], "best": best, "best_step": best_step})
    return summary


def lr_table(summary: LrSummary) -> str:
    h = summary.headline
    lines = [f"| weights | final {h} (min-max over seeds) | best {h} of the seed mean (step) |", "|---|---|---|"]
    for row in summary.rows:
        lines.append(f"| {row['weights']} | {fmt(row['final'])} ({fmt(row['final_low'])}-{fmt(row['final_high'])})"
                     f" | {fmt(row['best'])} ({row['best_step']}) |")
    return "\n".join(lines)


def plot_task(task: str, by_lr: list[LrSummary], metrics: list[str], directions: dict[str, str], path: Path,
              colour_names: Iterable[str] = ()) -> None:
    """Rows: metrics; columns: learning rates; a line per weights (seed mean) with a min-max band. ``colour_names``:
    every weights name the report draws, for its one palette."""
    rows = len(metrics)  # the gains over raw, with their intervals, open the report (glance.py)
    fig, axes = figure(rows, len(by_lr), (5.2 * len(by_lr), 3.4 * rows))
    names = ordered({w: None for s in by_lr for r in s.runs for w in r.curves})  # type: ignore[arg-type]
    colours = palette([*colour_names, *names])
    for col, s in enumerate(by_lr):
        for row, metric in enumerate(metrics):
            ax = axes[row][col]
            for w in names:
                band = seed_band(s.runs, w, metric)
                if band is None:
                    continue
                ax.plot(band.steps, band.mean, marker=".", lw=2 if w == "raw" else 1.4, color=colours[w], label=w)
                if band.seeds > 1:
                    ax.fill_between(band.steps, band.low, band.high, color=colours[w], alpha=0.15, lw=0)
            values = [v for line in ax.get_lines() for v in line.get_ydata()]
            if wide_range(values):
                ax.set_yscale("log")
            ax.set_title(f"lr={s.lr:g}: {metric} ({'higher' if direction_of(metric, directions) == 'max' else 'lower'}"
                         f" is better)", fontsize=10)
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
            if row == 0 and col == 0 and ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.suptitle(f"{task}: mean over {by_lr[0].bands['raw'].seeds if 'raw' in by_lr[0].bands else '?'} seed(s), "
                 f"band = min-max")
    save(fig, path, dpi=100)


def group_runs(runs: list[RunRecord]) -> dict[str, dict[float, list[RunRecord]]]:
    """experiment label -> lr -> finished runs (an unfinished run would drag the seed mean back to its last step).

    Runs are seeds of one mean only when their configs differ in nothing but the seed (``experiment_key``): a task
    run two ways is two experiments, labelled by the keys that tell them apart, and a second run with a seed
    already in its group is its own experiment, labelled by its folder, never a second seed."""
    finished = [run for run in runs if run.last_step >= run.steps]
    by_task: dict[str, list[RunRecord]] = defaultdict(list)
    for run in finished:
        by_task[f"{run.task} ({run.preset})" if run.preset else run.task].append(run)
    groups: dict[str, dict[float, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for task_label, task_runs in by_task.items():
        keys = [experiment_key(run) for run in task_runs]
        differing = sorted(k for k in {k for key in keys for k in key}
                           if len({repr(key.get(k)) for key in keys}) > 1)
        for run, key in zip(task_runs, keys):
            shown = ", ".join(f"{k}={_plain(key.get(k, '-'))}" for k in differing)
            label = f"{task_label} [{shown}]" if shown else task_label
            if any(other.seed == run.seed for other in groups[label][run.lr]):
                label = f"{label} [{run.path}]"  # the same seed twice is the same experiment twice
            groups[label][run.lr].append(run)
    return groups


def _plain(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _metrics_of(by_lr_runs: dict[float, list[RunRecord]], directions: dict[str, str]) -> list[str]:
    present = metric_names([m for runs in by_lr_runs.values() for r in runs for c in r.curves.values() for m in c],
                           directions)  # what an evaluation rests on (a size) is no metric
    return [m for m in dict.fromkeys([*directions, *present]) if m in present][:2]


def _gain_panels(label: str, by_lr: list[LrSummary], directions: dict[str, str]) -> list[GainPanel]:
    """The gains drawn at the top: the headline; for an FID-scored task also the denoising loss, which answers."""
    names = [w for w in ordered({w: None for s in by_lr for w in s.bands}) if w != "raw"]  # type: ignore[arg-type]
    s = by_lr[0]
    panels = [GainPanel(label, s.headline, s.direction, by_lr, names)]
    if fid_metric(s.runs) and any(DENOISING_LOSS in r.curves.get("raw", {}) for r in s.runs):
        panels.append(GainPanel(f"{label} (denoising loss)", DENOISING_LOSS,
                                direction_of(DENOISING_LOSS, directions), by_lr, names))
    return panels


def task_section(label: str, by_lr_runs: dict[float, list[RunRecord]], out: Path,
                 colour_names: Iterable[str] = ()) -> tuple[list[str], list[Verdict], tuple[str, str, list[GainPanel]]]:
    """One task's Markdown (plot, a table per learning rate, the high-vs-low gap), its claims' verdicts, and what
    the report's opening draws of it: ``(label, png base name, gain panels)``. ``colour_names``: every weights name
    the report draws, for its one palette."""
    first = next(iter(by_lr_runs.values()))[0]
    directions = metric_directions(first.task, first.path)
    metrics = _metrics_of(by_lr_runs, directions)  # the headline and one more (FID and loss; accuracy and loss)
    headline = metrics[0]
    direction = direction_of(headline, directions)
    by_lr = [summarise_lr(lr, sorted(runs, key=lambda r: r.seed), headline, direction)
             for lr, runs in sorted(by_lr_runs.items(), reverse=True)]
    base = f"{first.task}{'-' + first.preset if first.preset else ''}"
    if "[" in label:  # one task run two ways: a figure each
        base += "-" + hashlib.sha1(label.encode()).hexdigest()[:8]
    png = base + ".png"
    plot_task(label, by_lr, metrics, directions, out / png, colour_names)
    lines = [f"## {label}", ""]
    seeds = sorted({r.seed for runs in by_lr_runs.values() for r in runs})
    fid = fid_metric([first])
    lines += [f"{len(by_lr)} learning rate(s) x seeds {', '.join(map(str, seeds))}; {first.steps} steps; headline "
              f"metric `{headline}` ({'higher' if direction == 'max' else 'lower'} is better). Unfinished runs are "
              f"left out of the means (listed under Runs).", *metric_notes(first.task, metrics, first.path),
              *([f"FID here: {fid_note(first, fid)}."] if fid else []), "", f"![{label}]({png})", ""]
    for s in by_lr:
        lines += [f"### lr={s.lr:g}", ""]
        lines += [lr_table(s), ""]
        averagers = [w for w in s.bands if w != "raw"]
        if averagers:
            lines += [phase_table(s.runs, averagers, s.headline, s.direction), "",
                      f"Steps to target (AlgoPerf style): in each run, raw's smoothed final value (the mean of its "
                      f"last {SMOOTH} evaluations) and its best value are the targets; each weights' first crossing "
                      f"is interpolated between evaluations, and the steps saved are a fraction of raw's own steps "
                      f"to the same target (a run that never reaches it counts its full length).", "",
                      steps_table(s.runs, averagers, s.headline, s.direction), ""]
    lines += sweep_section(by_lr, out, base, colour_names)
    lines += lr_section(by_lr, out, base + "-lrs.png", colour_names)
    return lines, claims(label, by_lr), (label, base, _gain_panels(label, by_lr, directions))


def write_bench_report(paths: list[Path], out: Path, title: str = "") -> Path:
    """Write ``report.md``, ``report.html`` and the PNGs into ``out``; returns the Markdown path."""
    runs = [read_run(p) for p in find_runs(paths)]
    if not runs:
        raise ValueError(f"{', '.join(map(str, paths))}: no run folders (config.yaml + metrics.jsonl) found")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title or 'Benchmark report'}", "",
             f"{len(runs)} run(s). Curves and tables of values are means over seeds (band: min-max); every "
             f"evaluation scores raw weights and all averagers of a run on the same held-out batches, so gains over "
             f"raw are paired within each run and given with a 95% t-interval over seeds.", ""]
    verdicts: list[Verdict] = []
    sections: list[str] = []
    groups = group_runs(runs)
    if not groups:
        lines += ["No run has finished yet.", ""]
    names = ordered({w: None for r in runs for w in r.curves})  # type: ignore[arg-type]  # one palette for all
    experiments = []
    for label, by_lr in groups.items():
        text, found, drawn = task_section(label, by_lr, out, names)
        sections += text
        verdicts += found
        experiments.append(drawn)
    labels = {run.path: label for label, by_lr in groups.items() for seeds in by_lr.values() for run in seeds}
    finished = [r for r in runs if r.last_step >= r.steps]
    verdicts += claim_g(finished, labels) + claim_h(finished, labels)
    order = [f"{label} lr={lr:g}" for label, by_lr in groups.items() for lr in sorted(by_lr, reverse=True)]
    lines += glance_section(verdicts, order, CLAIM_TEXT, experiments, out, palette(names))
    lines += claims_section(verdicts) + sections
    lines += ["## Runs", "", *(f"- `{r.path}`: {r.task} lr={r.lr:g} seed={r.seed}, {r.last_step}/{r.steps} steps, "
                                  f"averagers {', '.join(r.config.get('averager', [])) or 'none'}"
                                  + (" (**unfinished: left out of the means**)" if r.last_step < r.steps else "")
                                  for r in runs), ""]
    markdown = "\n".join(lines)
    write_text_atomic(out / "report.md", markdown)
    page = to_html(markdown, out, title or "Benchmark report", {MATRIX_BLOCK: matrix_html(verdicts, order)})
    write_text_atomic(out / "report.html", page)
    return out / "report.md"
