"""A run folder says what its metrics mean (metrics-meta.json, written as the run starts), and a run saved before the
suite gained a key resumes: the key counts as the value it was added with (rundir.ADDED_KEYS)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from lawa_suite import registry, rundir
from lawa_suite.training import loop as train_module
from lawa_suite.config import ConfigError, resolve
from lawa_suite.errors import DamagedFile
from lawa_suite.evaluators.base import Evaluator
from lawa_suite.training.loop import train

from conftest import SimulatedCrash, ToyTask


def run_toy(out: Path, *overrides: str):
    return train(resolve(["task=toy", f"out={out}", "steps=8", "eval.every=4", "averager=ema", *overrides]))


# -- what the metrics mean --------------------------------------------------------------------------------------
def test_a_run_records_its_evaluators_metric_directions_headline_first(tmp_path):
    run_toy(tmp_path / "run")
    meta = rundir.read_metrics_meta(tmp_path / "run")
    assert meta == {"evaluator": "accuracy", "metrics": {"accuracy": "max", "loss": "min"}, "notes": {}}
    assert list(meta["metrics"]) == ["accuracy", "loss"]  # the headline first, as the evaluator lists them
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert "metrics" not in config  # the user's settings stay only the settings


class Bleu(Evaluator):
    """A plugin's metric the report's table does not know, whose direction a name-based guess gets wrong."""

    name = "bleu_eval"
    metrics: ClassVar[dict[str, str]] = {"bleu": "max", "ter": "min"}
    notes: ClassVar[dict[str, str]] = {"bleu": "sacrebleu's corpus BLEU on 64 held-out sentences"}

    def evaluate(self, model, batches, accelerator=None) -> dict[str, float]:
        return {"bleu": 1.0, "ter": 0.5}


@pytest.fixture
def bleu_toy(monkeypatch):
    registry.evaluators.register("bleu_eval")(Bleu)
    monkeypatch.setattr(ToyTask, "evaluator", "bleu_eval")
    yield
    registry.evaluators._builtins.pop("bleu_eval", None)


def test_a_plugin_evaluators_metrics_and_notes_are_recorded(tmp_path, bleu_toy):
    run_toy(tmp_path / "run")
    meta = rundir.read_metrics_meta(tmp_path / "run")
    assert meta == {"evaluator": "bleu_eval", "metrics": {"bleu": "max", "ter": "min"}, "notes": Bleu.notes}
    records = rundir.read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert {r["bleu"] for r in records if r["split"] == "val"} == {1.0}  # the records it describes


def test_the_report_reads_a_plugins_directions_and_notes_from_the_run(tmp_path, bleu_toy):
    from lawa_suite.report.curves import metric_directions

    run_toy(tmp_path / "run")
    assert metric_directions("toy", tmp_path / "run") == {"bleu": "max", "ter": "min"}  # not a guess from the name
    assert metric_directions("toy") == {}  # the report's own table knows no such task
    assert "sacrebleu's corpus BLEU on 64 held-out sentences" in (tmp_path / "run" / "report.md").read_text()


def test_a_run_made_before_runs_recorded_it_reads_as_none(tmp_path):
    run_toy(tmp_path / "run")
    (tmp_path / "run" / rundir.METRICS_META_FILE).unlink()
    assert rundir.read_metrics_meta(tmp_path / "run") is None


@pytest.mark.parametrize(("text", "error", "needle"), [
    ('{"format": "lawa-suite-metrics-meta/1", "metrics": {"acc', DamagedFile, "is not JSON"),
    ('{"format": "lawa-suite-metrics-meta/1", "metrics": {"acc": "higher"}}', ConfigError, "'max' or 'min'"),
    ('{"metrics": {"acc": "max"}}', ConfigError, "expected format lawa-suite-metrics-meta/1"),
    ('[1, 2]', ConfigError, "not a lawa-suite metrics record"),
])
def test_a_damaged_or_foreign_record_is_one_line_naming_it(tmp_path, text, error, needle):
    (tmp_path / rundir.METRICS_META_FILE).write_text(text)
    with pytest.raises(error, match=needle) as info:
        rundir.read_metrics_meta(tmp_path)
    assert "\n" not in str(info.value) and str(tmp_path / rundir.METRICS_META_FILE) in str(info.value)


def test_a_run_that_stopped_before_its_first_step_may_start_again_there(tmp_path, monkeypatch):
    def no_log(*args: Any, **kwargs: Any):
        raise SimulatedCrash("stopped before the first step")
    monkeypatch.setattr(train_module, "MetricsLog", no_log)
    with pytest.raises(SimulatedCrash):
        run_toy(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.yaml", "metrics-meta.json"]
    monkeypatch.undo()
    assert run_toy(tmp_path / "run").step == 8


# -- keys added since a run was saved ------------------------------------------------------------------------------
def saved_before_the_keys(out: Path, *dropped: str) -> None:
    """Make ``out``'s config.yaml as a run of an older suite saved it: without the sections or keys ``dropped``."""
    path = out / "config.yaml"
    config = yaml.safe_load(path.read_text())
    for key in dropped:
        section, _, name = key.partition(".")
        if name:
            del config[section][name]
        else:
            del config[section]
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def test_a_run_saved_before_tf32_and_schedulefree_existed_resumes(tmp_path):
    from typer.testing import CliRunner

    from lawa_suite.cli import app

    out = tmp_path / "run"
    ToyTask.crash_at = 6
    with pytest.raises(SimulatedCrash):
        run_toy(out, "checkpoint.every=4")
    ToyTask.crash_at = None
    saved_before_the_keys(out, "tf32", "deterministic", "schedulefree")
    # `suite run out=... resume=auto` continues it as it ran: tf32 off (PyTorch's defaults, before the key existed)
    result = CliRunner().invoke(app, ["run", "task=toy", f"out={out}", "resume=auto", "progress=false"])
    assert result.exit_code == 0, result.output
    resumed = [r["step"] for r in rundir.read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    assert resumed == list(range(1, 9))  # continued from step 4's checkpoint


def test_a_missing_key_is_the_value_it_was_added_with_not_any_value(tmp_path):
    out = tmp_path / "run"
    run_toy(out)
    saved_before_the_keys(out, "tf32")
    with pytest.raises(ConfigError, match=r"differs from the saved run's in tf32;"):
        run_toy(out, "resume=auto", "tf32=true")  # the old run computed without the tf32 switch: true is a change
    assert run_toy(out, "resume=auto", "tf32=false").step == 8  # the value it was added with is no change


def test_the_report_and_resume_read_one_table():
    from lawa_suite.report import meaning

    assert meaning.ADDED_KEYS is rundir.ADDED_KEYS or meaning.ADDED_KEYS == rundir.ADDED_KEYS
    saved = {"task": "toy", "lr": 0.1}
    assert rundir.with_added_keys("toy", saved)["schedulefree.r"] == 0.0
    assert "gpt2.optimizer" not in rundir.with_added_keys("toy", saved)  # another task's key
    assert json.loads(json.dumps(rundir.ADDED_KEYS))  # plain values: a table a report can print


def test_numbers_beside_the_metrics_are_not_curves(tmp_path):
    # FID's fid_samples (how many samples a score drew) sits beside the scores in metrics.jsonl: not a metric
    from lawa_suite.report.curves import load_metrics

    run = tmp_path / "run"
    run.mkdir()
    rundir.write_metrics_meta(run, "fid", {"fid_standin": "min", "loss": "min"}, {})
    (run / "metrics.jsonl").write_text(json.dumps({"step": 5, "weights": "raw", "split": "val", "fid_standin": 90.0,
                                                   "loss": 0.1, "fid_samples": 512}) + "\n")
    curves, _ = load_metrics(run / "metrics.jsonl")
    assert set(curves["raw"]) == {"fid_standin", "loss"}
    (run / "metrics-meta.json").unlink()  # a run from before runs recorded their metrics: every number, as before
    assert "fid_samples" in load_metrics(run / "metrics.jsonl")[0]["raw"]

