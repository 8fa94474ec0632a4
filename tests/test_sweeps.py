"""Post-hoc sweeps in a bench: one run per seed answers an EMA-length sweep (reconstructed from phema's stored
averages) and a LAWA k sweep (replayed over the trajectory), scored beside raw, skipped when done, and drawn in the
cross-run report against the swept key. On the test-only ``toy`` task (conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lawa_suite.bench import load_bench
from lawa_suite.cli import app
from lawa_suite.report.bench import write_bench_report
from lawa_suite.report.run import find_runs

runner = CliRunner()


def bench_file(tmp_path: Path, **changes) -> Path:
    spec = {"out": str(tmp_path / "bench"), "tasks": "toy", "lrs": "0.05", "seeds": "0,1", "averager": "lawa,phema",
            "set": {"steps": 24, "eval.every": 6, "trajectory.every": 2, "lawa.k": 2, "lawa.nu": 2,
                    "phema.sigma_rel": "0.05,0.1", "phema.snapshot_every": 4},
            "posthoc": {"ema_length": "averager=phema phema.sigma_rel=0.07,0.1,0.15",
                        "lawa_k": "averager=lawa lawa.k=2,3,4 lawa.nu=2"}}
    spec.update(changes)
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_one_run_per_seed_answers_both_sweeps_and_the_report_draws_them(tmp_path: Path) -> None:
    path = bench_file(tmp_path)
    first = runner.invoke(app, ["bench", str(path)])
    assert first.exit_code == 0, first.output
    cell = tmp_path / "bench" / "toy" / "lr0.05-seed0"
    for sweep, folders in (("ema_length", ["phema-sigma_rel0.07", "phema-sigma_rel0.1", "phema-sigma_rel0.15"]),
                           ("lawa_k", ["lawa-k2-nu2", "lawa-k3-nu2", "lawa-k4-nu2"])):
        out = cell / "posthoc" / sweep
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert sorted({r["weights"] for r in records}) == sorted(["raw", *folders])
        assert {r["step"] for r in records} == {24}
    # the posthoc outputs are not mistaken for runs
    assert sorted(p.relative_to(tmp_path / "bench").as_posix() for p in find_runs([tmp_path / "bench"])) == [
        "toy/lr0.05-seed0", "toy/lr0.05-seed1"]
    # raw of the sweep's scoring is raw of the run at that step: the same held-out batches
    online = [json.loads(line) for line in (cell / "metrics.jsonl").read_text().splitlines()]
    raw_online = [r for r in online if r.get("split") == "val" and r["weights"] == "raw" and r["step"] == 24][0]
    raw_sweep = [json.loads(line) for line in (cell / "posthoc" / "lawa_k" / "metrics.jsonl").read_text()
                 .splitlines() if json.loads(line)["weights"] == "raw"][0]
    assert raw_sweep["accuracy"] == raw_online["accuracy"] and raw_sweep["loss"] == pytest.approx(raw_online["loss"])
    # the online lawa k=2 nu=2 at the end is the sweep's lawa-k2-nu2, bit for bit: so are its scores
    lawa_online = [r for r in online if r.get("split") == "val" and r["weights"] == "lawa" and r["step"] == 24][0]
    lawa_sweep = [json.loads(line) for line in (cell / "posthoc" / "lawa_k" / "metrics.jsonl").read_text()
                  .splitlines() if json.loads(line)["weights"] == "lawa-k2-nu2"][0]
    assert lawa_sweep["loss"] == pytest.approx(lawa_online["loss"], rel=1e-6)

    again = runner.invoke(app, ["bench", str(path)])
    assert again.exit_code == 0 and again.output.count("done before, skipped") == 6, again.output

    report = write_bench_report([tmp_path / "bench"], tmp_path / "report")
    text = report.read_text()
    assert "### Post-hoc sweep `ema_length` (one training run per seed)" in text
    assert "| phema-sigma_rel0.07 |" in text and "over 2 seeds" in text
    assert (tmp_path / "report" / "toy-tiny-sweep-ema_length.png").stat().st_size > 5_000
    assert (tmp_path / "report" / "toy-tiny-sweep-lawa_k.png").is_file()


@pytest.mark.parametrize(("changes", "message"), [
    ({"posthoc": {"x": "averager=lawa lawa.k=2 out=somewhere"}}, "posthoc.x: out= is set by the bench"),
    ({"posthoc": {"x": "averager=lawq"}}, "posthoc.x: averager"),
    ({"posthoc": {"x": "averager=lawa lawa.k=0"}}, "posthoc.x: lawa.k: expected an integer >= 1"),
    ({"posthoc": "averager=lawa"}, "posthoc: expected a mapping name -> suite average words"),
    ({"posthoc": {"a/b": "averager=lawa"}}, "posthoc.a/b: expected a name of letters"),
])
def test_bad_sweeps_are_one_line_before_any_work(tmp_path: Path, changes, message) -> None:
    result = runner.invoke(app, ["bench", str(bench_file(tmp_path, **changes))])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "bench" / "toy").exists()


@pytest.mark.parametrize(("setting", "message"), [
    ({"trajectory.every": 0}, "posthoc.lawa_k: lawa replays the saved trajectory; set trajectory.every"),
    ({"phema.snapshot_every": 0}, "posthoc.ema_length: phema is reconstructed from the averages a run's phema "
                                  "stores; add phema to averager with phema.snapshot_every=N"),
])
def test_a_sweep_the_runs_cannot_feed_is_refused_before_training(tmp_path: Path, setting, message) -> None:
    path = bench_file(tmp_path)
    spec = yaml.safe_load(path.read_text())
    spec["set"].update(setting)
    path.write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["bench", str(path)])
    assert result.exit_code == 2 and message in result.output, result.output
    bench = load_bench(path, [])
    assert [s.name for s in bench.posthoc] == ["ema_length", "lawa_k"]


def test_lmc_pairs_are_scored_after_each_run_and_judged_as_claim_e(tmp_path: Path) -> None:
    path = bench_file(tmp_path, posthoc=None, lmc=[[0.25, 0.5], [0.5, 1.0]])
    result = runner.invoke(app, ["bench", str(path)])
    assert result.exit_code == 0, result.output
    cell = tmp_path / "bench" / "toy" / "lr0.05-seed0"
    found = json.loads((cell / "lmc" / "0.5-1" / "lmc.json").read_text())
    assert [r["alpha"] for r in found["rows"]] == [0.0, 0.5, 1.0]
    assert found["a"] == "step-00000024.safetensors" and found["b"] == "step-00000012.safetensors"
    text = write_bench_report([tmp_path / "bench"], tmp_path / "report").read_text()
    assert "**(e) after an early phase, a run's checkpoints are linearly connected" in text
    assert "midpoint of the checkpoints at 0.25 and 0.5 of the run over their mean accuracy" in text
    assert "midpoint of the checkpoints at 0.5 and 1 of the run" in text


def test_an_lmc_pair_off_the_saved_steps_is_refused_before_training(tmp_path: Path) -> None:
    result = runner.invoke(app, ["bench", str(bench_file(tmp_path, posthoc=None, lmc=[[0.3, 0.5]]))])
    assert result.exit_code == 2 and "lmc: [0.3, 0.5] of 24 steps needs the raw weights at steps 7, 12" in result.output
    result = runner.invoke(app, ["bench", str(bench_file(tmp_path, posthoc=None, lmc=[[0.5, 0.2]]))])
    assert result.exit_code == 2 and "lmc: expected a list of pairs of fractions" in result.output
