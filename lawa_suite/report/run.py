"""One run's page: its ``metrics.jsonl`` becomes ``report.md`` (a comparison table) and ``curves.png``.

The table has, for raw weights and each averager: the final and best value of every evaluation metric and
the step of the best, plus "steps to raw's final": the first step at which those weights reached the raw
run's final headline metric (the LAWA papers' "steps saved" view).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lawa_suite.files import write_text_atomic
from lawa_suite.report.curves import (
    SIZE_KEYS,
    Curves,
    best_point,
    better,
    direction_of,
    first_reaching,
    fmt,
    load_curves_and_sizes,
    load_metrics,
    metric_directions,
    metric_names,
    metric_notes,
    ordered,
)
from lawa_suite.report.findings import findings_lines
from lawa_suite.plotting import PALETTE, colour_of, figure, palette, save, wide_range
from lawa_suite.rundir import CONFIG_FILE, METRICS_FILE, read_saved

# The curves' names are re-exported: ``lawa_suite.report.run`` was their home and plugins import them from here.
__all__ = ["Curves", "load_metrics", "metric_directions", "metric_notes", "wide_range", "ordered",
           "direction_of", "better", "summarise", "first_reaching", "best_point", "fmt", "comparison_table",
           "PALETTE", "palette", "colour_of", "SIZE_KEYS", "plot_curves", "write_report", "is_run_dir", "find_runs"]


def summarise(curves: Curves, directions: dict[str, str]) -> tuple[list[str], list[dict[str, Any]]]:
    """The metric order and one row per weights (raw first) with final/best values and steps-to-target."""
    metrics = list(dict.fromkeys([m for m in directions] + [m for c in curves.values() for m in c]))
    metrics = metric_names([m for m in metrics if any(m in c for c in curves.values())], directions)
    headline = metrics[0] if metrics else None
    raw_headline = curves.get("raw", {}).get(headline, []) if headline else []
    raw_final = raw_headline[-1][1] if raw_headline else None
    rows = []
    for weights in ordered(curves):
        row: dict[str, Any] = {"weights": weights}
        for metric in metrics:
            points = curves[weights].get(metric, [])
            if not points:
                continue
            best, best_step = best_point(points, direction_of(metric, directions))
            row[metric] = {"final": points[-1][1], "final_step": points[-1][0], "best": best, "best_step": best_step}
        if headline and raw_final is not None and headline in curves[weights]:
            row["steps_to_raw_final"] = first_reaching(curves[weights][headline], raw_final,
                                                       direction_of(headline, directions))
        rows.append(row)
    return metrics, rows


def comparison_table(metrics: list[str], rows: list[dict[str, Any]], headline: str | None,
                     unscored: dict[str, str] | None = None) -> str:
    """The Markdown table of ``summarise``'s rows. "Fewer" compares with the step at which raw itself first
    reached its final value, not with the run's length: raw never saves anything against itself. ``unscored``:
    a row each for the run's averagers that no evaluation scored (name -> why), so none is missing silently."""
    raw_steps = next((row.get("steps_to_raw_final") for row in rows if row["weights"] == "raw"), None)
    header = ["weights"]
    for metric in metrics:
        header += [f"final {metric}", f"best {metric} (step)"]
    header.append(f"steps to raw's final {headline}" if headline else "")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["weights"]]
        for metric in metrics:
            m = row.get(metric)
            cells += [fmt(m["final"]), f"{fmt(m['best'])} ({m['best_step']})"] if m else ["-", "-"]
        reached = row.get("steps_to_raw_final")
        if reached is None:
            cells.append("not reached")
        else:
            saved = f" ({_fewer(reached, raw_steps)})" if raw_steps and row["weights"] != "raw" else ""
            cells.append(f"{reached}{saved}")
        lines.append("| " + " | ".join(cells) + " |")
    for name, why in (unscored or {}).items():
        lines.append("| " + " | ".join([name, f"no evaluation of its weights: {why}"] + ["-"] * (len(header) - 2))
                     + " |")
    return "\n".join(lines)


def _fewer(reached: int, raw_reached: int) -> str:
    saved = 1 - reached / raw_reached
    return f"{saved:.0%} fewer" if saved >= 0 else f"{-saved:.0%} more"


def plot_curves(curves: Curves, train: list[tuple[int, float]], metrics: list[str], path: Path, title: str,
                names: Iterable[str] | None = None) -> None:
    """One panel per metric (a line per weights), plus the training loss when there is one; ``names``: every
    weights name the report draws, for its one palette (default: those of ``curves``)."""
    panels = metrics + (["train loss"] if train else [])
    fig, axes = figure(1, len(panels), (5 * len(panels), 3.8))
    colours = palette([*(names or []), *curves])
    for ax, panel in zip(axes[0], panels):
        if panel == "train loss":
            steps, values = zip(*train)
            ax.plot(steps, values, color="black", alpha=0.6, lw=1)
        else:
            for weights in ordered(curves):
                points = curves[weights].get(panel)
                if points:
                    steps, values = zip(*points)
                    ax.plot(steps, values, marker=".", label=weights, color=colours[weights],
                            lw=2 if weights == "raw" else 1.5)
            if wide_range([v for line in ax.get_lines() for v in line.get_ydata()]):
                ax.set_yscale("log")
            ax.legend()
        ax.set_xlabel("optimizer step")
        ax.set_title(panel)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    save(fig, path, dpi=110)


def write_report(run_dir: Path) -> Path:
    """Write ``report.md`` and ``curves.png`` into ``run_dir``; returns the report's path."""
    run_dir = Path(run_dir)
    config = read_saved(run_dir / CONFIG_FILE)  # one line for a foreign or hostile config.yaml, no traceback
    curves, train, sizes = load_curves_and_sizes(run_dir / METRICS_FILE)
    directions = metric_directions(config["task"], run_dir)
    metrics, rows = summarise(curves, directions)
    headline = metrics[0] if metrics else None
    config = {"preset": "?", "lr": "?", "seed": "?", "averager": [], **config}  # a hand-written one may lack these
    if "steps" not in config:
        config["steps"] = max((step for c in curves.values() for p in c.values() for step, _ in p), default=0)
    title = f"{config['task']} ({config['preset']}), lr {config['lr']}, seed {config['seed']}"
    lines = [f"# Run report: {run_dir.name}", "",
             f"{title}; {config['steps']} steps; averagers: {', '.join(map(str, config['averager'])) or 'none'}. "
             f"Every evaluation scores all weights on the same held-out batches. Config: `config.yaml`.", ""]
    unscored = _unscored(config, curves)
    names = [*curves, *unscored]  # one palette for curves.png and gains.png
    if rows:
        lines += [comparison_table(metrics, rows, headline, unscored), ""]
        notes = metric_notes(config["task"], metrics, run_dir)
        lines += [*notes, ""] if notes else []
        plot_curves(curves, train, metrics, run_dir / "curves.png", title, names=names)
        lines += ["![metrics vs step](curves.png)", ""]
        lines += findings_lines(curves, int(config["steps"]), headline, direction_of(headline, directions),
                                run_dir / "gains.png", names=names, unscored=unscored, sizes=sizes)
    else:
        lines += ["No evaluation was recorded.", ""]
    report = run_dir / "report.md"
    write_text_atomic(report, "\n".join(lines))
    return report


def _unscored(config: dict[str, Any], curves: Curves) -> dict[str, str]:
    """The run's averagers that no evaluation scored, each with why: its settings leave it without an average by
    the end (``readiness.py``), else simply not ready at any evaluation (a run cut short, a plugin's own rule)."""
    from lawa_suite.averagers._readiness import never_ready_in_saved  # lazily: it loads torch, rarely needed

    listed = config["averager"]
    listed = [listed] if isinstance(listed, str) else listed  # a hand-written config.yaml may name just one
    missing = [str(name) for name in listed if str(name) not in curves]
    if not missing:
        return {}
    known = never_ready_in_saved(config)
    return {name: known.get(name, "it was not ready at any evaluation") for name in missing}


def is_run_dir(path: Path) -> bool:
    """A run folder: its config.yaml and metrics.jsonl (a scored ``suite average`` output has both, and its
    manifest.json says what it is)."""
    return ((path / CONFIG_FILE).is_file() and (path / METRICS_FILE).is_file()
            and not (path / "manifest.json").is_file())


def find_runs(paths: list[Path]) -> list[Path]:
    """Run folders (config.yaml + metrics.jsonl) among ``paths`` and below them (a bench folder), sorted."""
    found: list[Path] = []
    for path in map(Path, paths):
        if is_run_dir(path):
            found.append(path)
        elif path.is_dir():
            found += sorted(p.parent for p in path.rglob(METRICS_FILE) if is_run_dir(p.parent))
    return list(dict.fromkeys(found))
