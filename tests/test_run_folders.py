"""Nothing lost, nothing run, nothing silent: what commands may write over, one process per run folder, resume
only of the suite's own runs, and one-line errors (with their exit codes) for hostile or damaged run files.

Every case was reproduced by a user on the code before it: a folder that held the input or a run was deleted by
``--force``, two ``suite run`` processes shared one folder, ``resume=auto`` overwrote a folder that was not a run,
and the files below gave tracebacks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lawa_suite.cli import app
from lawa_suite.rundir import lock_file

from conftest import ToyTask
from helpers import tree_digest

runner = CliRunner()
TESTS = Path(__file__).resolve().parent
TOY = ("task=toy", "steps=4", "eval.every=2", "trajectory.every=2")


def invoke(*words: object):
    return runner.invoke(app, [str(w) for w in words])


def one_line(result, code: int, *needles: str) -> str:
    """The command failed with ``code`` and said so in exactly one line holding every needle."""
    lines = result.output.strip().splitlines()
    assert result.exit_code == code and len(lines) == 1, (result.exit_code, result.output)
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def toy_run(out: Path, *words: str) -> Path:
    result = invoke("run", *TOY, f"out={out}", *words)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def exportable(monkeypatch):
    """The toy task with an export format (a weights file), so that exports get as far as replacing ``out``."""
    def export(self, weights, out: Path) -> None:
        (out / "weights.json").write_text(json.dumps(sorted(weights)))
    monkeypatch.setattr(ToyTask, "export", export, raising=False)


# -- 1. no command writes over, moves or deletes its inputs or a run ----------------------------------------
def test_export_force_never_replaces_a_folder_holding_its_input_or_a_run(tmp_path, exportable):
    run = toy_run(tmp_path / "par" / "run")
    (tmp_path / "par" / "notes.txt").write_text("the user's")
    before = tree_digest(tmp_path / "par")
    # the user's case: out= is the folder holding the run (the old code deleted par/run and notes.txt, exit 0)
    one_line(invoke("export", run, f"out={tmp_path / 'par'}", "--force", "weights=raw"), 2, "holds the input")
    one_line(invoke("export", run, f"out={run}", "--force"), 2, "is or lies in the input")
    one_line(invoke("export", run, f"out={run / 'hf'}", "--force"), 2, "is or lies in the input")
    other = toy_run(tmp_path / "other")
    other_before = tree_digest(other)
    one_line(invoke("export", run, f"out={other}", "--force"), 2, "was not made by suite export")
    assert tree_digest(tmp_path / "par") == before and tree_digest(other) == other_before

    # --force replaces what suite export made, and only that
    out = tmp_path / "hf"
    assert invoke("export", run, f"out={out}").exit_code == 0
    assert json.loads((out / "suite-output.json").read_text())["command"] == "suite export"
    one_line(invoke("export", run, f"out={out}"), 2, "not empty", "--force")
    result = invoke("export", run, f"out={out}", "--force")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["suite-output.json", "weights.json"]
    # a run the user later put inside an export is still a run
    shutil.copytree(other, out / "kept-run")
    one_line(invoke("export", run, f"out={out}", "--force"), 2, "holds a run")
    assert tree_digest(out / "kept-run") == other_before
    # a folder of the user's: not made by export, so not replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a.txt").write_text("keep")
    one_line(invoke("export", run, f"out={mine}", "--force"), 2, "was not made by suite export")
    assert (mine / "a.txt").read_text() == "keep"


def test_eval_force_never_writes_over_a_run_or_its_input(tmp_path):
    source = toy_run(tmp_path / "a")
    other = toy_run(tmp_path / "b")
    before_source, before_other = tree_digest(source), tree_digest(other)
    # the user's case: the old code replaced b's metrics.jsonl and report.md (exit 0)
    one_line(invoke("eval", source / "trajectory", f"out={other}", "--force"), 2, "was not made by suite eval")
    one_line(invoke("eval", source / "trajectory", f"out={source}", "--force"), 2, "holds the input")
    one_line(invoke("eval", source / "trajectory", f"out={source / 'trajectory' / 'x'}", "--force"), 2,
             "is or lies in the input")
    assert tree_digest(source) == before_source and tree_digest(other) == before_other

    scores = tmp_path / "scores"
    assert invoke("eval", source / "trajectory", f"out={scores}").exit_code == 0
    assert json.loads((scores / "suite-output.json").read_text())["command"] == "suite eval"
    one_line(invoke("eval", source / "trajectory", f"out={scores}"), 2, "not empty")
    again = invoke("eval", source / "trajectory", f"out={scores}", "--force")
    assert again.exit_code == 0, again.output
    assert (scores / "report.md").read_text().startswith("# Checkpoint scores: scores")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".scores")]  # no staging or old copy left


def test_lmc_force_writes_only_into_its_own_folder(tmp_path):
    run = toy_run(tmp_path / "run")
    a, b = (run / "trajectory" / f"step-{s:08d}.safetensors" for s in (4, 2))
    before = tree_digest(run)
    one_line(invoke("analyze", "lmc", a, b, f"out={run}", "points=2", "--force"), 2, "holds the input")
    other = toy_run(tmp_path / "other")
    one_line(invoke("analyze", "lmc", a, b, f"out={other}", "points=2", "--force"), 2, "not made by")
    assert tree_digest(run) == before
    out = tmp_path / "lmc"
    assert invoke("analyze", "lmc", a, b, f"out={out}", "points=2").exit_code == 0
    assert invoke("analyze", "lmc", a, b, f"out={out}", "points=2", "--force").exit_code == 0


def test_average_force_never_replaces_a_run_a_users_folder_or_another_commands(tmp_path):
    run = toy_run(tmp_path / "run")
    other = toy_run(tmp_path / "other")
    scores = tmp_path / "scores"
    assert invoke("eval", run / "trajectory", f"out={scores}").exit_code == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    kept = {folder: tree_digest(folder) for folder in (run, other, scores, mine)}
    average = ("average", run / "trajectory", "averager=ema")
    # the audit's case: the old code deleted the other run (checkpoints, config, metrics) with exit 0
    one_line(invoke(*average, f"out={other}", "--force"), 2, "was not made by suite average")
    one_line(invoke(*average, f"out={mine}", "--force"), 2, "was not made by suite average")
    one_line(invoke(*average, f"out={scores}", "--force"), 2, "suite eval made it", "not made by suite average")
    one_line(invoke(*average, f"out={run}", "--force"), 2, "holds the input")
    one_line(invoke(*average, f"out={run / 'trajectory' / 'avg'}", "--force"), 2, "is or lies in the input")
    assert {folder: tree_digest(folder) for folder in kept} == kept

    # --force replaces what suite average made (scored in place or not), and only that
    out = tmp_path / "avg"
    made = invoke(*average, f"out={out}", "eval=true")
    assert made.exit_code == 0, made.output
    assert json.loads((out / "suite-output.json").read_text())["command"] == "suite average"
    one_line(invoke(*average, f"out={out}"), 2, "not empty", "--force")
    again = invoke("average", run / "trajectory", "averager=swa", f"out={out}", "--force")
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "suite-output.json", "swa"]
    shutil.copytree(other, out / "kept-run")  # a run the user later put inside an average output is still a run
    one_line(invoke(*average, f"out={out}", "--force"), 2, "holds a run")
    assert tree_digest(out / "kept-run") == kept[other]
    shutil.rmtree(out / "kept-run")
    (out / "suite-output.json").unlink()  # an output made before outputs were marked: its manifest says what it is
    older = invoke(*average, f"out={out}", "--force")
    assert older.exit_code == 0, older.output
    assert sorted(p.name for p in out.iterdir()) == ["ema", "manifest.json", "suite-output.json"]


def test_a_cross_run_report_is_not_written_into_a_run(tmp_path):
    a, b = toy_run(tmp_path / "a"), toy_run(tmp_path / "b")
    before = (a / "report.md").read_bytes()
    one_line(invoke("report", a, b, f"out={a}"), 2, "is a run folder")
    assert (a / "report.md").read_bytes() == before


# -- 2. one process per run folder -------------------------------------------------------------------------
LAUNCHER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import conftest
hold = Path(sys.argv[1])
from lawa_suite.training import checkpointing as run_checkpoints
init = run_checkpoints.RunCheckpointer.__init__
def held(self, *args):  # the run waits here, its folder prepared and locked, until the hold file is gone
    init(self, *args)
    Path(str(hold) + ".reached").touch()
    while hold.exists():
        time.sleep(0.02)
run_checkpoints.RunCheckpointer.__init__ = held
from lawa_suite.cli import app
app(sys.argv[2:], prog_name="suite")
""".format(tests=str(TESTS))


def suite(hold: Path, *words: object) -> subprocess.Popen:
    """A real ``suite`` process on the toy task, which waits before its first step while ``hold`` exists."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", LAUNCHER, str(hold), *map(str, words)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until_held(proc: subprocess.Popen, hold: Path) -> None:
    """Until ``proc`` waits in the task's setup: its folder holds only config.yaml, as when the user started a
    second run a second after the first."""
    deadline = time.monotonic() + 90
    while not Path(f"{hold}.reached").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the first run never reached its setup"
        time.sleep(0.02)


@pytest.mark.slow
def test_a_second_process_on_the_same_out_is_refused_naming_the_first(tmp_path):
    out, hold = tmp_path / "run", tmp_path / "hold"
    hold.write_text("")
    first = suite(hold, "run", *TOY, f"out={out}")
    try:
        wait_until_held(first, hold)
        # the user's case: the same command a moment later (the old code ran both, mixing their files)
        second = subprocess.run([sys.executable, "-c", LAUNCHER, str(tmp_path / "no-hold"), "run", *TOY, f"out={out}"],
                                capture_output=True, text=True, timeout=120)
        lines = (second.stdout + second.stderr).strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1, (second.returncode, second.stdout, second.stderr)
        assert lines[0].startswith(f"error: out: {out} is in use by another suite run (pid {first.pid} on this "
                                   f"host, since "), lines[0]
        assert json.loads(lock_file(out).read_text())["pid"] == first.pid
    finally:
        hold.unlink()
    code, _ = first.wait(timeout=120), first.communicate()
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["step"], r["weights"], r["split"]) for r in records]
    assert len(keys) == len(set(keys)) and max(r["step"] for r in records) == 4  # one run's records, once each
    assert not lock_file(out).exists()  # let go (and removed) when the run ended


@pytest.mark.slow
def test_a_killed_holder_leaves_no_lock_that_blocks_the_next_run(tmp_path):
    out, hold = tmp_path / "run", tmp_path / "hold"
    hold.write_text("")
    first = suite(hold, "run", *TOY, f"out={out}")
    wait_until_held(first, hold)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    assert lock_file(out).is_file()  # the killed process's record stays; the kernel dropped its lock
    result = invoke("run", *TOY, f"out={out}", "resume=auto")
    assert result.exit_code == 0, result.output
    assert not lock_file(out).exists()


def test_a_lock_held_from_another_host_says_so(tmp_path):
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    path = lock_file(out)
    with open(path, "w") as held:  # another open file: flock refuses this process too, as it would any other
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(json.dumps({"pid": 4242, "host": "node-17", "since": "2026-12-03 10:00:00 +0000"}))
        held.flush()
        assert socket.gethostname() != "node-17"
        one_line(invoke("run", *TOY, f"out={out}"), 2, "in use by another suite run",
                 "pid 4242 on host node-17 (another host), since 2026-12-03 10:00:00")
    assert list(out.iterdir()) == []  # nothing was written


# -- 3. resume only what the suite made ----------------------------------------------------------------------
def test_resume_refuses_a_folder_that_is_not_a_run_before_writing_anything(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("the user's report")
    before = tree_digest(mine)
    # the user's case: the old code trained there and replaced report.md
    one_line(invoke("run", *TOY, f"out={mine}", "resume=auto"), 2, "holds no config.yaml", "not a run")
    assert tree_digest(mine) == before
    # a config.yaml that is not the suite's (no task key) is not a run either
    (mine / "config.yaml").write_text("model: resnet\nepochs: 3\n")
    before = tree_digest(mine)
    one_line(invoke("run", *TOY, f"out={mine}", "resume=auto"), 2, "not a lawa-suite run config")
    assert tree_digest(mine) == before
    # a run's config.yaml copied beside the user's report.md: no records to resume, and a fresh start would
    # replace report.md (the audit's case; the old code did, exit 0)
    run = toy_run(tmp_path / "run")
    shutil.copy(run / "config.yaml", mine / "config.yaml")
    before = tree_digest(mine)
    one_line(invoke("run", *TOY, f"out={mine}", "resume=auto"), 2, "holds a config.yaml but no run records",
             "report.md")
    assert tree_digest(mine) == before


def test_resume_and_report_refuse_a_foreign_metrics_log_in_one_line(tmp_path):
    run = toy_run(tmp_path / "run")
    foreign = '{"epoch": 1, "acc": 0.5}\n{"epoch": 2, "acc": 0.6}\n'
    (run / "metrics.jsonl").write_text(foreign)
    before = tree_digest(run)
    # the old code: a KeyError traceback from both
    one_line(invoke("run", *TOY, f"out={run}", "resume=auto"), 2, "metrics.jsonl line 1",
             "not a lawa-suite metrics record")
    one_line(invoke("report", run), 2, "metrics.jsonl line 1", "not a lawa-suite metrics record")
    assert tree_digest(run) == before


# -- one line for what users met as tracebacks -----------------------------------------------------------------
def test_a_python_yaml_tag_is_one_line_everywhere_and_never_runs(tmp_path, exportable):
    run = toy_run(tmp_path / "run")
    marker = tmp_path / "code-ran"
    (run / "config.yaml").write_text((run / "config.yaml").read_text()
                                     + f'seed: !!python/object/apply:os.system ["touch {marker}"]\n')
    needles = ("config.yaml is not a lawa-suite run config", "python/object/apply:os.system", "no Python tags")
    one_line(invoke("run", *TOY, f"out={run}", "resume=auto"), 2, *needles)
    one_line(invoke("report", run), 2, *needles)
    one_line(invoke("report", run, toy_run(tmp_path / "other")), 2, *needles)
    one_line(invoke("run", f"config={run}", f"out={tmp_path / 'again'}"), 2, *needles)
    one_line(invoke("export", run, f"out={tmp_path / 'hf'}"), 2, *needles)
    one_line(invoke("eval", run, f"out={tmp_path / 'scores'}"), 2, *needles)  # was "no run config.yaml at RUN"
    one_line(invoke("eval", run / "trajectory", f"out={tmp_path / 'scores'}"), 2, *needles)
    assert not marker.exists() and not (tmp_path / "scores").exists()


def test_a_cut_short_last_line_is_read_past_with_a_warning(tmp_path):
    run = toy_run(tmp_path / "run")
    log = run / "metrics.jsonl"
    whole = log.read_text()
    log.write_text(whole + '{"step": 5, "weights": "raw", "spl')  # a kill in the middle of a write
    lines = whole.count("\n")
    report = invoke("report", run)  # the old code: a JSONDecodeError traceback
    assert report.exit_code == 0, report.output
    assert f"warning: {log} line {lines + 1} is cut short" in report.output
    resumed = invoke("run", *TOY, f"out={run}", "resume=auto")
    assert resumed.exit_code == 0, resumed.output
    assert "is cut short" in resumed.output and log.read_text() == whole  # the torn line is dropped on resume


def test_a_damaged_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path):
    run = toy_run(tmp_path / "run")
    log = run / "metrics.jsonl"
    lines = log.read_text().splitlines()
    lines[2] = lines[2][:20]
    log.write_text("\n".join(lines) + "\n")
    before = tree_digest(run)
    one_line(invoke("report", run), 1, f"{log} line 3 is not JSON", "only the last line may be cut short")
    one_line(invoke("run", *TOY, f"out={run}", "resume=auto"), 1, f"{log} line 3 is not JSON")
    assert tree_digest(run) == before


def test_an_out_that_is_not_utf8_is_one_line(tmp_path):
    out = os.fsdecode(os.fsencode(str(tmp_path)) + b"/runs/\xff")  # as the shell hands such bytes to Python
    one_line(invoke("run", *TOY, f"out={out}"), 2, "out: ", "\\xff", "is not UTF-8")
    one_line(invoke("export", out, "out=hf"), 2, "path: ", "is not UTF-8")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", [["verify"], ["report"], ["eval"], ["export", "out=x"],
                                     ["average", "averager=ema", "out=x"],
                                     ["average", "averager=ema", "out=x", "eval=true"]])
def test_a_path_that_does_not_exist_is_exit_2_for_every_command(tmp_path, command):
    missing = tmp_path / "nope"
    one_line(invoke(command[0], missing, *command[1:]), 2, str(missing), "does not exist")


def test_analyze_lmc_of_paths_that_do_not_exist_says_so(tmp_path):
    a, b = tmp_path / "nope1", tmp_path / "nope2"
    one_line(invoke("analyze", "lmc", a, b, f"out={tmp_path / 'lmc'}"), 2, str(a), "does not exist")
    run = toy_run(tmp_path / "run")
    one_line(invoke("analyze", "lmc", run / "trajectory" / "step-00000004.safetensors", b, f"out={tmp_path / 'lmc'}"),
             2, str(b), "does not exist")
    assert not (tmp_path / "lmc").exists()


def test_scores_are_not_a_run_to_resume(tmp_path):
    source = toy_run(tmp_path / "a")
    scores = tmp_path / "scores"
    assert invoke("eval", source / "trajectory", f"out={scores}").exit_code == 0
    before = tree_digest(scores)
    one_line(invoke("run", *TOY, f"out={scores}", "resume=auto"), 2, "written by suite eval, not by suite run")
    assert tree_digest(scores) == before
