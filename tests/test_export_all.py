"""Issue "Nothing lost, nothing run, nothing silent", items 14 and 18: the image task's own PreAct-ResNet-18 exports
raw and every averager's weights as a folder whose README's lines load it; exported files get the modes a plain
open() gives; the progress bar's time-to-go leaves start-up out and its last step says it is evaluating; `suite
profile` draws EMA so its shape shows and bounds `steps`."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lawa_suite.cli import app

runner = CliRunner()


# -- item 14: every weights of the main job's model, as a folder that loads --------------------------------
@pytest.fixture(scope="module")
def preact_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("preact") / "run"
    result = runner.invoke(app, ["run", "task=cifar", "preset=tiny", "steps=8", "eval.every=4", "averager=lawa,ema,swa",
                                 "lawa.k=2", "lawa.nu=2", f"out={out}", "progress=false"])
    assert result.exit_code == 0, result.output
    return out


def readme_code(folder: Path) -> str:
    """The README's Python block, its "<this folder>" made this folder."""
    text = (folder / "README.md").read_text()
    found = re.search(r"```python\n(.*?)```", text, re.S)
    assert found, text
    return found.group(1).replace("<this folder>", str(folder))


@pytest.mark.parametrize("weights", ["raw", "lawa", "ema", "swa"])
def test_the_preact_model_exports_each_weights_with_lines_that_load_it(preact_run, tmp_path, weights):
    from lawa_suite import registry
    from lawa_suite.export import select_weights
    from lawa_suite.rundir import load_resolved

    out = tmp_path / weights
    result = runner.invoke(app, ["export", str(preact_run), f"out={out}", f"weights={weights}"])
    assert result.exit_code == 0, result.output
    assert {"model.safetensors", "config.json", "README.md"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["builder"] == "lawa_suite.tasks.cifar.PreActResNet18"
    assert config["args"] == {"num_classes": 10, "width": 4, "in_channels": 3}

    namespace: dict = {}
    exec(readme_code(out), namespace)  # the README's lines, as a reader would run them
    loaded = namespace["model"].eval()

    # the model the run scored under that name: the task's own network with the checkpoint's weights
    cfg = load_resolved(preact_run)
    task = registry.tasks.get("cifar")(cfg.task, cfg.run)
    task.setup()
    expected, _ = select_weights(preact_run, weights, cfg)
    suite_model = task.build_model().eval()
    suite_model.load_state_dict(expected)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), suite_model(x))
        from lawa_suite.export import load_model  # the one-call loader the README names
        assert torch.equal(load_model(out)(x), suite_model(x))
    if weights != "raw":  # the average, not the raw weights under its name
        raw, _ = select_weights(preact_run, "raw", cfg)
        assert any(not torch.equal(raw[k], expected[k]) for k in raw if raw[k].is_floating_point())


def test_weights_that_are_not_the_preact_network_are_refused_before_anything_is_written(tmp_path):
    from lawa_suite import registry
    from lawa_suite.config import resolve
    from lawa_suite.errors import CheckpointError
    from lawa_suite.tasks.cifar import PreActResNet18

    cfg = resolve(["task=cifar", "preset=tiny"])
    task = registry.tasks.get("cifar")(cfg.task, cfg.run)
    weights = PreActResNet18(10, 4).state_dict()
    del weights["bn.running_mean"]
    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointError, match=r"weights do not fit PreActResNet18\(num_classes=10, width=4, "
                                              r"in_channels=3\): Missing key\(s\).*bn.running_mean"):
        task.export(weights, tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())


def test_load_model_builds_only_the_suites_network_classes(tmp_path):
    """config.json names what load_model calls: a folder from elsewhere must not make it call anything else."""
    from lawa_suite.errors import ConfigError
    from lawa_suite.export import MODULE_FORMAT, load_model

    for builder, args in [("os.system", {"command": "true"}), ("lawa_suite.export.load_model", {"folder": "."}),
                          ("lawa_suite.tasks.cifar.torch.nn.Linear", {"in_features": 1, "out_features": 1}),
                          ("lawa_suite.tasks.cifar.nn", {})]:
        (tmp_path / "config.json").write_text(json.dumps({"format": MODULE_FORMAT, "builder": builder, "args": args}))
        with pytest.raises(ConfigError, match=f"builder '{re.escape(builder)}' is not a network class of lawa_suite"):
            load_model(tmp_path)


# -- item 18: the modes of exported files ---------------------------------------------------------------------
def test_exported_files_have_the_modes_a_plain_open_gives(tmp_path, monkeypatch):
    """safetensors writes its files 0600; an export's files are 0666 less the umask, as their siblings."""
    from conftest import ToyTask
    from safetensors.torch import save_file

    def export(self, weights, out: Path) -> None:  # the toy task has no format of its own: a weights file
        save_file(dict(weights), str(out / "model.safetensors"))
        (out / "notes.txt").write_text("plain open()")

    monkeypatch.setattr(ToyTask, "export", export, raising=False)
    run = tmp_path / "run"
    result = runner.invoke(app, ["run", "task=toy", "steps=4", "eval.every=4", f"out={run}"])
    assert result.exit_code == 0, result.output
    old = os.umask(0o027)
    try:
        result = runner.invoke(app, ["export", str(run), f"out={tmp_path / 'out'}", "weights=raw"])
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert modes == {"model.safetensors": 0o640, "notes.txt": 0o640, "suite-output.json": 0o640}
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750


def test_an_invalid_newest_checkpoint_is_named_when_export_takes_the_one_before(tmp_path, monkeypatch):
    """The audit: export of a run whose newest checkpoint is damaged exported the step before, exit 0, silently."""
    from conftest import ToyTask

    monkeypatch.setattr(ToyTask, "export", lambda self, weights, out: (out / "w.json").write_text("{}"),
                        raising=False)
    run = tmp_path / "run"
    result = runner.invoke(app, ["run", "task=toy", "steps=4", "eval.every=2", f"out={run}", "progress=false"])
    assert result.exit_code == 0, result.output
    newest = run / "checkpoints" / "step-00000004" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-8])
    result = runner.invoke(app, ["export", str(run), f"out={tmp_path / 'out'}"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "skipping checkpoint step-00000004" in warnings[0], result.output
    assert f"{newest}:" in warnings[0] and "truncated" in warnings[0], warnings
    assert "step-00000002 (raw)" in result.output.splitlines()[-1], result.output


# -- item 18: the progress bar ---------------------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def eta_of(bar) -> float | None:
    found = re.search(r"eta (\d+):(\d+)", bar.bar.postfix or "")
    return None if found is None else int(found.group(1)) * 60 + int(found.group(2))


def test_the_time_to_go_leaves_the_start_up_step_out(monkeypatch):
    """A 4-minute run (800 steps of 0.3 s) whose first step pays 60 s of start-up: after a few steps the
    time-to-go is about 4 minutes, not a quarter of an hour."""
    from lawa_suite.training import progress

    clock = FakeClock()
    monkeypatch.setattr(progress, "time", clock)
    bar = progress.ProgressBar(800, 0, 1000, "toy", enabled=False)
    clock.now += 60.0
    bar.stepped(1, 1.0, 0.1)
    for step in range(2, 6):
        clock.now += 0.3
        bar.stepped(step, 1.0, 0.1)
    assert eta_of(bar) == pytest.approx(795 * 0.3, abs=1)
    # a slow step now and then (a busy moment) barely moves it
    clock.now += 5.0
    bar.stepped(6, 1.0, 0.1)
    assert eta_of(bar) == pytest.approx(794 * 0.3, abs=1)


def test_the_bar_says_it_is_evaluating_and_counts_that_evaluation(monkeypatch):
    from lawa_suite.training import progress

    clock = FakeClock()
    monkeypatch.setattr(progress, "time", clock)
    bar = progress.ProgressBar(20, 0, 10, "toy", enabled=False)
    for step in range(1, 10):
        clock.now += 1.0
        bar.stepped(step, 1.0, 0.1)
        assert "evaluating" not in bar.bar.postfix
    clock.now += 1.0
    bar.stepped(10, 1.0, 0.1)  # an evaluation follows this step
    assert "evaluating" in bar.bar.postfix
    clock.now += 30.0
    bar.evaluated(30.0, "scores")
    assert "evaluating" not in bar.bar.postfix and eta_of(bar) == 10 + 30  # ten steps and the final evaluation
    for step in range(11, 21):
        clock.now += 1.0
        bar.stepped(step, 1.0, 0.1)
    # the last step: the bar is full, and says the final evaluation is what it waits for, and how long it takes
    assert "evaluating" in bar.bar.postfix and eta_of(bar) == 30
    bar.evaluated(30.0, "scores")
    assert "evaluating" not in bar.bar.postfix
    bar.close()


# -- item 18: suite profile -------------------------------------------------------------------------------------
def test_suite_profile_draws_ema_on_a_scale_that_shows_its_shape(tmp_path, monkeypatch):
    """EMA's first step holds decay**T of the weight (0.999**999 = 0.37 over 1,000 steps): a linear axis draws that
    spike and leaves the exponential rise of the other 63% as a flat line at its foot."""
    import numpy as np

    import lawa_suite.averagers.weight_profiles as profiles

    figures = []
    real_save = profiles.save
    monkeypatch.setattr(profiles, "save", lambda fig, path, **kw: figures.append(fig) or real_save(fig, path, **kw))
    result = runner.invoke(app, ["profile", "averager=lawa,ema,swa", "steps=1000", f"out={tmp_path / 'p.png'}"])
    assert result.exit_code == 0, result.output
    panels = {ax.get_title().split("\n")[0]: ax for ax in figures[0].axes if ax.get_title()}
    ema = panels["ema"]
    assert ema.get_yscale() == "log"
    late = 1000 * 0.001 * 0.999 ** np.arange(999, 0, -1)  # density of steps 2..1000, per unit t/T
    assert ema.get_ylim()[0] < late.min() and "log scale" in ema.get_ylabel()
    assert panels["lawa"].get_yscale() == panels["swa"].get_yscale() == "linear"  # nothing hidden there


def test_suite_profile_bounds_steps(tmp_path):
    """(A billion steps would run for hours: every step is observed.)"""
    result = runner.invoke(app, ["profile", "averager=ema", "steps=100001", f"out={tmp_path / 'p.png'}"],
                           catch_exceptions=False)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: steps: expected an integer in 1..100000, got 100001"]
