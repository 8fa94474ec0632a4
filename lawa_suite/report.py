"""Turn a run's ``metrics.jsonl`` into ``report.md`` (a comparison table) and ``curves.png``.

The table has, for raw weights and each averager: the final and best value of every evaluation metric and
the step of the best, plus "steps to raw's final": the first step at which those weights reached the raw
run's final headline metric (the LAWA papers' "steps saved" view).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["load_metrics", "metric_directions", "summarise", "write_report", "write_bench_report", "find_runs",
           "seed_band", "to_html"]

Curves = dict[str, dict[str, list[tuple[int, float]]]]  # weights -> metric -> [(step, value)]


def load_metrics(path: Path) -> tuple[Curves, list[tuple[int, float]]]:
    """Validation curves per weights and metric, and the training-loss curve, from ``metrics.jsonl``."""
    curves: Curves = defaultdict(lambda: defaultdict(list))
    train: list[tuple[int, float]] = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        step, split, weights = record["step"], record.get("split"), record.get("weights", "raw")
        if split == "train":
            if record.get("loss") is not None:
                train.append((step, record["loss"]))
            continue
        for key, value in record.items():
            if key not in ("step", "split", "weights") and isinstance(value, (int, float)):
                curves[weights][key].append((step, float(value)))
    return curves, train


def metric_directions(task: str) -> dict[str, str]:
    """``metric -> "max"|"min"`` from the task's evaluator; the first metric is the headline."""
    from lawa_suite import registry
    try:
        evaluator = registry.evaluators.get(registry.tasks.get(task).evaluator)
        return dict(evaluator.metrics)
    except Exception:  # a plugin that is no longer installed: fall back on names
        return {}


def _ordered(curves: Curves) -> list[str]:
    """Weights names, raw first, then averagers alphabetically."""
    return sorted(curves, key=lambda w: (w != "raw", w))


def _direction(metric: str, directions: dict[str, str]) -> str:
    if metric in directions:
        return directions[metric]
    return "max" if any(word in metric for word in ("acc", "top", "score")) else "min"


def _better(direction: str, a: float, b: float) -> bool:
    return a > b if direction == "max" else a < b


def summarise(curves: Curves, directions: dict[str, str]) -> tuple[list[str], list[dict[str, Any]]]:
    """The metric order and one row per weights (raw first) with final/best values and steps-to-target."""
    metrics = list(dict.fromkeys([m for m in directions] + [m for c in curves.values() for m in c]))
    metrics = [m for m in metrics if any(m in c for c in curves.values())]
    headline = metrics[0] if metrics else None
    raw_final = curves.get("raw", {}).get(headline, [])[-1][1] if headline and curves.get("raw", {}).get(headline) else None
    rows = []
    for weights in _ordered(curves):
        row: dict[str, Any] = {"weights": weights}
        for metric in metrics:
            points = curves[weights].get(metric, [])
            if not points:
                continue
            best, best_step = best_point(points, _direction(metric, directions))
            row[metric] = {"final": points[-1][1], "final_step": points[-1][0], "best": best, "best_step": best_step}
        if headline and raw_final is not None and headline in curves[weights]:
            row["steps_to_raw_final"] = first_reaching(curves[weights][headline], raw_final,
                                                       _direction(headline, directions))
        rows.append(row)
    return metrics, rows


def _fmt(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"


def _table(metrics: list[str], rows: list[dict[str, Any]], headline: str | None, raw_steps: int | None) -> str:
    header = ["weights"]
    for metric in metrics:
        header += [f"final {metric}", f"best {metric} (step)"]
    header.append(f"steps to raw's final {headline}" if headline else "")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["weights"]]
        for metric in metrics:
            m = row.get(metric)
            cells += [_fmt(m["final"]), f"{_fmt(m['best'])} ({m['best_step']})"] if m else ["-", "-"]
        reached = row.get("steps_to_raw_final")
        if reached is None:
            cells.append("not reached")
        else:
            saved = f" ({1 - reached / raw_steps:.0%} fewer)" if raw_steps and row["weights"] != "raw" else ""
            cells.append(f"{reached}{saved}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(curves: Curves, train: list[tuple[int, float]], metrics: list[str], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = metrics + (["train loss"] if train else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    colours = {"raw": "black"}
    palette = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for weights in _ordered(curves):
        colours.setdefault(weights, next(palette, None))
    for ax, panel in zip(axes[0], panels):
        if panel == "train loss":
            steps, values = zip(*train)
            ax.plot(steps, values, color="black", alpha=0.6, lw=1)
        else:
            for weights in _ordered(curves):
                points = curves[weights].get(panel)
                if points:
                    steps, values = zip(*points)
                    ax.plot(steps, values, marker=".", label=weights, color=colours[weights],
                            lw=2 if weights == "raw" else 1.5)
            ax.legend()
        ax.set_xlabel("optimizer step")
        ax.set_title(panel)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run_dir: Path) -> Path:
    """Write ``report.md`` and ``curves.png`` into ``run_dir``; returns the report's path."""
    run_dir = Path(run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    curves, train = load_metrics(run_dir / "metrics.jsonl")
    directions = metric_directions(config["task"])
    metrics, rows = summarise(curves, directions)
    headline = metrics[0] if metrics else None
    raw_points = curves.get("raw", {}).get(headline, []) if headline else []
    title = f"{config['task']} ({config['preset']}), lr {config['lr']}, seed {config['seed']}"
    lines = [f"# Run report: {run_dir.name}", "",
             f"{title}; {config['steps']} steps; averagers: {', '.join(config['averager']) or 'none'}. "
             f"Every evaluation scores all weights on the same held-out batches. Config: `config.yaml`.", ""]
    if rows:
        lines += [_table(metrics, rows, headline, raw_points[-1][0] if raw_points else None), ""]
        plot_curves(curves, train, metrics, run_dir / "curves.png", title)
        lines += ["![metrics vs step](curves.png)", ""]
    else:
        lines += ["No evaluation was recorded.", ""]
    report = run_dir / "report.md"
    report.write_text("\n".join(lines))
    return report


# == cross-run reports: many runs (a bench), grouped by task and learning rate, mean over seeds ==================
# `suite report <bench dir or run dirs> --out DIR` writes report.md, report.html (the same content, the PNGs
# embedded) and one PNG per task. Steps to target use two targets, both taken from raw's seed-mean curve:
# raw's *smoothed final* value (the mean of its last SMOOTH evaluations: a single noisy final raw value flatters
# the averages) and raw's *best* value. "Saved" compares with the step at which raw itself first reached the
# same target, not with the run's length, so raw never "saves" anything against itself.
SMOOTH = 3                 # evaluations in raw's smoothed final value
EARLY_MID = (0.0, 0.6)     # claim (b): evaluations in this fraction of the run
SETTLED_FROM = 0.5         # claim (a): LAWA's gain is averaged over evaluations from this fraction of the run


@dataclass
class RunRecord:
    """One run folder, read back: its identity from config.yaml, its curves from metrics.jsonl."""
    path: Path
    task: str
    preset: str
    lr: float
    seed: int
    steps: int
    config: dict[str, Any]
    curves: Curves
    train: list[tuple[int, float]]

    @property
    def last_step(self) -> int:
        return max((p[-1][0] for c in self.curves.values() for p in c.values() if p), default=0)


@dataclass
class Band:
    """A seed-mean curve with its min-max band, over the steps every seed evaluated."""
    steps: list[int]
    mean: list[float]
    low: list[float]
    high: list[float]
    seeds: int

    def at(self, step: int) -> float | None:
        return self.mean[self.steps.index(step)] if step in self.steps else None

    @property
    def points(self) -> list[tuple[int, float]]:
        """(step, seed-mean value) pairs."""
        return list(zip(self.steps, self.mean))


def is_run_dir(path: Path) -> bool:
    """A run folder: its config.yaml and metrics.jsonl."""
    return (path / "config.yaml").is_file() and (path / "metrics.jsonl").is_file()


def find_runs(paths: list[Path]) -> list[Path]:
    """Run folders (config.yaml + metrics.jsonl) among ``paths`` and below them (a bench folder), sorted."""
    found: list[Path] = []
    for path in map(Path, paths):
        if is_run_dir(path):
            found.append(path)
        elif path.is_dir():
            found += sorted(p.parent for p in path.rglob("metrics.jsonl") if is_run_dir(p.parent))
    return list(dict.fromkeys(found))


def read_run(path: Path) -> RunRecord:
    config = yaml.safe_load((path / "config.yaml").read_text())
    curves, train = load_metrics(path / "metrics.jsonl")
    return RunRecord(path, config["task"], config.get("preset", ""), float(config["lr"]), int(config["seed"]),
                     int(config["steps"]), config, curves, train)


def seed_band(runs: list[RunRecord], weights: str, metric: str) -> Band | None:
    series = [dict(r.curves.get(weights, {}).get(metric, [])) for r in runs]
    if not series or not all(series):
        return None
    steps = sorted(set.intersection(*(set(s) for s in series)))
    if not steps:
        return None
    values = [[s[step] for s in series] for step in steps]
    return Band(steps, [sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values],
                len(series))


def first_reaching(points: Iterable[tuple[int, float]], target: float, direction: str) -> int | None:
    """The first step whose value is ``target`` or better, or None."""
    for step, value in points:
        if value == target or _better(direction, value, target):
            return step
    return None


def best_point(points: Iterable[tuple[int, float]], direction: str) -> tuple[float, int]:
    """The best value and its step; ties go to the earliest step."""
    best_step, best = None, None
    for step, value in points:
        if best is None or _better(direction, value, best):
            best_step, best = step, value
    return best, best_step


def _gain(direction: str, raw: float, other: float) -> float:
    """How much better ``other`` is than ``raw`` (positive = better), in the metric's units."""
    return other - raw if direction == "max" else raw - other


@dataclass
class LrSummary:
    """One (task, lr) cell of the report: per weights, the seed-mean band and its numbers."""
    lr: float
    runs: list[RunRecord]
    bands: dict[str, Band]
    headline: str
    direction: str
    target_final: float | None = None
    target_best: float | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return self.runs[0].steps


def summarise_lr(lr: float, runs: list[RunRecord], headline: str, direction: str) -> LrSummary:
    weights = _ordered({w: None for r in runs for w in r.curves})  # type: ignore[arg-type]
    bands = {w: b for w in weights if (b := seed_band(runs, w, headline)) is not None}
    summary = LrSummary(lr, runs, bands, headline, direction)
    raw = bands.get("raw")
    if raw is None:
        return summary
    summary.target_final = sum(raw.mean[-SMOOTH:]) / len(raw.mean[-SMOOTH:])
    summary.target_best = best_point(raw.points, direction)[0]
    raw_final_at = first_reaching(raw.points, summary.target_final, direction)
    raw_best_at = first_reaching(raw.points, summary.target_best, direction)
    for name, band in bands.items():
        best, best_step = best_point(band.points, direction)
        to_final = first_reaching(band.points, summary.target_final, direction)
        to_best = first_reaching(band.points, summary.target_best, direction)
        summary.rows.append({
            "weights": name, "final": band.mean[-1], "final_low": band.low[-1], "final_high": band.high[-1],
            "best": best, "best_step": best_step, "to_final": to_final, "to_best": to_best,
            "saved_final": None if to_final is None or not raw_final_at else 1 - to_final / raw_final_at,
            "saved_best": None if to_best is None or not raw_best_at else 1 - to_best / raw_best_at,
        })
    return summary


def _steps_cell(step: int | None, saved: float | None, is_raw: bool) -> str:
    if step is None:
        return "not reached"
    return f"{step}" if is_raw or saved is None else f"{step} ({saved:+.0%})"


def lr_table(summary: LrSummary) -> str:
    h = summary.headline
    lines = [f"| weights | final {h} (min-max over seeds) | best {h} (step) | steps to raw's smoothed final "
             f"(saved) | steps to raw's best (saved) |", "|---|---|---|---|---|"]
    for row in summary.rows:
        is_raw = row["weights"] == "raw"
        lines.append(f"| {row['weights']} | {_fmt(row['final'])} ({_fmt(row['final_low'])}-{_fmt(row['final_high'])})"
                     f" | {_fmt(row['best'])} ({row['best_step']}) | {_steps_cell(row['to_final'], row['saved_final'], is_raw)}"
                     f" | {_steps_cell(row['to_best'], row['saved_best'], is_raw)} |")
    return "\n".join(lines)


def mean_gain(summary: LrSummary, weights: str, lo: float, hi: float) -> float | None:
    """Mean of (weights better than raw) over the seed-mean evaluations in ``(lo, hi]`` of the run."""
    raw, band = summary.bands.get("raw"), summary.bands.get(weights)
    if raw is None or band is None:
        return None
    gains = [_gain(summary.direction, raw.at(s), v) for s, v in zip(band.steps, band.mean)  # type: ignore[arg-type]
             if lo * summary.steps < s <= hi * summary.steps and raw.at(s) is not None]
    return sum(gains) / len(gains) if gains else None


def gap_table(high: LrSummary, low: LrSummary) -> str:
    """The paper's Figure 2 view: each weights' final value at both learning rates, and its gain over raw."""
    h = high.headline
    lines = [f"| weights | final {h} at lr={high.lr:g} | at lr={low.lr:g} | high minus low | gain over raw at "
             f"lr={high.lr:g} (final / settled mean) | at lr={low.lr:g} (final / settled mean) |",
             "|---|---|---|---|---|---|"]
    finals_high = {r["weights"]: r["final"] for r in high.rows}
    finals_low = {r["weights"]: r["final"] for r in low.rows}
    for name in [w for w in finals_high if w in finals_low]:
        cells = [name, _fmt(finals_high[name]), _fmt(finals_low[name]), f"{finals_high[name] - finals_low[name]:+.4f}"]
        for s in (high, low):
            if name == "raw":
                cells.append("-")
                continue
            final = _gain(s.direction, s.bands["raw"].mean[-1], s.bands[name].mean[-1])
            settled = mean_gain(s, name, SETTLED_FROM, 1.0)
            cells.append(f"{final:+.4f} / " + (f"{settled:+.4f}" if settled is not None else "-"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- the four claims --------------------------------------------------------------------------------------------
@dataclass
class Verdict:
    claim: str
    where: str
    held: bool | None      # None: could not be tested here
    evidence: str


def _swa_like(summary: LrSummary) -> list[tuple[float, str]]:
    """SWA averagers (swa and its variants) with their start as a fraction of the run, earliest first."""
    found = []
    config = summary.runs[0].config
    for name in summary.bands:
        section = config.get(name)
        if name.startswith("swa") and isinstance(section, dict) and "start" in section:
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
                duels.append((rival, steps, mine, theirs, _better(s.direction, mine, theirs)))
            if duels:
                verdicts.append(Verdict("b", where, all(d[4] for d in duels), "; ".join(
                    f"mean {s.headline} at steps {st[0]}-{st[-1]}: lawa {_fmt(m)} vs {r} {_fmt(t)}"
                    for r, st, m, t, _ in duels) + (f" ({', '.join(absent)} not yet averaging)" if absent else "")))
        swas = _swa_like(s)
        if len(swas) >= 2:
            (early_start, early), (late_start, late) = swas[0], swas[-1]
            e, l_ = s.bands[early].mean[-1], s.bands[late].mean[-1]
            verdicts.append(Verdict("c", where, _better(s.direction, l_, e),
                                    f"final {s.headline}: {early} (from {early_start:.0%}) {_fmt(e)} vs {late} "
                                    f"(from {late_start:.0%}) {_fmt(l_)}"))
        rows = {r["weights"]: r for r in s.rows}
        if "raw" in rows and "lawa" in rows:
            raw_at, lawa_at = rows["raw"]["to_final"], rows["lawa"]["to_final"]
            held = lawa_at is not None and raw_at is not None and lawa_at < raw_at
            verdicts.append(Verdict("d", where, held, f"raw's smoothed final {s.headline} {_fmt(s.target_final)} "
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
    lines = ["## The claims", ""]
    for key, text in CLAIM_TEXT.items():
        found = [v for v in verdicts if v.claim == key]
        tested = [v for v in found if v.held is not None]
        held = sum(v.held for v in tested)  # type: ignore[misc]
        summary = f"held in {held} of {len(tested)}" if tested else "not testable with these runs"
        lines.append(f"- **({key}) {text}: {summary}.**")
        lines += [f"  - {v.where}: {'held' if v.held else 'did not hold'}; {v.evidence}" for v in found]
    return lines + [""]


# -- plots --------------------------------------------------------------------------------------------------------
def plot_task(task: str, by_lr: list[LrSummary], metrics: list[str], directions: dict[str, str], path: Path) -> None:
    """Rows: metrics; columns: learning rates; a line per weights (seed mean) with a min-max band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(metrics) + 1  # the last row: each averager's gain over raw on the headline metric, zoomed in
    fig, axes = plt.subplots(rows, len(by_lr), figsize=(5.2 * len(by_lr), 3.4 * rows), squeeze=False)
    names = _ordered({w: None for s in by_lr for r in s.runs for w in r.curves})  # type: ignore[arg-type]
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours = {w: ("black" if w == "raw" else palette[i % len(palette)]) for i, w in enumerate(names)}
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
            if values and min(values) > 0 and max(values) / min(values) > 8:  # FID falls from hundreds to tens
                ax.set_yscale("log")
            ax.set_title(f"lr={s.lr:g}: {metric} ({'higher' if _direction(metric, directions) == 'max' else 'lower'}"
                         f" is better)", fontsize=10)
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
            if row == 0 and col == 0 and ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    for col, s in enumerate(by_lr):
        ax, raw = axes[-1][col], s.bands.get("raw")
        for w, band in s.bands.items():
            if w == "raw" or raw is None:
                continue
            points = [(st, _gain(s.direction, raw.at(st), v)) for st, v in zip(band.steps, band.mean)  # type: ignore
                      if raw.at(st) is not None]
            if points:
                ax.plot(*zip(*points), marker=".", lw=1.4, color=colours[w], label=w)
        ax.axhline(0, color="black", lw=1)
        tail = [y for line in ax.get_lines()[:-1] for x, y in zip(line.get_xdata(), line.get_ydata())
                if x > 0.3 * s.steps]
        if tail:  # early gains can be hugely negative (an average still holding the random init): zoom on the rest
            span = max(abs(min(tail)), abs(max(tail))) * 1.3 or 1.0
            ax.set_ylim(-span, span)
        ax.set_title(f"lr={s.lr:g}: gain over raw in {s.headline} (above 0: better)", fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{task}: mean over {by_lr[0].bands['raw'].seeds if 'raw' in by_lr[0].bands else '?'} seed(s), "
                 f"band = min-max")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- the report ---------------------------------------------------------------------------------------------------
def _group(runs: list[RunRecord]) -> dict[str, dict[float, list[RunRecord]]]:
    """task label -> lr -> finished runs (an unfinished run would drag the seed mean back to its last step)."""
    groups: dict[str, dict[float, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if run.last_step < run.steps:
            continue
        label = f"{run.task} ({run.preset})" if run.preset else run.task
        groups[label][run.lr].append(run)
    return groups


def task_section(label: str, by_lr_runs: dict[float, list[RunRecord]], out: Path) -> tuple[list[str], list[Verdict]]:
    first = next(iter(by_lr_runs.values()))[0]
    directions = metric_directions(first.task)
    metrics = _metrics_of(by_lr_runs, directions)  # the headline and one more (FID and loss; accuracy and loss)
    headline = metrics[0]
    direction = _direction(headline, directions)
    by_lr = [summarise_lr(lr, sorted(runs, key=lambda r: r.seed), headline, direction)
             for lr, runs in sorted(by_lr_runs.items(), reverse=True)]
    png = f"{first.task}{'-' + first.preset if first.preset else ''}.png"
    plot_task(label, by_lr, metrics, directions, out / png)
    lines = [f"## {label}", ""]
    seeds = sorted({r.seed for runs in by_lr_runs.values() for r in runs})
    lines += [f"{len(by_lr)} learning rate(s) x seeds {', '.join(map(str, seeds))}; {first.steps} steps; headline "
              f"metric `{headline}` ({'higher' if direction == 'max' else 'lower'} is better). Unfinished runs are "
              f"left out of the means (listed under Runs).", "", f"![{label}]({png})", ""]
    for s in by_lr:
        lines += [f"### lr={s.lr:g}", ""]
        if s.target_final is not None:
            lines += [f"Targets from raw's seed-mean curve: smoothed final {_fmt(s.target_final)} (mean of its "
                      f"last {SMOOTH} evaluations), best {_fmt(s.target_best)}. Saved = fewer steps than raw "
                      f"itself needed to reach the same target.", ""]
        lines += [lr_table(s), ""]
    if len(by_lr) >= 2:
        lines += [f"### High vs low learning rate (lr={by_lr[0].lr:g} vs lr={by_lr[-1].lr:g})", "",
                  f"Gain = how much better than raw (positive: better) at the final evaluation, and its mean over "
                  f"the evaluations after {SETTLED_FROM:.0%} of the run (settled).", "",
                  gap_table(by_lr[0], by_lr[-1]), ""]
    return lines, claims(label, by_lr)


def _metrics_of(by_lr_runs: dict[float, list[RunRecord]], directions: dict[str, str]) -> list[str]:
    present = [m for runs in by_lr_runs.values() for r in runs for c in r.curves.values() for m in c]
    return [m for m in dict.fromkeys([*directions, *present]) if m in present][:2]


def write_bench_report(paths: list[Path], out: Path, title: str = "") -> Path:
    """Write ``report.md``, ``report.html`` and one PNG per task into ``out``; returns the Markdown path."""
    runs = [read_run(p) for p in find_runs(paths)]
    if not runs:
        raise ValueError(f"{', '.join(map(str, paths))}: no run folders (config.yaml + metrics.jsonl) found")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title or 'Benchmark report'}", "",
             f"{len(runs)} run(s). Curves and numbers are means over seeds (band: min-max); every evaluation scores "
             f"raw weights and all averagers of a run on the same held-out batches.", ""]
    verdicts: list[Verdict] = []
    sections: list[str] = []
    if not _group(runs):
        lines += ["No run has finished yet.", ""]
    for label, by_lr in _group(runs).items():
        text, found = task_section(label, by_lr, out)
        sections += text
        verdicts += found
    lines += claims_section(verdicts) + sections
    lines += ["## Runs", "", *(f"- `{r.path}`: {r.task} lr={r.lr:g} seed={r.seed}, {r.last_step}/{r.steps} steps, "
                                  f"averagers {', '.join(r.config.get('averager', [])) or 'none'}"
                                  + (" (**unfinished: left out of the means**)" if r.last_step < r.steps else "")
                                  for r in runs), ""]
    markdown = "\n".join(lines)
    (out / "report.md").write_text(markdown)
    (out / "report.html").write_text(to_html(markdown, out, title or "Benchmark report"))
    return out / "report.md"


# -- Markdown -> HTML (the subset this module writes: headings, paragraphs, lists, tables, images) -----------------
def _inline(text: str) -> str:
    import html
    import re

    text = html.escape(text, quote=False)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def _image(line: str, folder: Path) -> str:
    import base64
    import html
    import re

    alt, src = re.match(r"!\[(.*?)\]\((.+?)\)", line).groups()  # type: ignore[union-attr]
    file = folder / src
    data = f"data:image/png;base64,{base64.b64encode(file.read_bytes()).decode()}" if file.is_file() else src
    return f'<p><img alt="{html.escape(alt)}" src="{data}" style="max-width:100%"></p>'


def to_html(markdown: str, folder: Path, title: str) -> str:
    """A self-contained HTML page of ``markdown``: PNGs referenced from ``folder`` are embedded as base64."""
    import html

    body: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("!["):
            body.append(_image(line, folder))
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            head, rest = rows[0], [r for r in rows[1:] if not all(set(c) <= set("-: ") for c in r)]
            body.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>" +
                        "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rest) +
                        "</table>")
            continue
        elif line.lstrip().startswith("- "):
            items = []
            while i < len(lines) and lines[i].lstrip().startswith("- "):
                nested = lines[i].startswith("  ")
                items.append(f"<li{' class=sub' if nested else ''}>{_inline(lines[i].lstrip()[2:])}</li>")
                i += 1
            body.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
        i += 1
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}table{border-collapse:"
             "collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
             "li.sub{margin-left:2em;list-style:circle}code{background:#f4f4f4}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
