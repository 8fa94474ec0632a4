"""One host synchronisation a training step when no evaluation or checkpoint is due.

The loop reads the step's loss, gradient norm and the previous step's weights' finite flag in one transfer, and
the averagers observe those weights then (``train.py``). On an accelerator, reading a value that lives on the
device waits for it, and so does a blocking upload from pageable host memory. The runs here go through the CUDA
stand-in (``lawa_suite.testing.cuda_standin``), which counts both (``StandInDevice.syncs``: what
``torch.cuda.set_sync_debug_mode`` flags), in one process and in each of two (DDP over gloo: the stand-in gives gloo
where accelerate asks for nccl); with a real GPU the last test counts the device's own synchronisations.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from lawa_suite import checkpoints as ckpt
from lawa_suite.config import resolve
from lawa_suite.testing.cuda_standin import cuda_standin
from lawa_suite.training.loop import Run, train

from helpers import assert_same, final_state, run_toy, torchrun


def reads_per_step(monkeypatch, overrides: list[str], counter) -> list[int]:
    """Synchronisations between the starts of consecutive optimizer steps (the last step's evaluation is left
    out), as ``counter()`` counts them."""
    starts: list[int] = []
    step = Run.optimizer_step

    def counted_step(self):
        starts.append(counter())
        return step(self)

    monkeypatch.setattr(Run, "optimizer_step", counted_step)
    train(resolve(overrides))
    return [b - a for a, b in zip(starts, starts[1:])]


def standin_syncs_per_step(monkeypatch, overrides: list[str]) -> list[int]:
    with cuda_standin() as device:
        return reads_per_step(monkeypatch, overrides, lambda: device.syncs)


def plain_run(task: str, out: Path) -> list[str]:
    # every step observed (ema), evaluation and checkpoint only after the last step
    return [f"task={task}", "preset=tiny", f"out={out}", "steps=6", "eval.every=1000", "checkpoint.every=0",
            "averager=lawa,ema,swa", "swa.start=1", "progress=false"]


@pytest.mark.parametrize("task", ["cifar", "gpt2", "ddpm"])
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_one_host_synchronisation_a_step_on_cuda(tmp_path, monkeypatch, task, precision):
    # cifar: BatchNorm buffers (held aside for the deferred observation), SGD, uint8 images normalised on the
    # device; gpt2: AdamW, tied weights; ddpm: a UNet, timesteps and noise drawn on the device
    per_step = standin_syncs_per_step(monkeypatch, [*plain_run(task, tmp_path / "run"), f"mixed_precision={precision}"])
    assert per_step == [1] * 5


def test_the_counter_sees_a_second_read(tmp_path, monkeypatch):
    # negative control: observing each step's weights at once (their own finite check) is the old second read
    defer = Run.defer
    monkeypatch.setattr(Run, "defer", lambda self, step: (defer(self, step), self.settle()))
    per_step = standin_syncs_per_step(monkeypatch, plain_run("gpt2", tmp_path / "run"))
    assert per_step == [2] * 5


def test_deferred_observations_equal_immediate_ones(tmp_path, monkeypatch):
    # The averagers see each step's weights during the next step, after its forward pass has moved the BatchNorm
    # statistics: the held copy must be the step's own, bit for bit (the toy model has BatchNorm and dropout).
    run_toy(tmp_path / "deferred", "checkpoint.every=0", "eval.every=100")
    defer = Run.defer
    monkeypatch.setattr(Run, "defer", lambda self, step: (defer(self, step), self.settle()))
    run_toy(tmp_path / "at-once", "checkpoint.every=0", "eval.every=100")
    weights_a, state_a = final_state(tmp_path / "deferred")
    weights_b, state_b = final_state(tmp_path / "at-once")
    assert_same(weights_a, weights_b)
    assert_same(state_a["averagers"], state_b["averagers"])
    assert state_a["averagers"]["ema"]["counters"]["updates"] == 20


def test_weights_that_turn_non_finite_reach_no_averager_through_the_one_read(tmp_path, monkeypatch, spy):
    # The weights after step 3 hold NaN (a BatchNorm statistic, so training goes on); they are checked in step 4's
    # one read and refused. The live statistic is repaired once the held copy is taken, so later steps are fine.
    defer, hold = Run.defer, Run.hold_deferred
    repaired: list[float] = []

    def poison_after_step_3(self, step):
        defer(self, step)
        if step == 3:
            stats = self.unwrapped[1].running_mean
            repaired.append(stats[0].item())
            stats[0] = float("nan")

    def repair_after_holding(self):
        held = hold(self)
        if held is not None and held[0] == 3:
            assert math.isnan(held[1]["1.running_mean"][0].item())  # the held copy is the poisoned one
            self.unwrapped[1].running_mean[0] = repaired[0]
        return held

    monkeypatch.setattr(Run, "defer", poison_after_step_3)
    monkeypatch.setattr(Run, "hold_deferred", repair_after_holding)
    result = run_toy(tmp_path / "run", "averager=spy,ema", "steps=6", "eval.every=100", "checkpoint.every=0")
    assert result.step == 6 and result.skipped_steps == 0
    assert spy.seen == [1, 2, 4, 5, 6]
    _, state = final_state(tmp_path / "run")
    ema = state["averagers"]["ema"]
    assert ema["counters"]["refused"] == 1 and ema["counters"]["updates"] == 5
    tensors, _ = ckpt.flatten_state(ema)
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


@pytest.mark.slow
def test_one_host_synchronisation_a_step_on_each_of_two_processes(tmp_path):
    # One torchrun launch, four runs (a launch costs seconds): each task under DDP on two processes through the
    # stand-in, and the negative control, each step's weights observed at once (the old second read). The stop vote
    # and the finite flag ride in the step's one read on each rank. DDP reads its rebuilt buckets' order back once,
    # in the second step's forward (on a GPU too); the child counts that apart, and the test pins where it is.
    runs = [{"name": task, "args": [*plain_run(task, tmp_path / task), f"mixed_precision={precision}"]}
            for task, precision in (("gpt2", "bf16"), ("cifar", "no"), ("ddpm", "bf16"))]
    runs.append({"name": "second_read", "second_read": True, "args": plain_run("gpt2", tmp_path / "second_read")})
    done = torchrun(Path(__file__).with_name("_host_sync_child.py"), str(tmp_path), json.dumps(runs),
                    env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rank in (0, 1):
        for run in runs:
            counts = json.loads((tmp_path / f"{run['name']}.rank{rank}.json").read_text())
            expected = 2 if run.get("second_read") else 1
            assert counts["loop"] == [expected] * 5, (run["name"], rank, counts)
            assert counts["ddp_setup"] == [0, 2, 0, 0, 0], (run["name"], rank, counts)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: torch.cuda.set_sync_debug_mode counts the device's own synchronisations")
def test_one_cuda_synchronisation_a_step(tmp_path, monkeypatch):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            per_step = reads_per_step(monkeypatch, plain_run("gpt2", tmp_path / "run"),
                                      counter=lambda: sum("synchroniz" in str(w.message) for w in caught))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert per_step == [1] * 5
