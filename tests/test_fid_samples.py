"""FID's sample count per evaluation point (fid.final_samples at fid.final_at) and what evaluators are handed
(EvaluationContext): a larger set at chosen points of the run, its first N samples those of every other point."""

from __future__ import annotations

import json

import pytest
import torch

from lawa_suite.config import ConfigError, resolve
from lawa_suite.evaluators.base import EvaluationContext, Evaluator, build_evaluator
from lawa_suite.evaluators.fid import FID
from lawa_suite.training.loop import train

from helpers import ddpm_tiny_config, ddpm_tiny_task




def test_the_keys_are_typed_and_checked():
    cfg = resolve(["task=ddpm", "preset=tiny", "fid.final_samples=64", "fid.final_at=[0.5,1.0]"])
    assert cfg.task.fid.final_samples == 64 and cfg.task.fid.final_at == [0.5, 1.0]
    assert resolve(["task=ddpm", "preset=tiny"]).task.fid.final_samples == 0  # off unless asked for
    for word, named in (("fid.final_samples=16", "fid.final_samples"), ("fid.final_at=[0]", "fid.final_at"),
                        ("fid.final_at=[0.5,1.5]", "fid.final_at")):
        with pytest.raises(ConfigError, match=named):
            resolve(["task=ddpm", "preset=tiny", "fid.samples=32", word])


def test_a_list_key_of_a_nested_config_takes_a_comma_list_or_one_value():
    assert resolve(["task=ddpm", "preset=tiny", "fid.final_at=0.5,1.0"]).task.fid.final_at == [0.5, 1.0]
    assert resolve(["task=ddpm", "preset=tiny", "fid.final_at=1.0"]).task.fid.final_at == [1.0]


def test_the_larger_count_falls_on_the_first_evaluation_at_or_after_each_fraction(tmp_path):
    task = ddpm_tiny_task(tmp_path, "fid.samples=16", "fid.final_samples=32", "fid.final_at=[0.5,1.0]")
    fid = FID(task, context=EvaluationContext(steps=250, eval_every=25))
    counts = {step: fid.samples_at(step) for step in range(25, 251, 25)}
    assert {step for step, n in counts.items() if n == 32} == {125, 250} and set(counts.values()) == {16, 32}
    # 50% of 250 is step 125, between the evaluations at 100 and 200: the one at 200 draws the large set
    fid = FID(task, context=EvaluationContext(steps=250, eval_every=100))
    assert [fid.samples_at(s) for s in (100, 200, 250)] == [16, 32, 32]
    assert FID(task, context=EvaluationContext()).samples_at(125) == 16  # run length unknown: fid.samples


def test_the_larger_set_begins_with_the_batches_of_the_smaller_one(tmp_path):
    def sampling(task):
        return [b for b in task.eval_batches() if b.get("kind") == "sample"]

    small = sampling(ddpm_tiny_task(tmp_path, "fid.samples=24"))  # eval_batch_size 16: 16 + 8
    large = sampling(ddpm_tiny_task(tmp_path, "fid.samples=24", "fid.final_samples=60"))
    assert large[:len(small)] == small and [b["count"] for b in small] == [16, 8]
    assert [(b["start"], b["count"]) for b in large[len(small):]] == [(24, 16), (40, 16), (56, 4)]


def test_a_small_point_of_a_run_with_final_samples_scores_what_a_run_without_them_does(tmp_path):
    plain = ddpm_tiny_task(tmp_path, "fid.samples=24")
    both = ddpm_tiny_task(tmp_path, "fid.samples=24", "fid.final_samples=40", "fid.final_at=[1.0]")
    torch.manual_seed(0)
    model = plain.build_model().eval()
    context = EvaluationContext(steps=8, eval_every=4)
    small = FID(both, context=context)
    small.begin(4, "raw")
    scores = small.evaluate(model, both.eval_batches())
    held_out = float(sum(len(b["images"]) for b in both.eval_batches() if b.get("kind") != "sample"))
    assert small.details() == {"fid_samples": 24.0, "images": held_out}  # the denoising loss's images, unchanged
    reference = FID(plain, context=context)
    reference.begin(4, "raw")
    assert scores == reference.evaluate(model, plain.eval_batches())
    small.begin(8, "raw")
    large = small.evaluate(model, both.eval_batches())
    assert small.details() == {"fid_samples": 40.0, "images": held_out}
    assert large["fid_standin"] != scores["fid_standin"]


def test_a_run_records_how_many_samples_each_fid_is_of(tmp_path):
    train(ddpm_tiny_config(tmp_path, "averager=lawa,ema", "fid.samples=16", "fid.final_samples=32",
                           "fid.final_at=[1.0]"))
    evals = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "val"]
    assert {(r["step"], r["weights"], r["fid_samples"]) for r in evals} == {
        (s, w, n) for s, n in ((4, 16), (8, 32)) for w in ("raw", "lawa", "ema")}
    # the run's report, and suite eval's of its checkpoints, keep the count out of their metrics
    from typer.testing import CliRunner

    from lawa_suite.cli import app

    assert "fid_samples" not in (tmp_path / "run" / "report.md").read_text()
    scored = tmp_path / "scored"
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "run" / "checkpoints"), f"out={scored}"])
    assert result.exit_code == 0, result.output
    assert "fid_samples" in (scored / "metrics.jsonl").read_text()  # recorded beside the scores
    assert "fid_samples" not in (scored / "report.md").read_text()   # but no metric of the report


def test_the_evaluator_writes_where_its_context_says_not_where_the_task_run_points(tmp_path):
    task = ddpm_tiny_task(tmp_path, "fid.samples=16")
    elsewhere = tmp_path / "elsewhere"
    fid = FID(task, context=EvaluationContext(out=elsewhere / "run", cache=elsewhere / "cache"))
    fid.begin(3, "raw")
    torch.manual_seed(0)
    fid.evaluate(task.build_model().eval(), task.eval_batches())
    assert [p.name for p in (elsewhere / "run" / "samples").iterdir()] == ["step-00000003-raw.png"]
    assert len(list((elsewhere / "cache" / "fid").glob("*.npz"))) == 1
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache" / "fid").exists()


class _TaskOnly(Evaluator):
    """A plugin written before evaluators had a context: its constructor takes the task alone."""
    metrics = {"zero": "min"}

    def __init__(self, task):
        super().__init__(task)

    def evaluate(self, model, batches, accelerator=None):
        return {"zero": 0.0}


class _WithContext(_TaskOnly):
    def __init__(self, task, context=None):
        super().__init__(task)
        self.context = context


def test_an_evaluator_that_takes_only_the_task_still_builds():
    context = EvaluationContext(steps=10)
    assert isinstance(build_evaluator(_TaskOnly, task=None, context=context), _TaskOnly)
    assert build_evaluator(_WithContext, task=None, context=context).context is context
