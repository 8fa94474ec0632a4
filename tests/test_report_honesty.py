"""The reports say what happened, all of it: an averager that never became ready is warned of before training and
has its row; a phase without evaluations is told apart from an averager not ready yet; one colour per name in
every figure; the single-run paragraph states how each averager ended against raw and what the phases rest on;
a bench verdict needs a spread (items 10-13 of "Nothing lost, nothing run, nothing silent")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from matplotlib.colors import to_hex
from typer.testing import CliRunner

from lawa_suite.cli import app
from lawa_suite.report import write_bench_report, write_report
from lawa_suite.report.paired import t_interval

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


# -- item 10: an averager that never becomes ready -----------------------------------------------------------

def test_an_averager_never_ready_is_warned_of_before_training_and_given_a_row_saying_why(tmp_path, monkeypatch):
    import sys

    import lawa_suite.training.loop as train_module

    real_step, said_before = train_module.Run.optimizer_step, []

    def spy(self):  # what stderr held when training began (the run's folder checked, no step taken)
        if not said_before:
            sys.stderr.flush()
            said_before.append(sys.stderr.buffer.getvalue().decode())
        return real_step(self)

    monkeypatch.setattr(train_module.Run, "optimizer_step", spy)
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "task=toy", "averager=lawa,ema", "lawa.k=10", "lawa.nu=4", "steps=16",
                                 f"out={out}"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: averager")]
    assert warnings == ["warning: averager lawa will have no weights to evaluate in this run: not ready by the end "
                        "(needs 40 steps, the run has 16)"], result.stderr
    assert warnings[0] in said_before[0]  # said before training, not after
    text = (out / "report.md").read_text()
    assert "| lawa | no evaluation of its weights: not ready by the end (needs 40 steps, the run has 16) |" in text
    assert "lawa was never scored: not ready by the end (needs 40 steps, the run has 16)." in text
    assert "| ema |" in text and "At the final evaluation (step 16) ema was " in text  # the one scored averager


def test_every_averager_ready_in_time_draws_no_warning(tmp_path, monkeypatch):
    import lawa_suite.training.loop as train_module

    reached = []  # the run was built (the warnings are said there), and stops before its first step
    monkeypatch.setattr(train_module.Run, "optimizer_step",
                        lambda self: (reached.append(1), (_ for _ in ()).throw(SystemExit(0)))[1])
    result = runner.invoke(app, ["run", "task=toy", "averager=lawa,ema,swa", "lawa.k=2", "lawa.nu=4", "steps=16",
                                 f"out={tmp_path / 'run'}"])
    assert reached and "warning: averager" not in result.stderr, result.stderr


def test_an_averager_without_evaluations_for_another_reason_still_has_its_row(tmp_path):
    # ema is ready from its first step by its settings, yet nothing scored it (a run cut short, a plugin's rule)
    run = hand_run(tmp_path, 16, {"raw": {8: 2.0, 16: 1.8}, "lawa": {8: 1.9, 16: 1.7}}, ["lawa", "ema"],
                   lawa={"k": 2, "nu": 4})
    text = write_report(run).read_text()
    assert "| ema | no evaluation of its weights: it was not ready at any evaluation | - | - |" in text


# -- item 11: no evaluation in a phase vs. an averager not ready yet ------------------------------------------

def test_a_phase_without_evaluations_is_not_called_not_averaging(tmp_path):
    # ddpm's tiny preset: 8 steps, evaluations at 4 and 8; early is (0, 2]: nothing is evaluated there
    run = hand_run(tmp_path, 8, {"raw": {4: 90.0, 8: 80.0}, "ema": {4: 85.0, 8: 82.0}, "swa": {8: 79.0}},
                   ["ema", "swa"], metric="fid_standin")
    text = write_report(run).read_text()
    assert "not averaging yet" not in text
    assert "| ema | no evaluation in this phase | +5.0000 (ahead at 1/1) | -2.0000 (ahead at 0/1) |" in text
    assert "| swa | no evaluation in this phase | not ready yet (raw alone at 1 evaluation) | +1.0000 " in text


def test_the_bench_phase_table_tells_the_two_apart_too(tmp_path):
    for seed in (0, 1):
        hand_run(tmp_path / "bench", 8, {"raw": {4: 90.0 + seed, 8: 80.0}, "ema": {4: 85.0, 8: 82.0 - seed},
                                         "swa": {8: 79.0 - seed}}, ["ema", "swa"], seed=seed)
    text = write_bench_report([tmp_path / "bench"], tmp_path / "out").read_text()
    assert "not averaging yet" not in text
    assert "| ema | no evaluation in this phase | +5.5000 [" in text
    assert "| swa | no evaluation in this phase | not ready yet | +1.5000 [" in text


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


# -- item 13: the findings say how it ended and what they rest on; a verdict needs a spread ----------------------

def test_the_findings_state_the_end_result_and_what_each_phase_rests_on(tmp_path):
    # early: one evaluation (step 10) where both averagers lead; both end behind raw at step 50
    curves = {"raw": {10: 0.50, 20: 0.60, 30: 0.70, 40: 0.80, 50: 0.90},
              "ema": {10: 0.60, 20: 0.55, 30: 0.65, 40: 0.78, 50: 0.85},
              "lawa": {10: 0.55, 20: 0.58, 30: 0.69, 40: 0.79, 50: 0.88}}
    run = hand_run(tmp_path, 50, curves, ["ema", "lawa"], metric="accuracy")
    metrics = (run / "metrics.jsonl").read_text().splitlines()
    sized = [json.dumps({**json.loads(line), "images": 1000}) for line in metrics]  # each evaluation: 1,000 images
    (run / "metrics.jsonl").write_text("\n".join(sized) + "\n")
    text = write_report(run).read_text()
    found = text.split("## What this run found")[1]
    assert "At the final evaluation (step 50) every averager was behind raw in accuracy: ema -0.0500, " \
           "lawa -0.0200." in found
    assert "Averaging helped most in the early phase (0%-25% of the steps): ema was ahead of raw at 1 of 1 " \
           "evaluations (a single evaluation), by +0.1000 accuracy on average." in found
    assert "Evaluations per phase: early 1, mid 2, late 2; each scores 1,000 held-out images." in found
    assert "final images" not in text  # what an evaluation rests on is not a metric


def test_mixed_end_results_are_each_named(tmp_path):
    run = hand_run(tmp_path, 20, {"raw": {10: 2.0, 20: 1.5}, "ema": {10: 1.9, 20: 1.4}, "lawa": {10: 1.8, 20: 1.6}},
                   ["ema", "lawa"])
    text = write_report(run).read_text()
    assert "At the final evaluation (step 20), against raw in loss: ema +0.1000 (ahead), lawa -0.1000 (behind)." \
        in text


def test_a_zero_spread_over_seeds_is_inconclusive_not_held():
    # a model at chance: two seeds, the same gain; and the same gain computed from different raw values
    assert t_interval([0.0167, 0.0167]).verdict == "inconclusive"
    assert t_interval([0.1167 - 0.1, 0.2167 - 0.2]).verdict == "inconclusive"
    assert t_interval([-0.02, -0.02, -0.02]).verdict == "inconclusive"
    assert t_interval([0.0167, 0.0168]).verdict == "held"  # any spread at all is judged as before


def test_a_bench_with_identical_seed_gains_says_inconclusive(tmp_path):
    for seed in (0, 1):  # raw differs per seed; lawa's gain is +0.0167 in both
        raw = {10: 0.1 + seed / 10, 20: 0.1 + seed / 10}
        hand_run(tmp_path / "bench", 20, {"raw": raw, "lawa": {s: v + 0.0167 for s, v in raw.items()}}, ["lawa"],
                 metric="accuracy", seed=seed, task="cifar")
    text = write_bench_report([tmp_path / "bench"], tmp_path / "out").read_text()
    assert "+0.0167 [+0.0167, +0.0167] over 2 seeds: inconclusive" in text
    assert "+0.0167 [+0.0167, +0.0167] over 2 seeds: held" not in text
