"""Schedule-free training (``optimizer=schedulefree``, ``lawa_suite.tasks.schedule_free``): the raw evaluation
scores the optimizer's eval sequence (BatchNorm recalibrated for it), averagers observe the live weights, one
warm-up applies, any other schedule is refused, and evaluation and resume leave training bit for bit as it was."""

from __future__ import annotations

import shutil
import sys

import pytest
import schedulefree
import torch
from safetensors.torch import load_file

from lawa_suite import checkpoints as ckpt
from lawa_suite import registry
from lawa_suite.config import ConfigError, RunConfig, resolve
from lawa_suite.training.scoring import Scorer
from lawa_suite.tasks import schedule_free
from lawa_suite.testing.cuda_standin import cuda_standin
from lawa_suite.training.loop import Run, train
from lawa_suite.training.settings import lr_factor

from helpers import assert_same, final_state, raw_scores, restored, sf_run


def by_hand(task, model, calibration: bool) -> dict[str, float]:
    from accelerate import Accelerator

    scorer = Scorer(task, Accelerator(cpu=True), model, task.eval_batches(),
                    task.calibration_batches(task.run.eval.bn_batches) if calibration else [])
    with torch.no_grad():
        scorer.recalibrate()
    return scorer.score()


def test_the_raw_evaluation_scores_the_optimizers_eval_weights(tmp_path):
    cfg = resolve(sf_run("gpt2", tmp_path / "run"))
    train(cfg)
    task, model, optimizer = restored(cfg, tmp_path / "run", 4)
    live = by_hand(task, model, calibration=False)
    optimizer.eval()  # the package's own switch to x, on a copy rebuilt from the checkpoint
    expected = by_hand(task, model, calibration=False)
    scored = raw_scores(tmp_path / "run")[4]
    assert scored["loss"] == expected["loss"] and scored["perplexity"] == expected["perplexity"]
    assert live["loss"] != expected["loss"], "the live (train-sequence) weights score otherwise: a real check"


def test_cifar_recalibrates_batchnorm_for_the_eval_weights(tmp_path):
    cfg = resolve(sf_run("cifar", tmp_path / "run"))
    train(cfg)
    task, model, optimizer = restored(cfg, tmp_path / "run", 4)
    optimizer.eval()
    stale = by_hand(task, model, calibration=False)  # the statistics training gathered for the live weights
    expected = by_hand(task, model, calibration=True)
    scored = raw_scores(tmp_path / "run")[4]
    assert scored["loss"] == expected["loss"] and scored["accuracy"] == expected["accuracy"]
    assert stale["loss"] != expected["loss"], "recalibration changes the score: a real check"


@pytest.mark.parametrize("task", ["gpt2", "cifar", "ddpm"])
def test_a_schedule_free_run_resumes_bit_for_bit(tmp_path, task):
    train(resolve(sf_run(task, tmp_path / "whole")))
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut)
    shutil.rmtree(cut / "checkpoints" / ckpt.step_dir_name(4))
    train(resolve(sf_run(task, cut, "resume=auto")))
    weights_a, state_a = final_state(tmp_path / "whole")
    weights_b, state_b = final_state(cut)
    assert_same(weights_a, weights_b)
    assert_same(state_a["optimizer"], state_b["optimizer"])  # z, k, weight_sum, lr_max, train_mode
    assert_same(state_a["averagers"], state_b["averagers"])
    assert raw_scores(tmp_path / "whole")[4] == raw_scores(cut)[4]
    assert all(group["train_mode"] for group in state_a["optimizer"]["param_groups"]), "saved in train mode"


def test_evaluating_never_moves_the_live_weights(tmp_path):
    """Scoring x and the averages every step (mode switches inside the weight swap) trains exactly as a run that
    evaluates only at the end: the swap puts the exact train-sequence weights back, not a lerp round trip."""
    train(resolve(sf_run("cifar", tmp_path / "often", "eval.every=1", "checkpoint.every=0")))
    train(resolve(sf_run("cifar", tmp_path / "once", "eval.every=100", "checkpoint.every=0")))
    weights_a, state_a = final_state(tmp_path / "often")
    weights_b, state_b = final_state(tmp_path / "once")
    assert_same(weights_a, weights_b)
    assert_same(state_a["optimizer"], state_b["optimizer"])
    assert len(raw_scores(tmp_path / "often")) == 4


def test_averagers_observe_the_live_weights_and_keep_their_profile(tmp_path):
    """Each average equals its documented profile applied to the weights the trajectory files hold (the live,
    train-sequence weights): online averaging of a schedule-free run is post-hoc averaging of its trajectory."""
    steps = 6
    cfg = resolve(sf_run("gpt2", tmp_path / "run", f"steps={steps}", "trajectory.every=1",
                          "averager=ema,swa", "ema.decay=0.6", "swa.start=2"))
    train(cfg)
    trajectory = [load_file(str(tmp_path / "run" / "trajectory" / f"step-{s:08d}.safetensors"))
                  for s in range(1, steps + 1)]
    weights, state = final_state(tmp_path / "run")
    assert_same(trajectory[-1], weights)
    for name in ("ema", "swa"):
        averager = cfg.build_averagers()[name]
        averager.start_run(steps)
        averager.load_state_dict(state["averagers"][name])
        average = averager.average()
        profile = type(averager).documented_profile(cfg.averagers[name], steps)
        for key, value in average.items():
            if value.is_floating_point():
                expected = sum(w * t[key].double() for w, t in zip(profile, trajectory))
                torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-6, msg=f"{name} {key}")


def test_the_loops_warm_up_is_the_packages_own_and_the_only_one():
    """lr_factor's warm-up with warmup_steps=0 (what the loop does) steps exactly as the package's own warm-up at a
    constant learning rate; both together would warm up twice, which prepare() refuses."""
    torch.manual_seed(0)
    start = torch.randn(5, 3)
    grads = [torch.randn(5, 3) for _ in range(6)]
    rc = RunConfig(steps=10, warmup=3, schedule="constant", lr=0.1)
    loop = torch.nn.Parameter(start.clone())
    own = torch.nn.Parameter(start.clone())
    by_loop = schedule_free.adamw([loop], rc.lr, rc.schedulefree, betas=(0.9, 0.999))
    by_package = schedulefree.AdamWScheduleFree([own], lr=rc.lr, warmup_steps=rc.warmup, foreach=True)
    by_package.train()
    for step, grad in enumerate(grads):
        by_loop.param_groups[0]["lr"] = rc.lr * lr_factor(step, rc)
        loop.grad, own.grad = grad.clone(), grad.clone()
        by_loop.step()
        by_package.step()
    assert torch.equal(loop, own) and torch.equal(by_loop.state[loop]["z"], by_package.state[own]["z"])
    assert schedule_free.prepare(by_loop, rc) is True
    with pytest.raises(ConfigError, match=r"^warmup: the task's schedule-free optimizer warms up over 3 steps"):
        schedule_free.prepare(by_package, rc)
    with pytest.raises(ConfigError, match=r"^schedule: a schedule-free optimizer replaces"):
        schedule_free.prepare(by_loop, RunConfig(steps=10, schedule="cosine"))
    assert schedule_free.prepare(torch.optim.SGD([loop], lr=0.1), rc) is False


@pytest.mark.parametrize("task, kind, beta", [("gpt2", "AdamWScheduleFree", 0.9), ("cifar", "SGDScheduleFree", 0.8),
                                              ("ddpm", "AdamWScheduleFree", 0.9)])
def test_every_task_builds_its_schedule_free_optimizer_from_typed_keys(task, kind, beta):
    cfg = resolve([f"task={task}", "preset=tiny", "optimizer=schedulefree", "schedulefree.r=1",
                   "schedulefree.weight_lr_power=0.5", "cifar.momentum=0.8" if task == "cifar" else "seed=0"])
    built = registry.tasks.get(task)(cfg.task, cfg.run)
    optimizer = built.build_optimizer(torch.nn.Linear(3, 2), cfg.run.lr)
    group = optimizer.param_groups[0]
    assert type(optimizer).__name__ == kind and group["train_mode"] and group["warmup_steps"] == 0
    assert (group["r"], group["weight_lr_power"]) == (1.0, 0.5)
    assert group.get("momentum", group.get("betas", (None,))[0]) == beta
    assert group["foreach"] and cfg.run.schedule == "constant"


def test_a_presets_schedule_gives_way_and_an_asked_one_is_refused():
    cfg = resolve(["task=gpt2", "optimizer=schedulefree"])  # the cpu preset: cosine with a 30-step warm-up
    assert (cfg.run.schedule, cfg.run.warmup, cfg.task.optimizer) == ("constant", 30, "schedulefree")
    assert resolve(["task=gpt2"]).run.schedule == "cosine", "only a schedule-free run changes"
    refusals = {
        ("optimizer=schedulefree", "schedule=cosine"): r"^schedule: optimizer=schedulefree replaces .* got 'cosine'$",
        ("optimizer=schedulefree", "schedulefree.r=-1"): r"^schedulefree.r: expected a number >= 0, got -1",
        ("optimizer=schedulefree", "schedulefree.weight_lr_power=x"): r"^schedulefree.weight_lr_power",
        ("schedulefree.r=1",): r"^schedulefree.r: only used with optimizer=schedulefree \(gpt2.optimizer is adamw\)",
        ("optimizer=schedulefree", "beta1=0"): r"^gpt2.beta1: expected a number in \(0, 1\) with optimizer=sched",
        ("optimizer=lion",): r"optimizer",
    }
    for words, message in refusals.items():
        with pytest.raises(ConfigError, match=message) as caught:
            resolve(["task=gpt2", *words])
        assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match=r"^cifar.momentum: expected a number in \(0, 1\) with optimizer=schedu"):
        resolve(["task=cifar", "optimizer=schedulefree", "momentum=0", "nesterov=false"])


def test_a_schedule_free_run_on_cuda_uses_foreach_one_read_a_step_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    """Through the CUDA stand-in: no fused kernel exists for these optimizers, the step adds no host read (its
    learning rates and weights are Python numbers), and resume is exact."""
    starts: list[int] = []
    step = Run.optimizer_step
    six = ["steps=6", "eval.every=100", "checkpoint.every=3"]
    with cuda_standin() as device:
        def counted(self):
            starts.append(device.syncs)
            assert self.optimizer.param_groups[0]["foreach"] and not self.optimizer.param_groups[0].get("fused")
            return step(self)

        monkeypatch.setattr(Run, "optimizer_step", counted)
        train(resolve(sf_run("gpt2", tmp_path / "whole", *six)))
        monkeypatch.setattr(Run, "optimizer_step", step)
        cut = tmp_path / "cut"
        shutil.copytree(tmp_path / "whole", cut)
        shutil.rmtree(cut / "checkpoints" / ckpt.step_dir_name(6))
        train(resolve(sf_run("gpt2", cut, *six, "resume=auto")))
    per_step = [b - a for a, b in zip(starts, starts[1:])]
    assert per_step[:2] + per_step[3:] == [1] * 4  # (step 3's checkpoint reads the weights)
    assert_same(final_state(tmp_path / "whole")[0], final_state(cut)[0])
    assert_same(final_state(tmp_path / "whole")[1]["optimizer"], final_state(cut)[1]["optimizer"])


def test_without_the_package_the_option_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "schedulefree", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"^optimizer: schedulefree needs the schedulefree package; pip install"):
        schedule_free.sgd([torch.nn.Parameter(torch.zeros(2))], 0.1, RunConfig().schedulefree, momentum=0.9)


def test_a_score_that_fails_leaves_the_live_weights_and_the_optimizer_in_train_mode(tmp_path, monkeypatch):
    from accelerate import Accelerator

    from lawa_suite.training.scoring import Scorer
    from lawa_suite.tasks.schedule_free import EvalSequence

    cfg = resolve(sf_run("gpt2", tmp_path / "run"))
    train(cfg)
    task, model, optimizer = restored(cfg, tmp_path / "run", 4)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    scorer = Scorer(task, Accelerator(cpu=True), model, task.eval_batches(), [], raw_weights=EvalSequence(optimizer))

    def fails(step, weights):  # an out-of-memory error, missing FID data: the evaluation stops halfway
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(scorer, "score", fails)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        scorer.score_all({}, 4)
    assert_same(model.state_dict(), live)  # y, exactly, not x
    assert all(group["train_mode"] for group in optimizer.param_groups)
