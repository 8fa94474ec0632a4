"""`suite run` in a process of a launched group (torchrun, accelerate launch: each process has a RANK) says what it
did once, from the first process, not once per process."""

from __future__ import annotations

from typer.testing import CliRunner

from lawa_suite.cli import app

runner = CliRunner()


def run_as(rank: str, out, monkeypatch) -> str:
    monkeypatch.setenv("RANK", rank)  # WORLD_SIZE stays unset: the run itself is one process
    result = runner.invoke(app, ["run", "task=toy", f"out={out}", "steps=2", "eval.every=2", "progress=false"])
    assert result.exit_code == 0, result.output
    return result.output


def test_only_the_first_process_says_the_run_is_done(tmp_path, monkeypatch):
    assert "done: 2 steps" in run_as("0", tmp_path / "a", monkeypatch)
    assert "done:" not in run_as("1", tmp_path / "b", monkeypatch)
