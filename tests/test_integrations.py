"""lawa_suite.integrations: the transformers Trainer callback and the ``averaged_weights`` context manager.

Oracles: ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn`` for EMA, means of the weights
captured after each step for SWA and LAWA, a loss computed by hand on a fresh model holding the average for the
averagers' eval metrics, ``torch.optim.swa_utils.update_bn`` for BatchNorm recalibration. The two examples of
docs/integrations.md run here as written, only their step counts scaled down.
"""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

from lawa_suite import registry
from lawa_suite.errors import AnalysisError, ConfigError, RegistryError
from lawa_suite.integrations import AveragingCallback, averaged_weights, build_averagers

from helpers import assert_same

transformers = pytest.importorskip("transformers", reason="the Trainer callback needs transformers")
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

INTEGRATIONS_DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
VOCAB, SEQ = 64, 16


# -- tiny GPT-2 and a Trainer ---------------------------------------------------------------------------------
def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=VOCAB, n_positions=SEQ))


def token_set(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, VOCAB, (count, SEQ), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": row, "labels": row} for row in ids]


def trainer_args(out: Path, **overrides: Any) -> TrainingArguments:
    settings = dict(output_dir=str(out), max_steps=10, per_device_train_batch_size=4, per_device_eval_batch_size=4,
                    learning_rate=1e-2, eval_strategy="steps", eval_steps=5, logging_steps=5, save_strategy="no",
                    use_cpu=True, report_to=[], disable_tqdm=True, seed=0, dataloader_num_workers=0)
    return TrainingArguments(**{**settings, **overrides})


def clone(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Probe(TrainerCallback):
    """Placed after the AveragingCallback: keeps the weights after every step and an EMA oracle, and at every
    evaluation (after the averagers were scored) checks the raw weights are the ones the step left."""

    def __init__(self, model: nn.Module, decay: float):
        self.steps: list[int] = []
        self.weights: list[dict[str, torch.Tensor]] = []
        self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.evaluations = 0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append(state.global_step)
        self.weights.append(clone(model))
        self.ema.update_parameters(model)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        assert_same(clone(model), self.weights[-1])
        assert model.training is False  # as the Trainer's evaluation leaves it
        self.evaluations += 1


def loss_separately(weights: dict[str, torch.Tensor], data: list[dict[str, torch.Tensor]], out: Path) -> float:
    """The eval loss of a fresh model holding ``weights``, scored by a Trainer of its own on ``data``."""
    model = tiny_gpt2(seed=123)
    model.load_state_dict(weights)
    return Trainer(model=model, args=trainer_args(out), eval_dataset=data).evaluate()["eval_loss"]


def entries(trainer: Trainer, key: str) -> dict[int, float]:
    return {e["step"]: e[key] for e in trainer.state.log_history if key in e}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny Trainer run (10 steps, evaluations at 5 and 10) with EMA, SWA and LAWA(k=2, nu=3) attached."""
    out = tmp_path_factory.mktemp("trainer")
    model = tiny_gpt2()
    train_set, eval_set = token_set(48, seed=1), token_set(16, seed=2)
    callback = AveragingCallback({"ema": {"decay": 0.8}, "swa": {"start": 0}, "lawa": {"k": 2, "nu": 3}})
    probe = Probe(model, decay=0.8)
    trainer = Trainer(model=model, args=trainer_args(out), train_dataset=train_set, eval_dataset=eval_set,
                      callbacks=[callback, probe])
    callback.attach(trainer)
    trainer.train()
    return dict(trainer=trainer, callback=callback, probe=probe, train_set=train_set, eval_set=eval_set, out=out)


# -- the Trainer callback -------------------------------------------------------------------------------------
def test_every_averager_observes_exactly_each_optimizer_step(trained):
    callback, probe = trained["callback"], trained["probe"]
    assert probe.steps == list(range(1, 11))
    assert callback.averagers["ema"].updates == 10 and callback.averagers["ema"].last_step == 10
    assert callback.averagers["swa"].updates == 10
    assert callback.averagers["lawa"].last_step == 9  # LAWA keeps a snapshot at steps divisible by nu=3


def test_averages_equal_independent_oracles(trained):
    callback, probe = trained["callback"], trained["probe"]
    ema = callback.averagers["ema"].average()
    oracle = probe.ema.module.state_dict()
    for name, tensor in ema.items():
        if tensor.is_floating_point():
            assert torch.equal(tensor, oracle[name]), name  # the same fused lerp: bit for bit
    weights = probe.weights
    swa, lawa = callback.averagers["swa"].average(), callback.averagers["lawa"].average()
    for name in swa:
        if swa[name].is_floating_point():
            mean_all = torch.stack([w[name].double() for w in weights]).mean(0)
            torch.testing.assert_close(swa[name].double(), mean_all, rtol=0, atol=1e-6)
            mean_69 = (weights[5][name].double() + weights[8][name].double()) / 2  # steps 6 and 9
            torch.testing.assert_close(lawa[name].double(), mean_69, rtol=0, atol=1e-6)


def test_each_ready_average_is_scored_next_to_raw_at_every_evaluation(trained):
    trainer, probe = trained["trainer"], trained["probe"]
    assert probe.evaluations == 2  # raw weights were back, bit for bit, after each scoring (Probe checks)
    assert set(entries(trainer, "eval_loss")) == {5, 10}
    assert set(entries(trainer, "eval_ema_loss")) == {5, 10}
    assert set(entries(trainer, "eval_swa_loss")) == {5, 10}
    assert set(entries(trainer, "eval_lawa_loss")) == {10}  # not ready at step 5 (needs snapshots 3 and 6)
    assert not any(k.endswith("model_preparation_time") and "_ema_" in k for e in trainer.state.log_history for k in e)


def test_an_averages_eval_loss_is_that_of_a_model_holding_it(trained, tmp_path):
    trainer, callback, eval_set = trained["trainer"], trained["callback"], trained["eval_set"]
    assert entries(trainer, "eval_loss")[10] == loss_separately(clone(trainer.model), eval_set, tmp_path)
    for name in ("ema", "swa", "lawa"):
        separately = loss_separately(callback.averagers[name].average(), eval_set, tmp_path)
        assert entries(trainer, f"eval_{name}_loss")[10] == separately, name
    assert entries(trainer, "eval_ema_loss")[10] != pytest.approx(entries(trainer, "eval_loss")[10], rel=1e-4)


def test_trainer_evaluate_returns_the_averages_metrics_without_recursing(trained):
    trainer, callback = trained["trainer"], trained["callback"]
    before = clone(trainer.model)
    metrics = trainer.evaluate()
    assert metrics["eval_ema_loss"] == pytest.approx(entries(trainer, "eval_ema_loss")[10], rel=1e-6)
    assert {"eval_swa_loss", "eval_lawa_loss", "eval_loss"} <= set(metrics)
    assert_same(clone(trainer.model), before)
    assert not callback._scoring
    # a dict of eval sets: each set's averages under its own prefix
    both = trainer.evaluate({"a": trained["eval_set"][:8], "b": trained["eval_set"][8:]})
    assert {"eval_a_ema_loss", "eval_b_ema_loss", "eval_a_loss", "eval_b_loss"} <= set(both)


def test_the_callback_never_changes_training(trained, tmp_path):
    model = tiny_gpt2()
    trainer = Trainer(model=model, args=trainer_args(tmp_path), train_dataset=trained["train_set"],
                      eval_dataset=trained["eval_set"])
    trainer.train()
    assert_same(clone(model), clone(trained["trainer"].model))
    assert entries(trainer, "eval_loss") == entries(trained["trainer"], "eval_loss")


def test_training_refuses_to_start_without_attach(tmp_path):
    callback = AveragingCallback(["ema"])
    trainer = Trainer(model=tiny_gpt2(), args=trainer_args(tmp_path, max_steps=2), train_dataset=token_set(8, 1),
                      eval_dataset=token_set(4, 2), callbacks=[callback])
    with pytest.raises(ConfigError, match=r"not attached .* callback\.attach\(trainer\)"):
        trainer.train()
    assert callback.averagers["ema"].updates == 0


def test_attach_adds_the_callback_once_and_checks_its_argument(tmp_path):
    args = trainer_args(tmp_path, max_steps=2, eval_steps=1, gradient_accumulation_steps=3)
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=token_set(24, 1), eval_dataset=token_set(4, 2))
    callback = AveragingCallback(["ema"])
    assert callback.attach(trainer) is callback
    callback.attach(trainer)
    assert trainer.callback_handler.callbacks.count(callback) == 1
    trainer.train()
    assert set(entries(trainer, "eval_ema_loss")) == {1, 2}
    assert callback.averagers["ema"].updates == 2  # optimizer steps, not the 6 micro-batches
    with pytest.raises(TypeError, match="expected a transformers.Trainer, got Linear"):
        callback.attach(nn.Linear(2, 2))


def test_a_resumed_run_warns_that_averaging_restarts(tmp_path):
    data = token_set(16, 1)
    first = Trainer(model=tiny_gpt2(), args=trainer_args(tmp_path, max_steps=2, eval_strategy="no",
                                                         save_strategy="steps", save_steps=2), train_dataset=data)
    first.train()
    callback = AveragingCallback(["ema"])
    second = Trainer(model=tiny_gpt2(), args=trainer_args(tmp_path, max_steps=4, eval_strategy="no"),
                     train_dataset=data, callbacks=[callback])
    callback.attach(second)
    with pytest.warns(UserWarning, match="resumes at step 2; .*checkpoint-2 holds no state for ema, so those "
                                         "averages start from this step"):
        second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert callback.averagers["ema"].updates == 2 and callback.averagers["ema"].last_step == 4


def test_a_resumed_run_continues_every_average_bit_for_bit(tmp_path):
    """Averager state goes into each Trainer checkpoint; a run resumed from step 4 ends with the averages of the
    uninterrupted run, bit for bit (LAWA's window spans the break)."""
    import shutil

    data = token_set(32, 1)
    spec = {"ema": {"decay": 0.8}, "swa": {"start": 0}, "lawa": {"k": 2, "nu": 3}}

    def run(out: Path, resume: str | None = None) -> tuple[Trainer, AveragingCallback]:
        callback = AveragingCallback(spec)
        trainer = Trainer(model=tiny_gpt2(), args=trainer_args(out, max_steps=8, eval_strategy="no",
                                                               save_strategy="steps", save_steps=4),
                          train_dataset=data, callbacks=[callback])
        callback.attach(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, callback

    whole, uninterrupted = run(tmp_path / "whole")
    assert (tmp_path / "whole" / "checkpoint-4" / "averagers.json").is_file()
    shutil.copytree(tmp_path / "whole" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    resumed_trainer, resumed = run(tmp_path / "resumed", resume=str(tmp_path / "resumed" / "checkpoint-4"))
    assert_same(clone(resumed_trainer.model), clone(whole.model))  # the Trainer's own resume is exact here
    for name, averager in uninterrupted.averagers.items():
        assert resumed.averagers[name].updates == averager.updates, name
        assert_same(resumed.averagers[name].average(), averager.average())


def test_weights_holding_nan_are_refused_by_every_averager_once_checked(tmp_path):
    class Poison(TrainerCallback):  # placed before the AveragingCallback: the weights after step 2 hold a NaN
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    model.lm_head.weight[0, 0] = float("nan")

    callback = AveragingCallback({"ema": {}, "swa": {"start": 0}})
    trainer = Trainer(model=tiny_gpt2(), args=trainer_args(tmp_path, max_steps=2, eval_strategy="no"),
                      train_dataset=token_set(8, 1), callbacks=[Poison(), callback])
    callback.attach(trainer)
    with pytest.warns(UserWarning, match="the weights after step 2 hold NaN or Inf; no averager sees them"):
        trainer.train()
    for averager in callback.averagers.values():
        assert (averager.updates, averager.refused, averager.last_step) == (1, 1, 1)
        assert all(bool(torch.isfinite(t).all()) for t in averager.average().values() if t.is_floating_point())


class BatchNormNet(nn.Module):
    """A classifier with BatchNorm (no dropout: calibration draws no random numbers) in the Trainer's dict style."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"logits": logits} if labels is None else {"loss": nn.functional.cross_entropy(logits, labels),
                                                          "logits": logits}


def classes(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(4, generator=g) * 2 + 1, "labels": torch.randint(0, 3, (), generator=g)}
            for _ in range(count)]


def test_a_batchnorm_model_scores_its_averages_with_recalibrated_statistics(tmp_path):
    torch.manual_seed(0)
    model, train_set, eval_set = BatchNormNet(), classes(32, 1), classes(8, 2)
    calibration = [{k: torch.stack([d[k] for d in train_set[i:i + 8]]) for k in ("x", "labels")} for i in (0, 8)]
    callback = AveragingCallback({"swa": {"start": 0}}, calibration=calibration)
    args = trainer_args(tmp_path, max_steps=4, eval_steps=4, learning_rate=0.1)
    probe = Probe(model, decay=0.5)  # checks the raw weights and statistics are back after the scoring
    trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                      callbacks=[callback, probe])
    callback.attach(trainer)
    trainer.train()
    assert probe.evaluations == 1
    oracle = BatchNormNet()
    oracle.load_state_dict(callback.averagers["swa"].average())
    update_bn([batch["x"] for batch in calibration], oracle)
    expected = Trainer(model=oracle, args=args, eval_dataset=eval_set).evaluate()["eval_loss"]
    assert entries(trainer, "eval_swa_loss")[4] == pytest.approx(expected, rel=1e-6)
    uncalibrated = loss_separately_bn(callback.averagers["swa"].average(), eval_set, args)
    assert entries(trainer, "eval_swa_loss")[4] != pytest.approx(uncalibrated, rel=1e-4)

    quiet = AveragingCallback(["ema"]).attach(Trainer(model=BatchNormNet(), args=args, train_dataset=train_set,
                                                      eval_dataset=eval_set))
    with pytest.warns(UserWarning, match="has BatchNorm and no calibration batches were given"):
        quiet.trainer.train()


def loss_separately_bn(weights: dict[str, torch.Tensor], data: list[dict[str, torch.Tensor]], args) -> float:
    model = BatchNormNet()
    model.load_state_dict(weights)
    return Trainer(model=model, args=args, eval_dataset=data).evaluate()["eval_loss"]


def test_build_averagers_named_instances_instances_and_one_line_errors():
    built = build_averagers({"ema": {"decay": 0.5}, "swa_late": {"of": "swa", "start": 0.75}, "lawa": None})
    assert list(built) == ["ema", "swa_late", "lawa"]
    assert built["swa_late"].name == "swa_late" and type(built["swa_late"]).__name__ == "SWA"
    assert built["swa_late"].config.start == 0.75 and built["ema"].config.decay == 0.5
    mine = registry.averagers.create("ema", decay=0.9)
    assert build_averagers({"slow": mine})["slow"] is mine and mine.name == "slow"
    assert list(build_averagers(["ema", "swa"])) == ["ema", "swa"]
    cases = [({"ema": {"decay": 2.0}}, r"^ema\.decay: expected a number in \(0, 1\), got 2\.0$"),
             ({"ema": {"decy": 0.9}}, r"^ema\.decy: Key 'decy' not in"),
             ({"emma": {}}, r"unknown averager 'emma'; known: .*did you mean 'ema'"),
             ({"fast": {"of": "nope"}}, r"fast\.of: unknown averager 'nope'"),
             ({"ema": 0.9}, r"averager 'ema': expected a dict of settings or an averager instance, got float"),
             ({}, r"no averagers given; known: .*ema"),
             ("ema", r"must be a dict of name -> settings or a list of names"),
             (["ema", "ema"], r"distinct non-empty strings")]
    for spec, message in cases:
        with pytest.raises((ConfigError, RegistryError), match=message) as info:
            AveragingCallback(spec)
        assert "\n" not in str(info.value)


def test_importing_the_package_loads_neither_torch_nor_transformers():
    code = ("import sys, lawa_suite, lawa_suite.integrations; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# -- averaged_weights ------------------------------------------------------------------------------------------
def bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3))


def train_bn(model: nn.Module, averager: Any, steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(16, 4, generator=g) * 3 + 1, torch.randint(0, 3, (16,), generator=g))
               for _ in range(steps)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for step, (x, y) in enumerate(batches, start=1):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        averager.observe(step, model)
    return batches


def test_averaged_weights_swaps_in_the_average_and_back_bit_for_bit():
    model, ema = bn_model(), registry.averagers.create("ema", decay=0.7)
    train_bn(model, ema, steps=6)
    raw = clone(model)
    with averaged_weights(model, ema) as inside:
        assert inside is model and model.training
        assert_same(clone(model), ema.average())  # running statistics too: averaged, not recalibrated
    assert_same(clone(model), raw)
    assert model.training
    with pytest.raises(RuntimeError, match="boom"), averaged_weights(model, ema):
        raise RuntimeError("boom")
    assert_same(clone(model), raw)


def test_batchnorm_is_recalibrated_inside_only_as_update_bn_does():
    model, swa = bn_model(), registry.averagers.create("swa", start=0)
    batches = train_bn(model, swa, steps=8)
    model.eval()
    raw = clone(model)
    oracle = bn_model(seed=5)
    oracle.load_state_dict(swa.average())
    update_bn([x for x, _ in batches[:4]], oracle)
    rng = torch.get_rng_state()
    with averaged_weights(model, swa, batches[:4]):
        assert not model.training  # the mode it had on entry, after recalibration in train mode
        inside = clone(model)
    assert torch.equal(torch.get_rng_state(), rng)  # calibration's dropout drew from a forked generator
    average = swa.average()
    for name in inside:
        if "running_" in name:
            torch.testing.assert_close(inside[name], oracle.state_dict()[name], rtol=0, atol=1e-6)
            assert not torch.equal(inside[name], average[name]) and not torch.equal(inside[name], raw[name])
        elif name.endswith("num_batches_tracked"):
            continue
        else:
            assert torch.equal(inside[name], average[name]), name
    assert_same(clone(model), raw)
    assert not model.training


def test_calibration_batches_as_dicts_or_with_a_forward_function():
    model, ema = bn_model(), registry.averagers.create("ema", decay=0.7)
    batches = train_bn(model, ema, steps=3)

    class Keyword(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    wrapped = Keyword(model)
    ema_wrapped = registry.averagers.create("ema", decay=0.7)
    ema_wrapped.observe(1, wrapped)
    with averaged_weights(wrapped, ema_wrapped, [{"x": x} for x, _ in batches]):
        by_dict = clone(wrapped)
    seen = []
    with averaged_weights(wrapped, ema_wrapped, batches, forward=lambda m, b: seen.append(1) or m(b[0])):
        by_forward = clone(wrapped)
    assert len(seen) == 3
    assert_same(by_dict, by_forward)


def test_averaged_weights_refuses_what_it_cannot_put_in_with_one_line():
    model = bn_model()
    fresh = registry.averagers.create("ema", decay=0.9)
    with pytest.raises(AnalysisError, match=r"^averaged_weights: averager 'ema' has no average yet \(0 observations"):
        with averaged_weights(model, fresh):
            pass
    lawa = registry.averagers.create("lawa", k=3, nu=1)
    train_bn(model, lawa, steps=2)
    with pytest.raises(AnalysisError, match=r"averager 'lawa' has no average yet \(2 observations accepted, LAWA\("):
        with averaged_weights(model, lawa):
            pass
    ema = registry.averagers.create("ema", decay=0.9)
    train_bn(model, ema, steps=1)
    other = nn.Sequential(nn.Linear(4, 9), nn.BatchNorm1d(9), nn.ReLU(), nn.Dropout(0.2), nn.Linear(9, 3))
    with pytest.raises(AnalysisError, match=r"averager 'ema' averaged another model: the model's '0.weight' is"):
        with averaged_weights(other, ema):
            pass
    with pytest.raises(AnalysisError, match="calibration holds no batches"):
        with averaged_weights(model, ema, []):
            pass
    with pytest.raises(TypeError, match="expected an averager .* got dict"):
        with averaged_weights(model, ema.average()):
            pass


# -- docs/integrations.md's examples, run as written ----------------------------------------------------------
def documented_example(contains: str, scale: dict[str, str]) -> str:
    """The python block of docs/integrations.md ("Averaging inside your own training loop", moved there from the
    README) holding ``contains``, with each ``scale`` replacement applied exactly once (step counts only: the code is
    the page's)."""
    section = INTEGRATIONS_DOC.read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", section, flags=re.S) if contains in b]
    assert len(blocks) == 1, f"{INTEGRATIONS_DOC.name} has {len(blocks)} python blocks with {contains!r}"
    code = blocks[0]
    for old, new in scale.items():
        assert code.count(old) == 1, f"docs/integrations.md example: expected {old!r} once"
        code = code.replace(old, new)
    return code


def test_the_readme_trainer_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = documented_example("AveragingCallback(", {"max_steps=2000": "max_steps=12", "eval_steps=200": "eval_steps=6",
                                                 '"nu": 100': '"nu": 2'})
    namespace = {"model": tiny_gpt2(), "train_set": token_set(48, 1), "eval_set": token_set(8, 2)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(code, "docs/integrations.md", "exec"), namespace)
    assert not [w for w in caught if "AveragingCallback" in str(w.message)]
    trainer, averaging = namespace["trainer"], namespace["averaging"]
    logged = {k for e in trainer.state.log_history for k in e}
    assert {"eval_loss", "eval_ema_loss", "eval_lawa_loss", "eval_swa_late_loss"} <= logged
    saved = GPT2LMHeadModel.from_pretrained(tmp_path / "out" / "ema")
    ema = averaging.averagers["ema"].average()
    for name, tensor in saved.state_dict().items():
        assert torch.equal(tensor, ema[name]), name
    assert not torch.equal(trainer.model.state_dict()["lm_head.weight"], ema["lm_head.weight"])  # raw back


def test_the_readme_plain_loop_example_runs(capsys):
    code = documented_example("train_loader", {"step % 500": "step % 4"})
    model = bn_model()
    scored: list[dict[str, torch.Tensor]] = []
    g = torch.Generator().manual_seed(3)
    loader = [(torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(8)]
    namespace = {"model": model, "train_loader": loader, "calibration_batches": loader[:2],
                 "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
                 "evaluate": lambda m: scored.append(clone(m)) or len(scored)}
    exec(compile(code, "docs/integrations.md", "exec"), namespace)
    assert len(scored) == 2 and capsys.readouterr().out.split() == ["4", "1", "8", "2"]
    average = namespace["ema"].average()
    assert torch.equal(scored[1]["0.weight"], average["0.weight"])
    assert not torch.equal(model.state_dict()["0.weight"], average["0.weight"])
    assert not torch.equal(scored[1]["1.running_mean"], average["1.running_mean"])  # recalibrated
