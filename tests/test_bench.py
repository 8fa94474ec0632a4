"""`suite bench`: the matrix, skipping finished cells, resuming interrupted ones (a real kill -9 included),
averager variants, the cluster forms and one-line errors. All on the test-only ``toy`` task (conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import ToyTask
from helpers import tree_digest
from lawa_suite.bench import cells, load_bench, run_bench
from lawa_suite.cli import app
from lawa_suite.config import resolve

runner = CliRunner()
TESTS = Path(__file__).resolve().parent


def toy_words(out: Path, *extra: str) -> list[str]:
    return ["tasks=toy", "lrs=0.05,0.01", "seeds=0,1", "steps=6", "eval.every=3", f"out={out}", *extra]


def val_steps(run: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r.get("split") == "val" and r["weights"] == "raw"]


def test_bench_runs_every_cell_then_skips_them(tmp_path):
    out = tmp_path / "bench"
    first = runner.invoke(app, ["bench", *toy_words(out)])
    assert first.exit_code == 0, first.output
    runs = sorted(p.parent for p in out.rglob("config.yaml"))
    assert [p.relative_to(out).as_posix() for p in runs] == [
        "toy/lr0.01-seed0", "toy/lr0.01-seed1", "toy/lr0.05-seed0", "toy/lr0.05-seed1"]
    for run in runs:
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["averager"] == ["lawa", "ema", "swa"] and config["steps"] == 6
        assert config["checkpoint"]["every"] == 3  # a checkpoint at every evaluation: a kill loses little
        assert val_steps(run) == [3, 6]
    assert yaml.safe_load((runs[2] / "config.yaml").read_text())["lr"] == 0.05
    stamps = {run: (run / "metrics.jsonl").stat().st_mtime_ns for run in runs}
    ToyTask.consumed = []
    again = runner.invoke(app, ["bench", *toy_words(out)])
    assert again.exit_code == 0, again.output
    assert "0 cell(s) run, 4 finished before" in again.output
    assert ToyTask.consumed == [], "a finished cell was trained again"
    assert {run: (run / "metrics.jsonl").stat().st_mtime_ns for run in runs} == stamps


def test_sigterm_stops_the_bench_and_a_second_start_resumes_only_that_cell(tmp_path):
    bench = load_bench(None, toy_words(tmp_path / "bench"))

    def preempt_the_second_cell(message: str) -> None:
        if message.startswith("[2/4]") and "starting" in message:
            ToyTask.sigterm_at = 4  # SIGTERM during its 5th step: the loop checkpoints step 5 and stops

    from lawa_suite.training.loop import Preempted
    with pytest.raises(Preempted):
        run_bench(bench, log=preempt_the_second_cell)
    second = cells(bench)[1].out
    assert (second / "checkpoints" / "step-00000005").is_dir()
    assert not (second / "checkpoints" / "step-00000006").exists()
    ToyTask.consumed = []
    messages: list[str] = []
    result = run_bench(bench, log=messages.append)
    assert [c.index for c in result.skipped] == [0] and [c.index for c in result.done] == [1, 2, 3]
    assert any(m.startswith("[2/4]") and "resuming" in m for m in messages)
    # the resumed cell trained one step (16 samples), the two new ones six steps each: nothing was redone
    assert len(ToyTask.consumed) == 16 * (1 + 6 + 6)
    assert val_steps(second) == [3, 6]


def test_a_killed_bench_process_continues_without_redoing_finished_cells(tmp_path):
    """A real kill -9 of a `suite bench` process in the middle of its second cell."""
    out = tmp_path / "bench"
    words = ["tasks=toy", "lrs=0.05,0.01", "seeds=0", "steps=300", "eval.every=100", "checkpoint.every=10",
             "log_every=100", f"out={out}"]
    launcher = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import conftest; from lawa_suite.cli import app; app()"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", launcher, "bench", *words], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = out / "toy" / "lr0.01-seed0" / "checkpoints"
    deadline = time.monotonic() + 50
    try:
        while not (second.is_dir() and any(p.name.startswith("step-") for p in second.iterdir())):
            assert proc.poll() is None, "the bench ended before it could be killed"
            assert time.monotonic() < deadline, "the second cell never checkpointed"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    first_metrics = out / "toy" / "lr0.05-seed0" / "metrics.jsonl"
    stamp = first_metrics.stat().st_mtime_ns
    messages: list[str] = []
    result = run_bench(load_bench(None, words), log=messages.append)
    assert [c.index for c in result.skipped] == [0] and [c.index for c in result.done] == [1]
    assert first_metrics.stat().st_mtime_ns == stamp
    assert any(m.startswith("[2/2]") and "resuming" in m for m in messages)
    assert val_steps(out / "toy" / "lr0.01-seed0") == [100, 200, 300]


def test_variants_give_a_second_swa_in_the_same_run(tmp_path):
    spec = tmp_path / "bench.yaml"
    spec.write_text(yaml.safe_dump({
        "out": str(tmp_path / "bench"), "averager": "lawa,swa,swa_early", "seeds": 0,
        "variants": {"swa_early": {"of": "swa", "start": 0.25}},
        "set": {"swa.start": 0.75, "eval.every": 4},
        "tasks": {"toy": {"lrs": "0.05", "steps": 8}}}))
    result = runner.invoke(app, ["bench", str(spec)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "bench" / "toy" / "lr0.05-seed0"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["swa_early"]["start"] == 0.25 and config["swa"]["start"] == 0.75
    scored = {(r["step"], r["weights"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if r.get("split") == "val"}
    assert (4, "swa_early") in scored and (4, "swa") not in scored and (8, "swa") in scored
    report = runner.invoke(app, ["report", str(tmp_path / "bench")])
    assert report.exit_code == 0, report.output
    text = (tmp_path / "bench" / "report.md").read_text()
    assert "(c) SWA started early" in text and "swa_early (from 25%)" in text


def test_emit_writes_one_launch_per_cell_and_a_slurm_array(tmp_path):
    out = tmp_path / "bench"
    result = runner.invoke(app, ["bench", *toy_words(out), "emit=slurm"])
    assert result.exit_code == 0, result.output
    commands = (out / "commands.sh").read_text().splitlines()
    launches = [line for line in commands if line.startswith("accelerate launch")]
    assert [line.rsplit(" ", 1)[-1] for line in launches] == ["cell=0", "cell=1", "cell=2", "cell=3"]
    assert all(" -m lawa_suite.cli bench " in line and str(out / "bench.yaml") in line for line in launches)
    assert any("suite run task=toy" in line and "lr=0.01" in line and "seed=1" in line for line in commands)
    sbatch = (out / "bench.sbatch").read_text()
    assert "#SBATCH --array=0-3" in sbatch and "cell=$SLURM_ARRAY_TASK_ID" in sbatch
    assert not list(out.rglob("config.yaml")), "emitting must not train"
    # the spec the commands read resolves to the same cells
    assert [c.overrides for c in cells(load_bench(out / "bench.yaml", []))] == \
        [c.overrides for c in cells(load_bench(None, toy_words(out)))]
    one = runner.invoke(app, ["bench", str(out / "bench.yaml"), "cell=2"])
    assert one.exit_code == 0, one.output
    assert [p.parent.name for p in out.rglob("config.yaml")] == ["lr0.01-seed0"]


@pytest.mark.parametrize("words, expected", [
    (["lrs=0.1,fast"], "lrs: expected a comma list of numbers > 0"),
    (["lrs=0.1,-1"], "lrs: expected a comma list of numbers > 0"),
    (["seeds=0,0"], "seeds: expected distinct values"),
    (["tasks=nope"], "task: unknown task 'nope'"),
    (["stepz=5"], "stepz: unknown key"),
    (["threads=-1"], "threads: expected an integer >= 0"),
    (["lr=0.1", "lrs=0.2"], "lrs: given twice"),
    (["emit=ssh"], "emit: expected accelerate or slurm"),
    (["cell=9"], "cell: expected an index in [0, 3]"),
    (["cell=two"], "cell: expected a cell index"),
    (["--cell", "2"], "--cell: not a switch of this command; settings are key=value words (cell=...)"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, words, expected):
    base = ["tasks=toy", "lrs=0.05,0.01", "seeds=0,1", f"out={tmp_path / 'b'}"]
    overridden = {w.split("=")[0] for w in words if "=" in w}
    base = [w for w in base if w.split("=")[0] not in overridden]
    result = runner.invoke(app, ["bench", *base, *words])
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and expected in error[0], result.output
    assert not (tmp_path / "b").exists() or not list((tmp_path / "b").rglob("config.yaml"))


def test_a_bench_out_is_never_a_run_inside_one_or_holding_one(tmp_path):
    """The audit: out=RUN exited 0, wrote bench.yaml and the cells inside a training run, then suggested `suite
    report RUN` (which rewrites the run's own report)."""
    run = tmp_path / "run"
    made = runner.invoke(app, ["run", "task=toy", "steps=4", "eval.every=2", f"out={run}", "progress=false"])
    assert made.exit_code == 0, made.output
    holder = tmp_path / "holder"
    shutil.copytree(run, holder / "someone" / "run")
    before = {folder: tree_digest(folder) for folder in (run, holder)}
    for out, said in ((run, "is the run folder"), (run / "bench", f"lies inside the run {run}"),
                      (holder, f"holds a run ({holder / 'someone' / 'run'}) and is not a bench's folder")):
        for switches in ([], ["--dry-run"], ["emit=slurm"]):
            result = runner.invoke(app, ["bench", *toy_words(out), *switches])
            lines = result.output.strip().splitlines()
            assert result.exit_code == 2 and len(lines) == 1, result.output
            assert lines[0].startswith(f"error: out: {out} {said}"), lines[0]
    assert {folder: tree_digest(folder) for folder in before} == before
    # a project folder with its own config.yaml and checkpoints/ is no run: a bench may live inside it
    project = tmp_path / "project"
    (project / "checkpoints").mkdir(parents=True)
    (project / "config.yaml").write_text("lr: 1\n")
    inside = runner.invoke(app, ["bench", *toy_words(project / "bench"), "--dry-run"])
    assert inside.exit_code == 0, inside.output
    # a bench's own folder holds runs (its cells): running it again there resumes it, as before
    bench = tmp_path / "bench"
    words = ["tasks=toy", "lrs=0.05", "seeds=0", "steps=2", "eval.every=1", f"out={bench}"]
    assert runner.invoke(app, ["bench", *words]).exit_code == 0
    again = runner.invoke(app, ["bench", *words])
    assert again.exit_code == 0 and "0 cell(s) run, 1 finished before" in again.output, again.output


def test_bad_bench_file_keys(tmp_path):
    spec = tmp_path / "b.yaml"
    spec.write_text("tasks: toy\nlearning_rates: 0.1\n")
    result = runner.invoke(app, ["bench", str(spec)])
    assert result.exit_code == 2 and "learning_rates: unknown bench key; allowed:" in result.output
    spec.write_text("tasks: {toy: {lrs: 0.1, seed: 3}}\n")
    result = runner.invoke(app, ["bench", str(spec)])
    assert result.exit_code == 2 and "seed: set by the bench itself" in result.output
    spec.write_text("tasks: toy\nvariants: {early: {start: 0.1}}\n")
    result = runner.invoke(app, ["bench", str(spec)])
    assert result.exit_code == 2 and "variants.early: expected {of: <averager>" in result.output
    for body in ("5", "[a, b]"):  # a task's settings that are not a mapping: one line, not a traceback
        spec.write_text(f"tasks: {{toy: {body}}}\n")
        result = runner.invoke(app, ["bench", str(spec)])
        assert result.exit_code == 2 and "tasks.toy: expected a mapping of settings" in result.output, result.output
    spec.write_text("tasks: {toy: }\n")  # an empty body is the task with no settings of its own
    assert runner.invoke(app, ["bench", str(spec), "--dry-run"]).exit_code == 0
    result = runner.invoke(app, ["bench", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "not found" in result.output


def test_a_bench_run_evaluates_at_least_twenty_times_unless_told(tmp_path):
    few = cells(load_bench(None, ["tasks=toy", "steps=400", "eval.every=100", f"out={tmp_path}"]))
    assert "eval.every=100" in few[0].overrides  # the bench said so: kept
    preset = cells(load_bench(None, ["tasks=toy", "steps=400", f"out={tmp_path}"]))  # the toy preset: every 5
    assert resolve(list(preset[0].overrides)).run.eval.every == 5  # 80 evaluations: enough, left alone
    short = cells(load_bench(None, ["tasks=toy", "steps=60", f"out={tmp_path}"]))  # every 5 would give 12
    cfg = resolve(list(short[0].overrides))
    assert cfg.run.eval.every == 3 and cfg.run.steps // cfg.run.eval.every == 20


def test_a_task_entry_may_be_a_labelled_second_setting_of_a_task(tmp_path):
    spec = tmp_path / "bench.yaml"
    spec.write_text(yaml.safe_dump({"out": str(tmp_path / "b"), "seeds": "0", "lrs": "0.05", "tasks": {
        "toy": {"steps": 6, "eval.every": 3}, "toy-constant": {"task": "toy", "schedule": "constant", "steps": 6,
                                                               "eval.every": 3}}}))
    found = cells(load_bench(spec, []))
    assert [(c.task, c.out.parent.name) for c in found] == [("toy", "toy"), ("toy", "toy-constant")]
    assert "schedule=constant" in found[1].overrides and "task=toy" in found[1].overrides
    assert resolve(list(found[1].overrides)).run.schedule == "constant"


def test_a_cell_kept_without_its_checkpoints_counts_as_done_when_its_final_evaluation_is_recorded(tmp_path):
    words = ["tasks=toy", "lrs=0.05", "seeds=0", "steps=6", "eval.every=3", f"out={tmp_path / 'bench'}"]
    assert runner.invoke(app, ["bench", *words]).exit_code == 0
    cell = tmp_path / "bench" / "toy" / "lr0.05-seed0"
    shutil.rmtree(cell / "checkpoints")  # what a committed reference keeps: config, metrics, reports
    again = runner.invoke(app, ["bench", *words])
    assert "done before, skipped" in again.output and "0 cell(s) run, 1 finished before" in again.output
    lines = (cell / "metrics.jsonl").read_text().splitlines()
    (cell / "metrics.jsonl").write_text("\n".join(line for line in lines if '"step": 6' not in line) + "\n")
    third = runner.invoke(app, ["bench", *words])
    assert "starting" in third.output or "resuming" in third.output  # the final evaluation is missing: not done


def test_two_processes_running_parts_of_one_bench_both_run_and_write_the_whole_spec(tmp_path):
    spec = tmp_path / "bench.yaml"
    spec.write_text(yaml.safe_dump({"out": str(tmp_path / "b"), "seeds": "0", "lrs": "0.05", "tasks": {
        "toy": {"steps": 6, "eval.every": 3}, "toy-constant": {"task": "toy", "schedule": "constant", "steps": 6,
                                                               "eval.every": 3}}}))
    first = runner.invoke(app, ["bench", str(spec), "tasks=toy"])
    second = runner.invoke(app, ["bench", str(spec), "tasks=toy-constant"])  # the spec exists now
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    written = yaml.safe_load((tmp_path / "b" / "bench.yaml").read_text())
    assert set(written["tasks"]) == {"toy", "toy-constant"} and written["tasks"]["toy-constant"]["task"] == "toy"
    assert (tmp_path / "b" / "toy-constant" / "lr0.05-seed0" / "metrics.jsonl").is_file()


def test_thread_count_is_put_back_after_the_block_even_when_it_raises():
    import torch

    from lawa_suite.threads import torch_threads

    before = torch.get_num_threads()
    other = before + 1
    with pytest.raises(RuntimeError), torch_threads(other):
        assert torch.get_num_threads() == other
        raise RuntimeError("a cell failed")
    assert torch.get_num_threads() == before
    with torch_threads(None):  # bench threads=0: the count is left alone
        assert torch.get_num_threads() == before
