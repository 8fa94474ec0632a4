"""One spelling rule for the whole CLI: a setting (anything with a value) is a key=value word, a --flag is a switch
without a value. Every command follows it, the other spelling is answered with the right word, and every message that
names a --flag names one that exists."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from lawa_suite.cli import app

runner = CliRunner()
SWITCHES = {"--force", "--dry-run", "--allow-torch-load", "--hash-inputs"}


def commands(group: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every command of the app as (its words, the click command); duck-typed: typer vendors its own click."""
    if hasattr(group, "commands"):
        return [c for name, sub in group.commands.items() for c in commands(sub, f"{path} {name}".strip())]
    return [(path, group)]


def options(command: Any) -> list[Any]:
    return [p for p in command.params if p.param_type_name == "option"]


def test_every_option_of_every_command_is_a_switch():
    found = commands(typer.main.get_command(app))
    assert {name for name, _ in found} >= {"run", "report", "bench", "export", "average", "eval", "profile",
                                           "analyze lmc", "verify", "list"}
    valued = {(name, opt) for name, command in found for p in options(command) for opt in p.opts
              if not (p.is_flag and p.is_bool_flag)}
    assert valued == set(), f"options that take a value (write them as key=value words): {sorted(valued)}"
    assert {opt for _, command in found for p in options(command) for opt in p.opts} == SWITCHES


@pytest.mark.parametrize("words, expected", [
    (["export", "runs/x", "--out", "hf"], "--out: not a switch of this command; settings are key=value words "
                                          "(out=...), and --flags are switches without a value (here: --force)"),
    (["export", "runs/x", "--weights=lawa"], "--weights=lawa: not a switch of this command; settings are key=value "
                                             "words (weights=...)"),
    (["run", "--config", "runs/x", "--dry-run"], "--config: not a switch of this command; settings are key=value "
                                                 "words (config=...), and --flags are switches without a value "
                                                 "(here: --dry-run)"),
    (["report", "runs/x", "--title", "t"], "--title: not a switch of this command; settings are key=value words "
                                           "(title=...), and --flags are switches without a value (this command has "
                                           "none)"),
    (["bench", "tasks=toy", "--emit", "slurm"], "--emit: not a switch of this command; settings are key=value words "
                                                "(emit=...)"),
    (["average", "runs/x", "averager=lawa", "--out", "o"], "--out: not a switch of this command"),
    (["profile", "--steps", "5"], "--steps: not a switch of this command; settings are key=value words (steps=...)"),
    (["export", "runs/x"], "out: expected the folder to write (for example out=hf-lawa)"),
    (["export", "runs/x", "out=o", "wieghts=lawa"], "wieghts: not a key of suite export (out, weights, config)"),
    (["report", "runs/x", "outt=o"], "outt: not a key of suite report (out, title)"),
])
def test_the_other_spelling_is_answered_with_the_word(words, expected):
    result = runner.invoke(app, words)
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and expected in error[0], result.output


def test_export_names_config_as_it_is_spelled(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"")
    result = runner.invoke(app, ["export", str(tmp_path / "w.safetensors"), f"out={tmp_path / 'o'}"])
    assert result.exit_code == 2 and "pass config=<run>/config.yaml" in result.output, result.output


def test_every_flag_a_message_names_exists():
    """A --name in the suite's own text (messages, help, docstrings) is one of its switches; cluster.py's are
    SLURM's and accelerate's, and bench's accelerate example is accelerate's."""
    root = Path(__file__).parents[1] / "lawa_suite"
    named = {}
    for file in root.rglob("*.py"):
        if file.name == "cluster.py":
            continue
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z_-]+", file.read_text()):
            named.setdefault(flag, file.relative_to(root).as_posix())
    generic = {"--flag", "--flags", "--name", "--help", "--mixed_precision"}
    assert set(named) - generic <= SWITCHES, {f: named[f] for f in set(named) - generic - SWITCHES}
