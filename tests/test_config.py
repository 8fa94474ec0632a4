"""Config resolution: defaults, presets, typed overrides, and one-line errors that name the key."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from lawa_suite.cli import app
from lawa_suite.config import ConfigError, resolve


def test_preset_then_overrides():
    cfg = resolve(["task=toy", "lr=1e-3", "lawa.k=7", "averager=lawa,ema", "data=synthetic", "hidden=32"])
    assert cfg.run.lr == 1e-3 and isinstance(cfg.run.lr, float)
    assert cfg.run.steps == 20 and cfg.run.preset == "tiny"          # from the toy preset
    assert cfg.averagers["lawa"].k == 7 and cfg.averagers["lawa"].nu == 2
    assert list(cfg.averagers) == ["lawa", "ema"]
    assert cfg.task.hidden == 32                                     # a bare task key reaches the task
    assert cfg.run.data.source == "synthetic" and cfg.run.data.cache
    text = cfg.to_yaml()
    assert "toy:" in text and "lawa:" in text and "k: 7" in text


def test_no_averager_is_allowed():
    assert resolve(["task=toy", "averager="]).averagers == {}


@pytest.mark.parametrize("override, expected", [
    (["lawa.k=abc"], "lawa.k"),
    (["lawa.k=0"], "lawa.k: expected an integer >= 1"),
    (["lawa.kk=3"], "did you mean 'lawa.k'"),
    (["lawa.store=gpu"], "lawa.store: expected one of cpu, disk"),
    (["averager=lawa", "ema.decay=0.9"], "ema.decay: averager 'ema' is not selected"),
    (["ema.decay=1.5"], "ema.decay"),
    (["steps=-1"], "steps: expected an integer >= 1"),
    (["steps=ten"], "steps: expected an integer, got 'ten'"),
    (["lr=fast"], "lr: expected a number, got 'fast'"),
    (["progress=maybe"], "progress: expected true or false, got 'maybe'"),
    (["trackers=tensorbord"], "trackers: unknown tracker 'tensorbord'; known: "),
    (["trackers=tensorbord"], "did you mean 'tensorboard'?"),
    (["checkpoint.every=-1"], "checkpoint.every: expected an integer >= 0 (0 = only at the end; unset = every"),
    (["schedule=exp"], "schedule: expected one of cosine, constant, linear"),
    (["averager=lawa,lawa"], "averager: expected distinct names"),
    (["averager=lawz"], "unknown averager 'lawz'"),
    (["task=gpt9"], "unknown task 'gpt9'"),
    (["preset=huge"], "has no preset 'huge'"),
    (["data=imagenet"], "data: task 'toy' reads synthetic"),
    (["batch_size=10", "grad_accum=3"], "grad_accum: expected a divisor of batch_size=10"),
    (["warmup=50"], "warmup: expected an integer in [0, steps=20)"),
    (["lr"], "expected key=value"),
    (["lr=1", "lr=2"], "lr: given twice"),
    (["mixed_precision=fp8"], "mixed_precision: expected one of no, bf16, fp16"),
    (["eval.every=0"], "eval.every: expected an integer >= 1"),
])
def test_bad_input_names_the_key(override, expected):
    args = override if any(o.startswith("task=") for o in override) else ["task=toy", *override]
    with pytest.raises(ConfigError) as err:
        resolve(args)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "task=toy", "lawa.k=abc", f"out={out}"])
    assert result.exit_code == 2
    assert "lawa.k" in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_dry_run_prints_resolved_config(tmp_path):
    result = CliRunner().invoke(app, ["run", "task=toy", "lawa.k=4", f"out={tmp_path / 'r'}", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "k: 4" in result.output and "task: toy" in result.output
    assert not (tmp_path / "r").exists()


def test_help_does_not_import_torch():
    # `suite --help` must stay fast: the CLI module may not pull in torch (or anything heavy) at import.
    code = ("import sys, lawa_suite.cli; heavy = [m for m in ('torch', 'numpy', 'accelerate') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_saved_config_round_trips_exactly(tmp_path):
    """A saved config.yaml re-resolves to the same config: its strings are not re-parsed ('' stays '', 'no' stays
    'no', '1e-3'-like strings stay strings), while command-line overrides on top still are."""
    from lawa_suite.config import dotted
    from lawa_suite.rundir import load_resolved

    cfg = resolve(["task=toy", "mixed_precision=no", "resume=", "averager=lawa,ema", "lawa.k=3", f"out={tmp_path}"])
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    again = load_resolved(tmp_path)
    assert again.as_dict() == cfg.as_dict()
    assert again.run.mixed_precision == "no" and again.run.resume == ""
    on_top = resolve(["lawa.k=4"], base=dotted(cfg.as_dict()))
    assert on_top.averagers["lawa"].k == 4 and on_top.run.mixed_precision == "no"


def test_a_tracker_that_is_not_installed_stops_before_any_work(monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^trackers: wandb is not installed; pip install wandb \(or drop it"):
        resolve(["task=toy", "trackers=wandb"])


def test_checkpoints_follow_evaluations_unless_told_otherwise():
    assert resolve(["task=toy", "eval.every=7"]).run.checkpoint.every == 7  # a crash loses one evaluation at most
    assert resolve(["task=toy", "eval.every=7", "checkpoint.every=0"]).run.checkpoint.every == 0  # only the end
    assert resolve(["task=toy", "checkpoint.every=3"]).run.checkpoint.every == 3


def test_a_saved_config_runs_again_as_it_is_with_words_on_top(tmp_path):
    first = resolve(["task=toy", "lawa.k=4", "lr=0.02", f"out={tmp_path / 'a'}"])
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.yaml").write_text(first.to_yaml())
    result = CliRunner().invoke(app, ["run", f"config={tmp_path / 'a'}", f"out={tmp_path / 'b'}", "seed=3",
                                      "--dry-run"])
    assert result.exit_code == 0, result.output
    again = yaml.safe_load(result.output)
    assert again["lawa"]["k"] == 4 and again["lr"] == 0.02 and again["seed"] == 3
    assert again["out"] == str(tmp_path / "b")
    missing = CliRunner().invoke(app, ["run", f"config={tmp_path / 'nope.yaml'}", "--dry-run"])
    assert missing.exit_code == 2 and "nope.yaml not found" in missing.output
