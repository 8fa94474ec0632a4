"""Trajectory analysis: the linear path between two checkpoints, the disagreement rate, and scoring outside a run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lawa_suite.evaluation import AnalysisError, Evaluation, eval_config, interpolate, lmc
from lawa_suite.cli import app
from lawa_suite.config import ConfigError, resolve
from lawa_suite.training.loop import train

runner = CliRunner()


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    """A 20-step toy run with weight snapshots at steps 10 and 20."""
    out = tmp_path_factory.mktemp("analysis") / "run"
    train(resolve(["task=toy", f"out={out}", "trajectory.every=10", "eval.every=10", "averager=lawa"]))
    return out


def snapshot(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "trajectory" / f"step-{step:08d}.safetensors"))


def test_interpolate_is_exact_at_the_ends_and_linear_between():
    a = {"w": torch.tensor([1.0, -2.0]), "h": torch.tensor([3.0], dtype=torch.bfloat16), "n": torch.tensor(7)}
    b = {"w": torch.tensor([3.0, 2.0]), "h": torch.tensor([1.0], dtype=torch.bfloat16), "n": torch.tensor(1)}
    assert all(torch.equal(interpolate(a, b, 1.0)[k], a[k]) for k in a)
    assert all(torch.equal(interpolate(a, b, 0.0)[k], b[k]) for k in a)
    mid = interpolate(a, b, 0.25)
    assert torch.equal(mid["w"], torch.tensor([2.5, 1.0])) and mid["h"].dtype == torch.bfloat16
    assert mid["h"].item() == 1.5 and mid["n"].item() == 1  # integers: from the nearer end (B at 0.25)
    with pytest.raises(AnalysisError, match=r"key w: A is \[2\] torch.float32, B is \[3\]"):
        interpolate(a, {**b, "w": torch.zeros(3)}, 0.5)


def test_a_checkpoint_against_itself_has_no_barrier_and_no_disagreement(toy_run):
    evaluation = Evaluation(eval_config(toy_run))
    a = snapshot(toy_run, 20)
    result = lmc(evaluation, a, a, points=3)
    assert result["alphas"] == [0.0, 0.5, 1.0]
    assert result["barrier"] == {"accuracy": 0.0, "loss": 0.0}
    assert result["disagreement"] == {"rate": 0.0, "predictions": 64}
    assert result["recalibrated"]  # the toy model has BatchNorm: every point gets fresh statistics


def test_the_path_between_two_checkpoints(toy_run):
    evaluation = Evaluation(eval_config(toy_run, ["eval.bn_batches=2"]))
    a, b = snapshot(toy_run, 20), snapshot(toy_run, 10)
    result = lmc(evaluation, a, b, points=6)
    assert result["alphas"] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    rows = result["rows"]
    assert rows[-1] == {"alpha": 1.0, **evaluation.score(a, recalibrate=True)}  # alpha weights A
    assert rows[0] == {"alpha": 0.0, **evaluation.score(b, recalibrate=True)}
    worst = max(r["loss"] - (r["alpha"] * rows[-1]["loss"] + (1 - r["alpha"]) * rows[0]["loss"]) for r in rows)
    assert result["barrier"]["loss"] == pytest.approx(max(0.0, worst))
    # disagreement: arg-max predictions of the raw checkpoints (as saved), compared example by example
    with torch.no_grad():
        preds = []
        for weights in (a, b):
            evaluation.model.load_state_dict(weights)
            evaluation.model.eval()
            preds.append(torch.cat([evaluation.model(x).argmax(-1) for x, _ in evaluation.batches]))
    expected = float((preds[0] != preds[1]).double().mean())
    assert result["disagreement"]["rate"] == pytest.approx(expected) and result["disagreement"]["predictions"] == 64


def test_predictions_come_from_the_task_or_the_reason_is_given(toy_run, monkeypatch):
    evaluation = Evaluation(eval_config(toy_run))
    a, b = snapshot(toy_run, 20), snapshot(toy_run, 10)
    evaluation.task.predictions = lambda model, batch: torch.zeros(len(batch[1]), dtype=torch.long)
    assert lmc(evaluation, a, b, points=2)["disagreement"]["rate"] == 0.0  # the task's own predictions win
    del evaluation.task.predictions
    evaluation.task.logits_and_targets = None
    with pytest.raises(AnalysisError, match=r"task 'toy' defines neither predictions\(model, batch\) nor "
                                             r"logits_and_targets\(model, batch\)"):
        evaluation.predictor()
    monkeypatch.setattr(Evaluation, "predictions", lambda self, w: (_ for _ in ()).throw(AnalysisError("no way")))
    del evaluation.task.logits_and_targets
    assert lmc(evaluation, a, b, points=2)["disagreement"] == {"rate": None, "why": "no way"}


def test_weights_that_do_not_fit_the_model_are_one_line_errors(toy_run):
    evaluation = Evaluation(eval_config(toy_run))
    a = snapshot(toy_run, 20)
    with pytest.raises(AnalysisError, match=r"missing 0.weight; unexpected stray"):
        evaluation.score({**{k: v for k, v in a.items() if k != "0.weight"}, "stray": torch.zeros(1)}, False)


def test_eval_config_comes_from_the_run_or_from_task(toy_run, tmp_path):
    cfg = eval_config(toy_run / "trajectory", ["eval.batches=1"])
    assert cfg.run.task == "toy" and cfg.run.eval.batches == 1 and cfg.run.averager == ["lawa"]
    assert eval_config(tmp_path, ["task=toy"]).run.task == "toy"
    with pytest.raises(ConfigError, match=r"task: no run config.yaml at .* pass task=<name>"):
        eval_config(tmp_path)


def test_eval_of_one_run_checkpoint_says_what_it_is_with_or_without_out(toy_run, tmp_path):
    """The audit: with out= it was "a suite average output, scored in place", without "not a suite average output"
    (any folder holding a manifest.json counted as an average output)."""
    checkpoint = toy_run / "checkpoints" / "step-00000020"
    for words in ([], [f"out={tmp_path / 'scores'}"]):
        result = runner.invoke(app, ["eval", str(checkpoint), *words])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, result.output
        assert lines[0].startswith(f"error: {checkpoint}: one checkpoint of a run"), lines[0]
        assert "not a suite average output nor a folder of checkpoints" in lines[0], lines[0]
        assert f"pass {checkpoint.parent}" in lines[0], lines[0]
    assert not (tmp_path / "scores").exists()
    # an average output is told by what suite average writes, and out= is refused for it as before
    avg = tmp_path / "avg"
    assert runner.invoke(app, ["average", str(toy_run), "averager=ema", f"out={avg}"]).exit_code == 0
    result = runner.invoke(app, ["eval", str(avg), f"out={tmp_path / 'scores'}"])
    assert result.exit_code == 2 and "is a suite average output, scored in place" in result.output, result.output


def test_cli_analyze_lmc(toy_run, tmp_path):
    a, b = toy_run / "trajectory" / "step-00000020.safetensors", toy_run / "trajectory" / "step-00000010.safetensors"
    out = tmp_path / "lmc"
    result = runner.invoke(app, ["analyze", "lmc", str(a), str(b), "points=3", f"out={out}"])
    assert result.exit_code == 0, result.output
    assert "| alpha | accuracy | loss |" in result.output and "disagreement of A and B:" in result.output
    said = r"predict differently on \d+ of \d+ held-out predictions \(\d+\.\d%\)"
    assert re.search(said, result.output), result.output
    saved = json.loads((out / "lmc.json").read_text())
    assert saved["alphas"] == [0.0, 0.5, 1.0] and saved["a"] == str(a)
    assert (out / "lmc.png").stat().st_size > 0 and "barrier" in (out / "lmc.md").read_text()
    again = runner.invoke(app, ["analyze", "lmc", str(a), str(b), f"out={out}"])
    assert again.exit_code == 2 and "not empty" in again.output
    bad = runner.invoke(app, ["analyze", "lmc", str(a), str(b), "points=1", f"out={tmp_path / 'x'}"])
    assert bad.exit_code == 2 and "points: expected an integer >= 2" in bad.output
    stray = tmp_path / "stray.safetensors"
    stray.write_bytes(a.read_bytes())
    orphan = runner.invoke(app, ["analyze", "lmc", str(stray), str(b), f"out={tmp_path / 'y'}"])
    assert orphan.exit_code == 2 and "pass task=<name>" in orphan.output
