"""`suite eval` and `suite export` of a schedule-free run (`optimizer=schedulefree`): the raw weights are the eval
sequence x the run scored as raw (a checkpoint's model.safetensors holds the training sequence y), and their output
says which sequence they used; a trajectory file (y, no optimizer state) is scored as y and said to be."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lawa_suite.cli import app
from lawa_suite.config import resolve
from lawa_suite.training.loop import train

from helpers import raw_scores, restored, sf_run

runner = CliRunner()


@pytest.fixture(scope="module", params=["gpt2", "cifar"])
def sf(request, tmp_path_factory) -> tuple[object, Path]:
    """A 4-step schedule-free run with checkpoints and trajectory files at steps 2 and 4 (cifar: BatchNorm)."""
    out = tmp_path_factory.mktemp(f"sf-{request.param}") / "run"
    cfg = resolve(sf_run(request.param, out, "trajectory.every=2"))
    train(cfg)
    return cfg, out


def x_by_hand(cfg, out: Path, step: int) -> dict[str, torch.Tensor]:
    """The eval sequence at ``step``: the package's own eval() on a model and optimizer rebuilt from the checkpoint."""
    _, model, optimizer = restored(cfg, out, step)
    optimizer.eval()
    return model.state_dict()


def eval_records(out: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if r["weights"] == "raw"}


def test_eval_of_the_checkpoints_scores_x_as_the_run_did(sf, tmp_path):
    cfg, run = sf
    out = tmp_path / "scores"
    result = runner.invoke(app, ["eval", str(run / "checkpoints"), f"out={out}"])
    assert result.exit_code == 0, result.output
    logged, scored = raw_scores(run), eval_records(out)
    metrics = [m for m in scored[4] if m not in ("step", "weights", "split")]
    for step in (2, 4):
        assert {m: scored[step][m] for m in metrics} == {m: logged[step][m] for m in metrics}, step
    assert "raw: the schedule-free eval sequence x" in result.output
    assert "- raw: the schedule-free eval sequence x" in (out / "report.md").read_text()


def test_eval_of_the_trajectory_scores_y_and_says_so(sf, tmp_path):
    cfg, run = sf
    out = tmp_path / "scores"
    result = runner.invoke(app, ["eval", str(run / "trajectory"), f"out={out}"])
    assert result.exit_code == 0, result.output
    assert "raw: the schedule-free training sequence y" in result.output
    assert "- raw: the schedule-free training sequence y" in (out / "report.md").read_text()
    headline = "loss"
    assert eval_records(out)[4][headline] != raw_scores(run)[4][headline], "y scores otherwise than x: a real check"


def test_export_of_the_raw_weights_ships_x(sf, tmp_path):
    from lawa_suite.export import select_weights

    cfg, run = sf
    expected = x_by_hand(cfg, run, 4)
    weights, description = select_weights(run, "raw", cfg)
    assert description.endswith("(raw: the schedule-free eval sequence x)")
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    y = load_file(str(run / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert any(not torch.equal(y[k], expected[k]) for k in y if y[k].is_floating_point()), "x is not y: a real check"
    assert torch.equal(y[next(iter(y))], load_file(str(run / "checkpoints" / "step-00000004" /
                                                       "model.safetensors"))[next(iter(y))])  # the file is as saved
    if cfg.run.task == "cifar":  # the suite's own model folder: its weights file is x, key for key
        out = tmp_path / "export"
        result = runner.invoke(app, ["export", str(run), f"out={out}"])
        assert result.exit_code == 0, result.output
        assert "eval sequence x" in result.output
        shipped = load_file(str(out / "model.safetensors"))
        assert all(torch.equal(shipped[k], expected[k]) for k in expected)
    trajectory = run / "trajectory" / "step-00000004.safetensors"
    assert "training sequence y" in select_weights(trajectory, "raw", cfg)[1]


def test_lmc_between_checkpoints_says_it_runs_through_y(sf, tmp_path):
    _, run = sf
    a, b = run / "checkpoints" / "step-00000002", run / "checkpoints" / "step-00000004"
    result = runner.invoke(app, ["analyze", "lmc", str(a), str(b), "points=2", f"out={tmp_path / 'lmc'}"])
    assert result.exit_code == 0, result.output
    assert result.output.count("a schedule-free run's checkpoint; the path runs through its training sequence y") == 2


def test_x_from_a_checkpoint_with_another_optimizers_config_is_one_line(sf, tmp_path):
    from lawa_suite import registry
    from lawa_suite.errors import CheckpointError
    from lawa_suite.export import EvalWeights

    cfg, run = sf
    other = resolve([f"task={cfg.run.task}", "preset=tiny", f"out={tmp_path / 'x'}"])  # the task's default optimizer
    task = registry.tasks.get(other.run.task)(other.task, other.run)
    task.setup()
    folder = run / "checkpoints" / "step-00000004"
    with pytest.raises(CheckpointError, match="holds a schedule-free optimizer's state, but the config in use builds"):
        EvalWeights(task, other.run.lr)(folder, load_file(str(folder / "model.safetensors")))
