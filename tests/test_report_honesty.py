"""The reports say what happened, all of it (items 10-13 of "Nothing lost, nothing run, nothing silent"): one
colour per name in every figure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from matplotlib.colors import to_hex
from typer.testing import CliRunner

from lawa_suite.report import write_bench_report, write_report

runner = CliRunner()


def hand_run(root: Path, steps: int, curves: dict[str, dict[int, float]], averagers: list[str],
             metric: str = "loss", seed: int = 0, **settings: object) -> Path:
    """A run folder written by hand: config.yaml and one validation record per (weights, step)."""
    run = root / f"seed{seed}"
    run.mkdir(parents=True)
    config = {"task": "gpt2", "preset": "cpu", "lr": 0.1, "seed": seed, "steps": steps, "averager": averagers,
              **settings}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    lines = [{"step": step, "weights": weights, "split": "val", metric: value}
             for weights, points in curves.items() for step, value in points.items()]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


# -- item 12: one palette keyed by name ------------------------------------------------------------------------

@pytest.fixture
def drawn(monkeypatch):
    """file name -> {line label -> colour} of every figure saved while the test runs."""
    from matplotlib.container import ErrorbarContainer
    from matplotlib.figure import Figure

    found: dict[str, dict[str, str]] = {}
    save = Figure.savefig

    def record(fig, path, *args, **kwargs):
        colours = found.setdefault(Path(path).name, {})
        for ax in fig.axes:
            for line in ax.get_lines():
                if not line.get_label().startswith("_"):
                    colours[line.get_label()] = to_hex(line.get_color())
            for container in ax.containers:
                if isinstance(container, ErrorbarContainer) and container.get_label():
                    colours[container.get_label()] = to_hex(container.lines[0].get_color())
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return found


def test_each_name_has_one_colour_in_every_plot_of_a_run_report(tmp_path, drawn):
    run = hand_run(tmp_path, 50, {"raw": {10: 3.0, 30: 2.6, 50: 2.2}, "ema": {10: 2.9, 30: 2.5, 50: 2.3},
                                  "lawa": {10: 3.1, 30: 2.4, 50: 2.25}, "swa": {30: 2.7, 50: 2.4}},
                   ["ema", "lawa", "swa"])
    write_report(run)
    curves, gains = drawn["curves.png"], drawn["gains.png"]
    names = ["raw", "ema", "lawa", "swa"]
    for name in ("ema", "lawa", "swa"):
        assert curves[name] == gains[name], (name, curves, gains)
    assert len({curves[name] for name in names}) == 4  # and the names differ from one another
    from lawa_suite.report.run import colour_of  # the palette, for other code to draw with

    assert all(curves[name] == to_hex(colour_of(name, names)) for name in names)


def test_each_name_has_one_colour_in_every_plot_of_a_bench_report(tmp_path, drawn):
    for lr in (0.1, 0.01):
        for seed in (0, 1):
            hand_run(tmp_path / "bench" / f"lr{lr}", 50,
                     {"raw": {10: 3.0 + seed, 30: 2.6, 50: 2.2}, "ema": {10: 2.9, 30: 2.5 + seed, 50: 2.3},
                      "lawa": {30: 2.4, 50: 2.25 - lr}}, ["ema", "lawa"], seed=seed, lr=lr)
    write_bench_report([tmp_path / "bench"], tmp_path / "out")
    task, lrs = drawn["gpt2-cpu.png"], drawn["gpt2-cpu-lrs.png"]
    assert task["ema"] == lrs["ema"] and task["lawa"] == lrs["lawa"] and task["ema"] != task["lawa"]
