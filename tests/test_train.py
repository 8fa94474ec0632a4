"""The training loop on the toy task: artifacts, step boundaries, evaluation isolation, exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lawa_suite import checkpoints as ckpt
from lawa_suite.training import checkpointing as run_checkpoints
from lawa_suite.config import ConfigError, resolve
from lawa_suite.training.loop import NonFiniteTraining, Preempted, train
from lawa_suite.training.settings import lr_factor

from conftest import SimulatedCrash, ToyTask
from helpers import assert_same, final_state, read_metrics, run_toy


def test_run_writes_everything(tmp_path):
    out = tmp_path / "run"
    result = run_toy(out, "trajectory.every=5", "checkpoint.every=10")
    assert result.step == 20
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["task"] == "toy" and config["lawa"]["k"] == 3 and config["toy"]["hidden"] == 16
    records = read_metrics(out)
    evals = [r for r in records if r["split"] == "val"]
    assert {r["weights"] for r in evals} == {"raw", "lawa", "ema", "swa"}
    assert {r["step"] for r in evals if r["weights"] == "raw"} == {5, 10, 15, 20}
    assert all(0 <= r["accuracy"] <= 1 and r["loss"] > 0 for r in evals)
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 21))
    # lawa (k=3, nu=2) is ready from step 6, swa (start=0.5) from step 10
    assert {r["weights"] for r in evals if r["step"] == 5} == {"raw", "ema"}
    assert {r["weights"] for r in evals if r["step"] == 10} == {"raw", "lawa", "ema", "swa"}
    assert [c.step for c in ckpt.list_checkpoints(out / "checkpoints")] == [10, 20]
    saved = sorted(p.name for p in (out / "trajectory").iterdir())
    assert saved == ["SHA256SUMS"] + [f"step-{s:08d}.safetensors" for s in (5, 10, 15, 20)]  # and their sha256s
    report = (out / "report.md").read_text()
    assert "| raw |" in report and "| lawa |" in report and "best accuracy (step)" in report
    assert (out / "curves.png").stat().st_size > 10_000
    assert not ckpt.verify(out / "checkpoints" / "step-00000020")


def test_lr_schedule():
    cfg = resolve(["task=toy", "steps=100", "warmup=10", "lr=1.0", "min_lr=0.1"]).run
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0) and lr_factor(100, cfg) == pytest.approx(0.1)
    assert lr_factor(55, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    constant = resolve(["task=toy", "schedule=constant"]).run
    assert lr_factor(15, constant) == 1.0


@pytest.mark.parametrize(("shape", "at_half_decay"), [("linear", 0.5), ("1-sqrt", 1 - 0.5 ** 0.5)])
def test_wsd_schedule_warms_up_holds_then_decays_over_its_fraction(shape: str, at_half_decay: float) -> None:
    rc = resolve(["task=toy", "schedule=wsd", "steps=100", "warmup=10", "decay_fraction=0.2", "min_lr=0",
                  f"decay_shape={shape}"]).run
    assert lr_factor(0, rc) == pytest.approx(0.1) and lr_factor(9, rc) == pytest.approx(1.0)
    assert [lr_factor(s, rc) for s in (10, 50, 79, 80)] == [1.0, 1.0, 1.0, 1.0]  # stable until step 80
    assert lr_factor(90, rc) == pytest.approx(at_half_decay)
    assert lr_factor(100, rc) == pytest.approx(0.0)
    with pytest.raises(ConfigError, match="decay_fraction: expected a fraction in"):
        resolve(["task=toy", "schedule=wsd", "decay_fraction=0"])


def test_averagers_see_optimizer_steps_not_micro_batches(tmp_path, spy):
    run_toy(tmp_path / "run", "averager=spy", "grad_accum=4", "steps=6")
    assert spy.seen == [1, 2, 3, 4, 5, 6]
    assert len(ToyTask.consumed) == 6 * 16  # 4 micro-batches of 4 per step


def test_evaluation_does_not_change_training(tmp_path):
    # Scoring swaps averaged weights in, recalibrates BatchNorm and draws random numbers: none of it may leak.
    run_toy(tmp_path / "often", "eval.every=1")
    run_toy(tmp_path / "rarely", "eval.every=20")
    weights_often, state_often = final_state(tmp_path / "often")
    weights_rarely, state_rarely = final_state(tmp_path / "rarely")
    assert_same(weights_often, weights_rarely)
    assert_same(state_often["averagers"], state_rarely["averagers"])


def crash_then_resume(out: Path, crash_at: int, *overrides: str):
    ToyTask.crash_at = crash_at
    with pytest.raises(SimulatedCrash):
        run_toy(out, "checkpoint.every=5", *overrides)
    ToyTask.crash_at = None
    return run_toy(out, "checkpoint.every=5", "resume=auto", *overrides)


def test_resume_is_bit_exact(tmp_path):
    run_toy(tmp_path / "whole", "checkpoint.every=5", "grad_accum=2")
    uninterrupted = list(ToyTask.consumed)
    ToyTask.consumed = []
    crash_then_resume(tmp_path / "resumed", 13, "grad_accum=2")  # resumes from step 10, mid-epoch
    weights_a, state_a = final_state(tmp_path / "whole")
    weights_b, state_b = final_state(tmp_path / "resumed")
    assert_same(weights_a, weights_b)
    for part in ("optimizer", "averagers", "stream", "train"):
        assert_same(state_a[part], state_b[part], part)
    # The resumed run replays steps 11-13: the consumed samples are the uninterrupted sequence plus that replay.
    per_step = 16
    assert ToyTask.consumed[:13 * per_step] == uninterrupted[:13 * per_step]
    assert ToyTask.consumed[13 * per_step:] == uninterrupted[10 * per_step:]
    metrics = read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in metrics if r["split"] == "train"] == list(range(1, 21))  # no duplicated lines


def test_resume_negative_control_without_rng(tmp_path, monkeypatch):
    # Proves the exact-resume test can fail: without restoring RNG state, dropout masks differ after resume.
    run_toy(tmp_path / "whole", "checkpoint.every=5")
    monkeypatch.setattr(run_checkpoints, "set_rng_state", lambda state: None)
    crash_then_resume(tmp_path / "resumed", 13)
    weights_a, _ = final_state(tmp_path / "whole")
    weights_b, _ = final_state(tmp_path / "resumed")
    assert any(not torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_existing_run_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    run_toy(out, "steps=4", "eval.every=2")
    before = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run; pass resume=auto"):
        run_toy(out, "steps=4")
    with pytest.raises(ConfigError, match="differs from the saved run's in lr"):
        run_toy(out, "steps=4", "eval.every=2", "resume=auto", "lr=0.5")
    assert (out / "metrics.jsonl").read_bytes() == before


def test_a_run_that_failed_before_its_first_step_can_be_started_again(tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(ToyTask, "setup", lambda self: (_ for _ in ()).throw(FileNotFoundError("no data")))
    with pytest.raises(FileNotFoundError):
        run_toy(out, "steps=4", "lr=0.5")
    assert not out.exists(), "a run refused before it could start creates nothing (was: config.yaml)"
    out.mkdir()
    (out / "config.yaml").write_text(resolve(["task=toy", f"out={out}", "steps=4", "lr=0.5"]).to_yaml())
    monkeypatch.undo()  # a folder an older version left with only its config.yaml may be reused
    assert run_toy(out, "steps=4", "eval.every=2").step == 4      # another config: nothing was lost by replacing it
    assert "lr: 0.05" in (out / "config.yaml").read_text()


def test_changing_averagers_on_resume_needs_consent(tmp_path):
    out = tmp_path / "run"
    ToyTask.crash_at = 8
    with pytest.raises(SimulatedCrash):
        run_toy(out, "checkpoint.every=5", "averager=ema")
    ToyTask.crash_at = None
    with pytest.raises(ConfigError, match="averager.*reset_averagers=true"):
        run_toy(out, "checkpoint.every=5", "averager=ema,lawa", "resume=auto")
    result = run_toy(out, "checkpoint.every=5", "averager=ema,lawa", "resume=auto", "reset_averagers=true")
    assert result.step == 20
    _, state = final_state(out)
    assert state["averagers"]["lawa"]["counters"]["updates"] == 8  # steps 6..20 divisible by nu=2, from step 5 on


def test_non_finite_steps_are_skipped_and_never_averaged(tmp_path, spy):
    ToyTask.nan_at = {3}
    result = run_toy(tmp_path / "run", "averager=spy,ema", "steps=6")
    assert result.step == 6 and result.skipped_steps == 1
    assert spy.seen == [1, 2, 3, 4, 5, 6]  # the skipped attempt after step 3 never reached an averager
    assert len(ToyTask.consumed) == 7 * 16  # ...but it did consume a batch
    skipped = [r for r in read_metrics(tmp_path / "run") if r.get("skipped")]
    assert len(skipped) == 1 and skipped[0]["step"] == 3
    _, state = final_state(tmp_path / "run")
    ema_tensors, _ = ckpt.flatten_state(state["averagers"]["ema"])
    assert ema_tensors and all(torch.isfinite(t).all() for t in ema_tensors.values() if t.is_floating_point())


def test_too_many_non_finite_steps_stop_the_run(tmp_path):
    ToyTask.nan_from = 4  # the step counter does not advance while steps are skipped: every retry is NaN
    with pytest.raises(NonFiniteTraining, match="3 steps in a row"):
        run_toy(tmp_path / "run", "max_bad_steps=3", "checkpoint.every=2")
    committed = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [c.step for c in committed][-1] == 4 and not ckpt.verify(committed[-1].path)


def test_sigterm_saves_within_the_step_and_resume_is_exact(tmp_path):
    run_toy(tmp_path / "whole", "checkpoint.every=5")
    ToyTask.sigterm_at = 12  # arrives during the 13th optimizer step
    with pytest.raises(Preempted, match="after step 13"):
        run_toy(tmp_path / "preempted", "checkpoint.every=5")
    assert [c.step for c in ckpt.list_checkpoints(tmp_path / "preempted" / "checkpoints")][-1] == 13
    run_toy(tmp_path / "preempted", "checkpoint.every=5", "resume=auto")
    weights_a, state_a = final_state(tmp_path / "whole")
    weights_b, state_b = final_state(tmp_path / "preempted")
    assert_same(weights_a, weights_b)
    assert_same(state_a["averagers"], state_b["averagers"])


def test_weights_are_checked_once_per_step_and_non_finite_ones_reach_no_averager(tmp_path, monkeypatch):
    import lawa_suite.averagers.base as base
    from lawa_suite.training.loop import Run

    run = Run(resolve(["task=toy", f"out={tmp_path / 'run'}", "averager=lawa,ema,swa", "lawa.nu=1", "swa.start=0"]))
    # the loop checks (train.all_finite), not each averager (base.all_finite, inside observe)
    monkeypatch.setattr(base, "all_finite", lambda tensors: pytest.fail("an averager ran its own NaN/Inf check"))
    weight = next(run.unwrapped.parameters())
    with torch.no_grad():
        saved = weight[0, 0].item()
        weight[0, 0] = float("nan")
        run.feed_averagers(1)
        assert all(avg.refused == 1 and avg.updates == 0 for avg in run.averagers.values())
        weight[0, 0] = saved
    run.feed_averagers(2)
    assert all(avg.updates == 1 for avg in run.averagers.values())


def test_tensorboard_overlays_raw_and_every_averager_on_one_chart_per_metric(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    out = tmp_path / "run"
    train(resolve(["task=toy", f"out={out}", "steps=10", "trackers=tensorboard"]))
    events = EventAccumulator(str(out / out.name)).Reload()  # accelerate logs into <project>/<run name>
    tags = set(events.Tags()["scalars"])
    assert {"val/accuracy/raw", "val/accuracy/lawa", "val/accuracy/ema", "val/accuracy/swa", "val/loss/raw"} <= tags
    layout = layout_pb2.Layout()  # the layout travels as a string tensor under the custom-scalars plugin's tag
    layout.ParseFromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert charts["accuracy"] == [r"val/accuracy/.*"] and charts["loss"] == [r"val/loss/.*"]


def test_the_time_to_go_counts_the_evaluations_left():
    from lawa_suite.training.progress import eta_seconds, evaluations_left

    assert evaluations_left(0, 100, 10) == 10 and evaluations_left(95, 100, 10) == 1
    assert evaluations_left(0, 105, 10) == 11 and evaluations_left(100, 105, 10) == 1  # the final one too
    assert evaluations_left(100, 100, 10) == 0
    # 50 steps of 0.1 s and 5 evaluations of 30 s: the evaluations are most of the time left
    assert eta_seconds(50, 100, 10, step_seconds=0.1, eval_seconds=30.0) == pytest.approx(155.0)


def test_how_often_checkpoints_are_saved_may_change_on_resume(tmp_path):
    # a run saved before checkpoints followed evaluations has checkpoint.every=0 in its config.yaml
    out = tmp_path / "run"
    train(resolve(["task=toy", f"out={out}", "steps=10", "checkpoint.every=0"]))
    resumed = train(resolve(["task=toy", f"out={out}", "steps=10", "resume=auto"]))
    assert resumed.step == 10


def test_two_runs_in_one_process_may_use_different_mixed_precision(tmp_path):
    # accelerate's singleton refused the second ("AcceleratorState has already been initialized")
    assert run_toy(tmp_path / "a", "steps=2", "mixed_precision=no").step == 2
    assert run_toy(tmp_path / "b", "steps=2", "mixed_precision=bf16").step == 2
