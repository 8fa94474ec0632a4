"""Each task's training loop on CUDA, through the CUDA stand-in (``lawa_suite.testing.cuda_standin``): a tiny run of
gpt2, cifar and ddpm in fp32 and bf16 with every averager, evaluated and checkpointed, then resumed from its middle
checkpoint to the same end bit for bit (the stand-in computes with the CPU's kernels, so a GPU's nondeterministic
reductions are not modelled: on a GPU resume is exact only with deterministic algorithms, docs/gpu.md).
And the defaults a GPU run gets: fused optimizers, TF32 and cuDNN autotuning (put back after the run), and the
accumulation that keeps a preset's global batch on any number of processes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from lawa_suite import checkpoints as ckpt
from lawa_suite.config import resolve
from lawa_suite.errors import ConfigError
from lawa_suite.testing.cuda_standin import cuda_standin
from lawa_suite.config import accumulation
from lawa_suite.training.loop import Run, train

from helpers import assert_same, final_state, final_state_at

AVERAGERS = ["averager=lawa,ema,swa,wma,phema,bema", "lawa.k=2", "lawa.nu=1", "wma.k=2", "wma.nu=1", "swa.start=1",
             "phema.snapshot_every=2"]


def tiny(task: str, out: Path, precision: str, *extra: str) -> list[str]:
    return [f"task={task}", "preset=tiny", f"out={out}", "steps=4", "eval.every=2", "checkpoint.every=2",
            "checkpoint.keep=5", f"mixed_precision={precision}", "progress=false", *AVERAGERS, *extra]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["gpt2", "cifar", "ddpm"])
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_each_task_trains_evaluates_checkpoints_and_resumes_bit_for_bit_on_cuda(tmp_path, task, precision):
    with cuda_standin():
        train(resolve(tiny(task, tmp_path / "whole", precision)))
        cut = tmp_path / "cut"
        shutil.copytree(tmp_path / "whole", cut)
        shutil.rmtree(cut / "checkpoints" / ckpt.step_dir_name(4))
        train(resolve([*tiny(task, cut, precision), "resume=auto"]))
    weights_a, state_a = final_state(tmp_path / "whole")
    weights_b, state_b = final_state(cut)
    assert_same(weights_a, weights_b)
    assert_same(state_a["averagers"], state_b["averagers"])
    assert_same(state_a["optimizer"], state_b["optimizer"])
    scored = (tmp_path / "whole" / "metrics.jsonl").read_text()
    assert all(f'"weights": "{name}"' in scored for name in ("raw", "lawa", "ema", "swa")), "every average scored"
    first, last = (final_state_at(tmp_path / "whole", step) for step in (2, 4))
    assert any(not torch.equal(first[k], last[k]) for k in first), "the weights trained on the stand-in's cuda"


def test_a_gpu_run_gets_fused_optimizers_and_tf32_and_puts_tf32_back(tmp_path, monkeypatch):
    seen = []
    step = Run.optimizer_step

    def spy(self):
        seen.append((torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark,
                     self.optimizer.param_groups[0]["fused"]))
        return step(self)

    monkeypatch.setattr(Run, "optimizer_step", spy)
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark)
    with cuda_standin():
        train(resolve(["task=gpt2", "preset=tiny", f"out={tmp_path / 'on'}", "steps=2", "warmup=0",
                       "averager=", "progress=false"]))
        train(resolve(["task=cifar", "preset=tiny", f"out={tmp_path / 'off'}", "steps=2", "warmup=0",
                       "averager=", "progress=false", "tf32=false"]))
    assert seen[0] == ("high", True, True) and seen[-1] == (before[0], before[1], True)
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark) == before
    train(resolve(["task=gpt2", "preset=tiny", f"out={tmp_path / 'cpu'}", "steps=1", "warmup=0", "averager=",
                       "progress=false"]))
    assert seen[-1][2] is False, "the CPU keeps the optimizer the CPU reference was measured with"


def test_deterministic_asks_for_deterministic_kernels_while_the_run_lasts(tmp_path, monkeypatch):
    seen = []
    step = Run.optimizer_step

    def spy(self):
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                     torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
        return step(self)

    monkeypatch.setattr(Run, "optimizer_step", spy)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with cuda_standin():
        train(resolve(["task=cifar", "preset=tiny", f"out={tmp_path / 'run'}", "steps=1", "averager=",
                       "progress=false", "deterministic=true"]))
    assert seen == [(True, True, False, ":4096:8")]
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ


@pytest.mark.parametrize("batch, accum, world, expected", [
    (128, 8, 1, (8, 16)),    # one process: as configured
    (128, 8, 4, (2, 64)),    # 4 processes: each a micro-batch of 16, twice a step; global batch 128
    (128, 8, 8, (1, 128)),
    (128, 2, 4, (1, 128)),   # 4 does not divide 2: one micro-batch a step, 32 a process
    (128, 1, 2, (1, 128)),
])
def test_accumulation_keeps_the_global_batch_on_any_number_of_processes(batch, accum, world, expected):
    steps, micro = accumulation(batch, accum, world)
    assert (steps, micro) == expected and steps * micro == batch


def test_a_batch_that_cannot_be_split_over_the_processes_is_one_line():
    with pytest.raises(ConfigError, match=r"^batch_size: 10 examples cannot be split over 4 processes"):
        accumulation(10, 1, 4)
