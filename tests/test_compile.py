"""``compile=true``: the model is compiled in place, so every name the suite writes or averages is the model's own,
evaluation of swapped-in averaged weights runs through the compiled code and sees them, and resume stays exact.

Compiling costs tens of seconds on 2 busy cores, so these tests are marked slow. The swap and resume tests use the
default inductor backend on the toy model; the name tests run the gpt2 and cifar ``cpu`` presets with the
``aot_eager`` backend (TorchDynamo's capture and AOTAutograd, where parameters become graph inputs, without inductor's
C++ code generation, which took 95 s and 192 s for these two models here): the names come from the module, which
no backend changes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lawa_suite import checkpoints as ckpt
from lawa_suite import registry
from lawa_suite.config import resolve
from lawa_suite.export import export
from lawa_suite.training.scoring import Scorer, forked_rng
from lawa_suite.training.loop import Run, train

from conftest import SimulatedCrash, ToyTask
from helpers import assert_same, final_state, run_toy

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled code is cached per code object with a recompile limit (8): tests of several models in one process
    must not run out of it (a run past the limit would silently fall back to eager code)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def compiled_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.fixture
def aot_eager(monkeypatch):
    """Compile with the aot_eager backend (see the module docstring for why)."""
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_module(self, backend="aot_eager"))


def test_the_compiled_model_scores_the_averaged_weights_swapped_into_it(tmp_path):
    # A compiled graph that kept its own copy of the weights would score the raw weights under every averager's name.
    cfg = resolve(["task=toy", f"out={tmp_path / 'run'}", "compile=true", "averager=ema,lawa", "ema.decay=0.6",
                   "lawa.k=2", "lawa.nu=1"])
    run = Run(cfg)
    for _ in range(6):
        assert run.optimizer_step() is not None
        run.state.step += 1
        run.feed_averagers(run.state.step)
    raw = {k: v.clone() for k, v in run.unwrapped.state_dict().items()}
    compiled = run.scorer.score_all(run.averagers, run.state.step)
    assert compiled_graphs() >= 2  # training and evaluation both ran compiled code
    assert_same(run.unwrapped.state_dict(), raw)  # the raw weights came back bit for bit

    # The same weights loaded into an eager model of the same task by load_state_dict, not by the suite's swap, and
    # scored on the same batches after the same BatchNorm recalibration (same order, same forked RNG: dropout).
    eager_model = run.task.build_model()
    scorer = Scorer(run.task, run.accelerator, eager_model, run.task.eval_batches(), run.scorer.calibration)
    reference = {}
    with forked_rng():
        for name in ("raw", *run.averagers):
            eager_model.load_state_dict(raw if name == "raw" else run.averagers[name].average())
            if name != "raw":
                scorer.recalibrate()
            reference[name] = scorer.score()
    assert compiled.keys() == reference.keys() == {"raw", "ema", "lawa"}
    for name in compiled:
        for metric, value in compiled[name].items():
            assert value == pytest.approx(reference[name][metric], rel=1e-5, abs=1e-6), (name, metric)
    # ...and the averages really differ from the raw weights, so a stale graph could not pass the comparison above
    assert abs(compiled["ema"]["loss"] - compiled["raw"]["loss"]) > 1e-3
    assert abs(compiled["lawa"]["loss"] - compiled["ema"]["loss"]) > 1e-4


def test_resume_with_compile_is_bit_exact(tmp_path):
    # the shape of test_train.test_resume_is_bit_exact (grad_accum=2, killed in step 13, resumed from step 10),
    # compiled: inductor's dropout draws its seeds from the global generator, which the checkpoint restores
    run_toy(tmp_path / "whole", "checkpoint.every=5", "grad_accum=2", "compile=true")
    ToyTask.crash_at = 13
    with pytest.raises(SimulatedCrash):
        run_toy(tmp_path / "resumed", "checkpoint.every=5", "grad_accum=2", "compile=true")
    ToyTask.crash_at = None
    run_toy(tmp_path / "resumed", "checkpoint.every=5", "grad_accum=2", "compile=true", "resume=auto")
    assert compiled_graphs() >= 2
    weights_a, state_a = final_state(tmp_path / "whole")
    weights_b, state_b = final_state(tmp_path / "resumed")
    assert_same(weights_a, weights_b)
    for part in ("optimizer", "averagers", "stream", "train"):
        assert_same(state_a[part], state_b[part], part)


def names_in(out: Path) -> dict[str, list[str]]:
    """Every tensor name the run folder holds, by where it is."""
    last = ckpt.list_checkpoints(out / "checkpoints")[-1].path
    state = ckpt.read_state(last, "state")
    found = {"checkpoint": sorted(load_file(str(last / "model.safetensors")))}
    for name, saved in state["averagers"].items():
        found[f"averager {name}"] = sorted(saved["layout"]["names"])
    for path in sorted((out / "trajectory").glob("*.safetensors")):
        found[path.name] = sorted(load_file(str(path)))
    return found


@pytest.mark.parametrize("task", ["gpt2", "cifar"])
def test_compile_keeps_every_name_of_the_cpu_presets(tmp_path, aot_eager, task):
    out = tmp_path / "run"
    train(resolve([f"task={task}", "preset=cpu", f"out={out}", "compile=true", "steps=2", "warmup=0",
                   "eval.every=2", "eval.batches=1", "trajectory.every=1", "progress=false", "lawa.k=2", "lawa.nu=1",
                   "swa.start=1"]))
    assert compiled_graphs() >= 2
    assert yaml.safe_load((out / "config.yaml").read_text())["compile"] is True
    cfg = resolve([f"task={task}", "preset=cpu", f"out={tmp_path / 'unused'}"])
    task_obj = registry.tasks.get(task)(cfg.task, cfg.run)
    task_obj.setup()
    own = sorted(task_obj.build_model().state_dict())
    found = names_in(out)
    assert set(found) >= {"checkpoint", "averager lawa", "averager ema", "averager swa", "step-00000001.safetensors"}
    for where, names in found.items():
        assert not any("_orig_mod" in n for n in names), where
    for where, names in found.items():
        assert names == own, where
    evaluated = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["weights"] for r in evaluated if r["split"] == "val"} == {"raw", "lawa", "ema", "swa"}
    if task == "gpt2":  # a Hugging Face folder that loads strictly: its names are GPT-2's own
        export(ckpt.list_checkpoints(out / "checkpoints")[-1].path, tmp_path / "hf", weights_name="ema")
        assert (tmp_path / "hf" / "model.safetensors").is_file()
