"""The CLI through Typer's runner: run, list, report, verify, and exit codes."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from lawa_suite.cli import app

runner = CliRunner()


def test_run_report_verify(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "task=toy", f"out={out}", "steps=6", "eval.every=3", "trackers=tensorboard"])
    assert result.exit_code == 0, result.output
    assert "done: 6 steps" in result.output
    assert list(out.rglob("events.out.tfevents.*")), "the tensorboard tracker wrote nothing"
    (out / "report.md").unlink()
    again = runner.invoke(app, ["report", str(out)])
    assert again.exit_code == 0 and (out / "report.md").exists()
    verified = runner.invoke(app, ["verify", str(out / "checkpoints")])
    assert verified.exit_code == 0 and "step-00000006: ok" in verified.output


def test_report_refuses_a_non_run(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "not a run directory" in result.output


def test_list_shows_what_is_available():
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0, result.output
    for expected in ("tasks:", "cifar", "presets: tiny, cpu, paper", "averagers:", "lawa", "ema", "swa",
                     "evaluators:", "accuracy", "built-in lawa_suite.averagers.lawa"):
        assert expected in result.output


def test_cifar_tiny_end_to_end(tmp_path):
    # The example: seconds on CPU, and LAWA (k=3, nu=5) is ready and scored before the end.
    out = tmp_path / "cifar"
    result = runner.invoke(app, ["run", "task=cifar", "averager=lawa", "preset=tiny", "lawa.k=3", "lawa.nu=5",
                                 f"out={out}", f"data.cache={tmp_path / 'cache'}", "progress=false"])
    assert result.exit_code == 0, result.output
    import json
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lawa = [r for r in evals if r.get("weights") == "lawa"]
    assert lawa and lawa[0]["step"] == 16 and 0 <= lawa[0]["accuracy"] <= 1
    assert "| lawa |" in (out / "report.md").read_text()


def test_verify_accepts_a_run_folder(tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, ["run", "task=toy", f"out={out}", "steps=6", "eval.every=3"]).exit_code == 0
    verified = runner.invoke(app, ["verify", str(out)])
    assert verified.exit_code == 0, verified.output
    assert "step-00000003: ok" in verified.output and "step-00000006: ok" in verified.output


def test_resume_from_a_missing_checkpoint_says_so(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "task=toy", f"out={out}", f"resume={tmp_path / 'nowhere'}"])
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert "nowhere does not exist" in line and "resume=auto" in line and "never committed" not in line


def test_a_process_of_a_distributed_run_ends_without_interpreter_finalization(monkeypatch, capsys):
    """Under torchrun (WORLD_SIZE > 1) `suite` runs its exit handlers, flushes and leaves with os._exit: finalizing
    the interpreter let C++ threads abort a finished process now and then (cli.end_process)."""
    import atexit
    import os

    from lawa_suite import cli

    class Exited(Exception):
        pass

    calls = []
    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: calls.append("exit handlers"))
    monkeypatch.setattr(os, "_exit", lambda code: (calls.append(code), (_ for _ in ()).throw(Exited())))
    monkeypatch.setenv("WORLD_SIZE", "2")
    for argv, code in ((["suite", "--help"], 0), (["suite", "run", "nope=1"], 2)):
        monkeypatch.setattr("sys.argv", argv)
        with pytest.raises(Exited):
            cli.main()
        assert calls[-2:] == ["exit handlers", code]
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr("sys.argv", ["suite", "--help"])
    with pytest.raises(SystemExit):  # one process: the ordinary exit
        cli.main()


def test_resume_auto_alone_reads_the_saved_config_and_checks_words_against_it(tmp_path):
    out = tmp_path / "run"
    words = ["task=cifar", "preset=tiny", "steps=2", "warmup=0", "averager=lawa,swa", "lawa.k=2", "lawa.nu=1",
             "eval.every=2", "progress=false", f"out={out}"]
    assert runner.invoke(app, ["run", *words]).exit_code == 0
    again = runner.invoke(app, ["run", f"out={out}", "resume=auto"])
    assert again.exit_code == 0, again.output  # (was: refused, naming keys never given and suggesting a reset)
    changed = runner.invoke(app, ["run", f"out={out}", "resume=auto", "lr=0.5"])
    assert changed.exit_code == 2 and "differs from the saved run's in lr;" in changed.output
    assert "reset_averagers" not in changed.output and len(changed.output.strip().splitlines()) == 1


def test_resuming_another_models_checkpoint_is_one_line(tmp_path):
    words = ["task=cifar", "preset=tiny", "steps=2", "warmup=0", "averager=", "progress=false"]
    assert runner.invoke(app, ["run", *words, f"out={tmp_path / 'narrow'}"]).exit_code == 0
    checkpoint = next((tmp_path / "narrow" / "checkpoints").iterdir())
    wider = runner.invoke(app, ["run", *words, "cifar.width=8", f"out={tmp_path / 'wide'}", f"resume={checkpoint}"])
    lines = wider.output.strip().splitlines()
    assert wider.exit_code == 1 and "Traceback" not in wider.output, wider.output  # (was load_state_dict's)
    assert lines[-1].startswith("error: resume: ") and "holds another model's state (saved by task cifar;" in lines[-1]


@pytest.mark.parametrize("task, what", [("cifar", "examples"), ("ddpm", "examples"), ("gpt2", "sequences")])
def test_a_batch_larger_than_the_data_is_one_line_and_creates_nothing(tmp_path, task, what):
    # cifar's was a ValueError traceback; gpt2's a MemoryError traceback or the kernel's kill (exit 137) at the
    # first step, after config.yaml, metrics-meta.json and metrics.jsonl were written
    result = runner.invoke(app, ["run", f"task={task}", "preset=tiny", "batch_size=1000000000", "averager=",
                                 f"out={tmp_path / 'run'}"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert lines[-1].startswith(f"error: batch_size: a micro-batch of 1000000000 {what}"), lines[-1]
    assert "holds" in lines[-1] or "larger than the training set" in lines[-1]  # says what the data holds
    assert not (tmp_path / "run").exists()


def test_suite_run_alone_says_what_it_starts(monkeypatch):
    import lawa_suite.training.loop as train_module

    monkeypatch.setattr(train_module, "train", lambda cfg: (_ for _ in ()).throw(SystemExit(0)))
    result = runner.invoke(app, ["run"])
    assert "suite run with no settings: task=cifar" in result.stderr and "--dry-run" in result.stderr, result.stderr


def test_a_resume_that_finds_no_run_says_it_starts_the_default_run(tmp_path, monkeypatch):
    # out= mistyped: resume=auto there quietly started the default 500-step cifar job
    import lawa_suite.training.loop as train_module

    monkeypatch.setattr(train_module, "train", lambda cfg: (_ for _ in ()).throw(SystemExit(0)))
    result = runner.invoke(app, ["run", f"out={tmp_path / 'typo'}", "resume=auto"])
    said = result.stderr
    assert f"{tmp_path / 'typo'} holds no run yet" in said and "task=cifar preset=cpu" in said, said
    assert "--dry-run" in said
    chosen = runner.invoke(app, ["run", f"out={tmp_path / 'typo'}", "resume=auto", "task=toy"])
    assert "holds no run yet" not in chosen.stderr  # settings given: they say what runs


def test_resuming_a_run_as_another_task_names_the_runs_task(tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, ["run", "task=toy", f"out={out}", "steps=2", "averager="]).exit_code == 0
    result = runner.invoke(app, ["run", f"out={out}", "resume=auto", "task=cifar"])
    lines = result.output.strip().splitlines()
    # was "toy.<key>: unknown key for task 'cifar'; known keys: ..." (a key the user never typed, and 60 more)
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith(f"error: task: the run at {out} is task toy; resume it without task="), lines[0]
    again = runner.invoke(app, ["run", f"config={out}", "task=cifar", f"out={tmp_path / 'other'}"])
    assert again.exit_code == 2 and again.output.startswith(f"error: task: config={out} is a run of task toy")
    assert not (tmp_path / "other").exists()
