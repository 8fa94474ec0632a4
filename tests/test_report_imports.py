"""`suite report` reads files only: no task, no trainer; what a run means comes from its folder and the report's
own tables (``report/meaning.py``), held here to the suite's evaluators and configs. Drawing touches no
process-wide plotting state."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from helpers import report_bench

from lawa_suite import registry
from lawa_suite.config import dotted, resolve
from lawa_suite.report.bench import group_runs
from lawa_suite.report.meaning import ADDED_KEYS, METRICS, NOTES
from lawa_suite.report.records import read_run
from lawa_suite.report.run import find_runs

REFERENCE = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "cpu-reference-v2"

_REPORT_AND_LIST_MODULES = '''
import sys
from lawa_suite.cli import app
app(["report", sys.argv[1], "out=" + sys.argv[2]], standalone_mode=False)
print("loaded:", *sorted(m for m in sys.modules if m.startswith(("lawa_suite.tasks", "lawa_suite.training.loop"))))
'''


def test_suite_report_of_a_bench_imports_no_task_and_no_trainer(tmp_path):
    done = subprocess.run([sys.executable, "-c", _REPORT_AND_LIST_MODULES, str(report_bench(tmp_path)),
                           str(tmp_path / "out")], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "loaded:", done.stdout
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## gpt2 (cpu)" in text and "2 learning rate(s) x seeds 0, 1" in text  # the seeds grouped as one


def test_the_reference_bench_groups_as_its_committed_report_does():
    """Runs made before and after keys were added (compile, tf32, ...) stay one experiment, read from files alone."""
    runs = [read_run(p) for p in find_runs([REFERENCE / "cells"])]
    committed = [line[3:] for line in (REFERENCE / "report.md").read_text().splitlines()
                 if line.startswith("## ") and line[3:] not in ("Answers at a glance", "The claims", "Runs")]
    groups = group_runs(runs)
    assert list(groups) == committed
    assert all(len(seeds) == 5 for by_lr in groups.values() for seeds in by_lr.values())


def test_the_reports_tables_match_the_evaluators_and_the_configs():
    for task, metrics in METRICS.items():  # a table of the built-in evaluators' metrics: it must not drift
        evaluator = registry.evaluators.get(registry.tasks.get(task).evaluator)
        assert dict(evaluator.metrics) == metrics, task
        assert {m: n for m, n in NOTES.items() if m in metrics} == dict(getattr(evaluator, "notes", {}) or {}), task
    # every key the suite resolves today that the reference's runs lack has the value those runs computed with
    for config_file in sorted((REFERENCE / "cells").glob("*/*/config.yaml")):
        saved = yaml.safe_load(config_file.read_text())
        now = dotted(yaml.safe_load(resolve([f"task={saved['task']}", f"preset={saved['preset']}"]).to_yaml()))
        missing = set(now) - set(dotted(saved))
        assert missing <= set(ADDED_KEYS), (config_file, missing - set(ADDED_KEYS))
        assert all(ADDED_KEYS[k][0] in (None, saved["task"]) for k in missing)


_DRAW = '''
import sys
import matplotlib
from lawa_suite.report import write_bench_report
from pathlib import Path
write_bench_report([Path(sys.argv[1])], Path(sys.argv[2]))
print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
'''


def test_drawing_a_report_keeps_the_processs_plotting_backend(tmp_path):
    env = {**os.environ, "MPLBACKEND": "svg"}  # a backend the process chose: a report must not switch it
    done = subprocess.run([sys.executable, "-c", _DRAW, str(report_bench(tmp_path)), str(tmp_path / "out")],
                          capture_output=True, text=True, check=True, env=env)
    assert done.stdout.split() == ["svg", "False"]
    assert list((tmp_path / "out").glob("*.png"))
