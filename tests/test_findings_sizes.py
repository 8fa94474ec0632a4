"""What each phase's verdict rests on (issue 29, item 13): a real tiny run of every built-in task records the size of
what each evaluation scored (held-out examples, tokens, generated samples), and its report's findings say it, with
the numbers that were scored; a size is never a metric of the report's tables or curves; old runs read as before."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lawa_suite import registry
from lawa_suite.cli import app
from lawa_suite.config import resolve
from lawa_suite.report import write_report
from helpers import read_metrics, torchrun

runner = CliRunner()


def _held_out_size(words: list[str], tmp_path: Path) -> tuple[str, int]:
    """The size key and what the task's held-out batches hold, counted from the task's own batches (not by the
    evaluator): the examples of cifar's test batches, the predicted tokens of gpt2's windows, ddpm's FID samples."""
    cfg = resolve([*words, f"data.cache={tmp_path / 'cache'}", f"out={tmp_path / 'count'}"])
    task = registry.tasks.get(cfg.run.task)(cfg.task, cfg.run)
    task.setup()
    batches = task.eval_batches()
    if cfg.run.task == "cifar":
        return "examples", sum(len(batch["labels"]) for batch in batches)
    if cfg.run.task == "gpt2":
        return "tokens", sum(batch["tokens"][:, 1:].numel() for batch in batches)
    return "fid_samples", sum(batch["count"] for batch in batches if batch.get("kind") == "sample")


def _held_out_images(words: list[str], tmp_path: Path) -> int:
    """The images of ddpm's held-out loss batches, counted from the task's own batches."""
    cfg = resolve([*words, f"data.cache={tmp_path / 'cache'}", f"out={tmp_path / 'count'}"])
    task = registry.tasks.get(cfg.run.task)(cfg.task, cfg.run)
    task.setup()
    return sum(len(batch["images"]) for batch in task.eval_batches() if batch.get("kind") != "sample")


@pytest.mark.parametrize("task, words, said", [
    ("cifar", ["task=cifar", "preset=tiny", "averager=ema", "steps=8"], "{n:,} held-out examples"),
    ("gpt2", ["task=gpt2", "preset=tiny", "averager=ema", "steps=8"], "{n:,} held-out tokens"),
    ("ddpm", ["task=ddpm", "preset=tiny", "averager=ema", "fid.reference=64", "fid.samples=16"],
     "{n:,} generated samples for FID"),
])
def test_a_real_run_says_what_each_evaluation_of_each_phase_rests_on(tmp_path, task, words, said):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", *words, f"out={out}", f"data.cache={tmp_path / 'cache'}", "progress=false"])
    assert result.exit_code == 0, result.output
    key, scored = _held_out_size(words, tmp_path)
    evaluations = [r for r in read_metrics(out) if r.get("split") == "val"]
    assert evaluations and all(r[key] == scored for r in evaluations)  # every evaluation, raw and averaged
    text = (out / "report.md").read_text()
    found = text.split("## What this run found")[1].split("\n\n")[1]
    if task == "ddpm":  # and the held-out images of its denoising loss
        images = _held_out_images(words, tmp_path)
        assert all(r["images"] == images for r in evaluations)
        said += f" and {images:,} held-out images"
    assert f"; each scores {said.format(n=scored)}." in found, found
    assert "Evaluations per phase: early " in found and "At the final evaluation" in found
    table = text.split("## What this run found")[0]
    assert key not in table  # a size is no column of the comparison table
    meta = json.loads((out / "metrics-meta.json").read_text())
    assert key not in meta["metrics"]


def test_on_two_processes_the_recorded_size_is_the_total_over_ranks(tmp_path):
    # three held-out batches over two DDP processes: rank 0 scores two, rank 1 one; the record is of all three
    words = ["task=gpt2", "preset=tiny", "averager=ema", "steps=4", "eval.batches=3"]
    out = tmp_path / "run"
    done = torchrun(Path(sys.executable).with_name("suite"), "run", *words, f"out={out}",
                    f"data.cache={tmp_path / 'cache'}", "progress=false")
    assert done.returncode == 0, done.stdout + done.stderr
    key, scored = _held_out_size(words, tmp_path)
    evaluations = [r for r in read_metrics(out) if r.get("split") == "val"]
    assert key == "tokens" and evaluations and all(r["tokens"] == scored for r in evaluations)
    assert f"each scores {scored:,} held-out tokens." in (out / "report.md").read_text()


def _hand_run(root: Path, records: list[dict], meta: dict | None = None, task: str = "ddpm", steps: int = 40) -> Path:
    run = root / "run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"task": task, "preset": "cpu", "lr": 0.1, "seed": 0,
                                                     "steps": steps, "averager": ["ema"]}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if meta is not None:
        (run / "metrics-meta.json").write_text(json.dumps(meta))
    return run


def _fid_records(samples: dict[int, int], images: int | None = None) -> list[dict]:
    records = []
    for step, count in samples.items():
        for weights, fid in (("raw", 300.0 - step), ("ema", 290.0 - step)):
            record = {"step": step, "weights": weights, "split": "val", "fid_standin": fid, "loss": 0.5,
                      "fid_samples": float(count)}
            records.append({**record, **({"images": images} if images else {})})
    return records


FID_META = {"format": "lawa-suite-metrics-meta/1", "evaluator": "fid",
            "metrics": {"fid": "min", "fid_standin": "min", "loss": "min"}, "notes": {}}


def test_a_larger_final_sample_set_is_named_with_its_steps_and_the_denoising_images_beside_it(tmp_path):
    # fid.final_samples=128 fid.final_at=0.5,1.0: 32 samples, 128 at the evaluations of steps 20 and 40
    run = _hand_run(tmp_path, _fid_records({10: 32, 20: 128, 30: 32, 40: 128}, images=48), FID_META)
    text = write_report(run).read_text()
    assert "Evaluations per phase: early 1, mid 2, late 1; each scores 32 generated samples for FID (128 at steps " \
           "20, 40) and 48 held-out images." in text
    assert "fid_samples" not in text and "final images" not in text


def test_an_old_run_without_metrics_meta_reads_fid_samples_as_a_size_not_a_metric(tmp_path):
    run = _hand_run(tmp_path, _fid_records({10: 64, 20: 64, 30: 64, 40: 64}))
    text = write_report(run).read_text()
    assert "final fid_samples" not in text  # not a column of the table
    assert "each scores 64 generated samples for FID." in text


def test_evaluations_that_recorded_no_size_are_counted_not_hidden(tmp_path):
    # a run resumed across the version that began recording sizes: its first evaluations have none
    records = [{k: v for k, v in r.items() if k != "fid_samples" or r["step"] > 20}
               for r in _fid_records({10: 64, 20: 64, 30: 64, 40: 64})]
    text = write_report(_hand_run(tmp_path, records, FID_META)).read_text()
    assert "each scores 64 generated samples for FID (not recorded at 2 evaluations)." in text


def test_a_run_without_sizes_reads_as_before(tmp_path):
    records = [{k: v for k, v in r.items() if k != "fid_samples"} for r in _fid_records({10: 64, 20: 64, 40: 64})]
    text = write_report(_hand_run(tmp_path, records, FID_META)).read_text()
    assert "Evaluations per phase: early 1, mid 1, late 1. One run is one seed" in text


def test_a_metric_that_shares_a_size_name_stays_a_metric(tmp_path):
    meta = {**FID_META, "evaluator": "plugin", "metrics": {"tokens": "max"}}
    records = [{"step": s, "weights": w, "split": "val", "tokens": v}
               for s in (10, 20, 30, 40) for w, v in (("raw", s * 1.0), ("ema", s + 1.0))]
    text = write_report(_hand_run(tmp_path, records, meta, task="plugin")).read_text()
    assert "final tokens" in text and "each scores" not in text


def test_the_evaluation_line_says_what_every_weights_share_once():
    """The console line of an evaluation: the sizes every weights share after the step, once, not beside each
    weights' scores (the main job printed `examples=1000` four times a line); sizes that differ stay with theirs."""
    from lawa_suite.training.scoring import score_line

    metrics = {"accuracy": "max", "loss": "min"}
    same = {"raw": {"accuracy": 0.25, "loss": 2.5, "examples": 1000.0}, "ema": {"accuracy": 0.3, "loss": 2.0,
                                                                                 "examples": 1000.0}}
    assert score_line(50, same, metrics) == ("step 50 (1,000 examples) | raw: accuracy=0.25 loss=2.5 | "
                                             "ema: accuracy=0.3 loss=2")
    differ = {"raw": {"accuracy": 0.25, "examples": 1000.0}, "ema": {"accuracy": 0.3, "examples": 500.0}}
    assert score_line(50, differ, metrics) == ("step 50 | raw: accuracy=0.25 examples=1000 | "
                                               "ema: accuracy=0.3 examples=500")
    assert score_line(50, same) == ("step 50 | raw: accuracy=0.25 loss=2.5 examples=1000 | "
                                    "ema: accuracy=0.3 loss=2 examples=1000")  # no metrics named: every number
