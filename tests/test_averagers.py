"""EMA, SWA and LAWA against references: torch's AveragedModel, brute-force recomputations, round trips."""

from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from lawa_suite import registry
from lawa_suite.averagers import Averager, NonFiniteWarning
from lawa_suite.averagers.ema import EMA
from lawa_suite.averagers._window import DiskSnapshots
from lawa_suite.averagers.lawa import LAWA
from lawa_suite.averagers.swa import SWA
from lawa_suite.averagers.bema import BEMA
from lawa_suite.averagers.phema import PowerEMA
from lawa_suite.averagers.wma import WMA
from lawa_suite.config import ConfigError, resolve

from helpers import assert_same


# -- helpers --------------------------------------------------------------------------------------------
def bn_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A small model with BatchNorm: float running stats and an int64 num_batches_tracked."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


def train_step(model: nn.Module, gen: torch.Generator, scale: float = 0.1) -> None:
    """A stand-in optimizer step: perturb parameters in place, update BN statistics with a forward pass."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype), alpha=scale)
        model.train()
        model(torch.randn(16, 4, generator=gen).to(next(model.parameters()).dtype))


def trajectory(model: nn.Module, steps: int, seed: int = 1) -> Iterator[int]:
    """Steps 1..steps, the model updated in place before each is yielded."""
    gen = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        train_step(model, gen)
        yield step


def recorded(steps: int, seed: int = 0) -> list[dict[str, Tensor]]:
    """The state dicts (copies) of a BN model after steps 1..steps: one fixed trajectory for several runs."""
    model = bn_model(seed)
    return [{n: t.clone() for n, t in model.state_dict().items()} for _ in trajectory(model, steps)]


def float_items(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    return {n: t for n, t in weights.items() if t.is_floating_point()}


def observe_all(averagers: list[Averager], model: nn.Module, steps: Iterator[int], n: int) -> None:
    """The next ``n`` steps of ``steps`` into every averager."""
    for _ in range(n):
        step = next(steps)
        for avg in averagers:
            avg.observe(step, model)


def tensors_in(state: Any) -> list[Tensor]:
    """Every tensor in nested dicts and lists."""
    if isinstance(state, Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for value in state.values() for t in tensors_in(value)]
    if isinstance(state, (list, tuple)):
        return [t for value in state for t in tensors_in(value)]
    return []


def through_safetensors(state: Any) -> Any:
    """``state`` after a trip through safetensors (tensors) and JSON (everything else), as a checkpoint does."""
    tensors: dict[str, Tensor] = {}

    def strip(obj: Any) -> Any:
        if isinstance(obj, Tensor):
            key = str(len(tensors))
            tensors[key] = obj
            return {"__tensor__": key}
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [strip(v) for v in obj]
        return obj

    skeleton = json.dumps(strip(state))
    loaded = safetensors_load(safetensors_save(tensors))

    def fill(obj: Any) -> Any:
        if isinstance(obj, dict):
            return loaded[obj["__tensor__"]] if set(obj) == {"__tensor__"} else {k: fill(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [fill(v) for v in obj]
        return obj

    return fill(json.loads(skeleton))


MAKERS: dict[str, Callable[..., Averager]] = {
    "ema": lambda **kw: EMA(decay=0.9, **kw),
    "swa": lambda **kw: SWA(start=0, **kw),
    "lawa": lambda **kw: LAWA(k=3, nu=2, **kw),
    "lawa-disk": lambda **kw: LAWA(k=3, nu=2, store="disk", **kw),
    "phema": lambda **kw: PowerEMA(sigma_rel=[0.1, 0.05], **kw),
    "wma": lambda **kw: WMA(k=3, nu=2, **kw),
    "wma-disk": lambda **kw: WMA(k=3, nu=2, shape="cosine", store="disk", **kw),
    "bema": lambda **kw: BEMA(**kw),
    "ema-warmup": lambda **kw: EMA(decay=0.9, warmup=True, **kw),
}


# -- EMA --------------------------------------------------------------------------------------------------
def test_ema_equals_torch_averaged_model() -> None:
    decay = 0.9
    model = bn_model()
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema = EMA(decay=decay)
    for step in trajectory(model, 50):
        reference.update_parameters(model)
        assert ema.observe(step, model)
        ours = ema.average()
        assert ours is not None
        for name, expected in reference.module.state_dict().items():
            if expected.is_floating_point():
                torch.testing.assert_close(ours[name], expected, rtol=0, atol=1e-6)
    # Integer buffers are the newest observation's, never averaged.
    assert torch.equal(ours["1.num_batches_tracked"], model.state_dict()["1.num_batches_tracked"])
    assert int(ours["1.num_batches_tracked"]) == 50


def test_ema_every_and_start_against_scalar_recomputation() -> None:
    decay, every, start = 0.8, 3, 5
    ema = EMA(decay=decay, every=every, start=start)
    gen = torch.Generator().manual_seed(3)
    expected: list[float] | None = None
    for step in range(1, 41):
        w = torch.randn(4, generator=gen, dtype=torch.float64)
        used = ema.observe(step, {"w": w})
        assert used == (step >= start and (step - start) % every == 0)
        if used:
            values = w.tolist()
            expected = values if expected is None else [a + (1 - decay ** every) * (x - a)
                                                         for a, x in zip(expected, values)]
        average = ema.average()
        assert (average is None) == (expected is None)
        if average is not None:
            assert average["w"].dtype == torch.float64
            assert average["w"].tolist() == pytest.approx(expected, abs=1e-12)
    assert ema.updates == len([s for s in range(1, 41) if s >= start and (s - start) % every == 0]) == 12


def test_ema_of_bf16_model_accumulates_in_fp32() -> None:
    model = bn_model(dtype=torch.bfloat16)
    ema = EMA(decay=0.999)
    for step in trajectory(model, 5):
        ema.observe(step, model)
    accumulators = ema.state_dict()["state"]["average"]
    assert all(t.dtype == torch.float32 for t in accumulators)
    average = ema.average()
    assert average is not None and average["0.weight"].dtype == torch.bfloat16
    # A bf16 accumulator would round (1 - 0.999) * (w - avg) away; fp32 keeps it.
    assert not torch.equal(accumulators[0], accumulators[0].bfloat16().float())


# -- SWA --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("start", "every", "total", "first"), [
    (10, 1, 40, 10),
    (0.5, 1, 40, 20),
    (7, 3, 40, 7),
    (0.3, 4, 40, 12),
    (0, 2, 20, 0),
])
def test_swa_equals_torch_averaged_model(start: float, every: int, total: int, first: int) -> None:
    model = bn_model()
    reference = AveragedModel(model, use_buffers=True)
    swa = SWA(start=start, every=every)
    swa.start_run(total)
    assert swa.start_step == first
    averaged = 0
    for step in trajectory(model, total):
        selected = step >= first and (step - first) % every == 0
        assert swa.observe(step, model) == selected
        if selected:
            reference.update_parameters(model)
            averaged += 1
        ours = swa.average()
        assert (ours is None) == (averaged == 0)
    assert ours is not None and averaged == swa.updates > 1
    for name, expected in reference.module.state_dict().items():
        if expected.is_floating_point():
            torch.testing.assert_close(ours[name], expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(ours["1.num_batches_tracked"], model.state_dict()["1.num_batches_tracked"])


def test_swa_fraction_needs_start_run() -> None:
    swa = SWA(start=0.75)
    with pytest.raises(ValueError, match="start_run"):
        swa.observe(1, {"w": torch.zeros(2)})
    swa.start_run(100)
    assert swa.start_step == 75
    assert SWA(start=100).start_step == 100 and SWA(start=100.0).wants(100) and not SWA(start=100).wants(99)
    fraction = SWA(start=0.07)
    fraction.start_run(100)
    assert fraction.start_step == 7  # not 8: 0.07 * 100 is 7.000000000000001 in floating point


def test_swa_start_parses_as_steps_and_fraction_through_omegaconf() -> None:
    for value, expected in ((100, 100.0), (0.75, 0.75), (0, 0.0)):
        merged = OmegaConf.merge(OmegaConf.structured(SWA.Config), {"start": value})
        config = OmegaConf.to_object(merged)
        assert config.start == expected
        SWA(**vars(config))


# -- LAWA -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("store", ["cpu", "disk"])
def test_lawa_equals_brute_force_window_mean(store: str, tmp_path: Any) -> None:
    k, nu = 4, 3
    model = bn_model()
    lawa = LAWA(k=k, nu=nu, store=store, dir=str(tmp_path / "snaps") if store == "disk" else "")
    snapshots: list[dict[str, Tensor]] = []
    for step in trajectory(model, 200):
        assert lawa.observe(step, model) == (step % nu == 0)
        if step % nu == 0:
            snapshots.append({n: t.clone() for n, t in model.state_dict().items()})
        average = lawa.average()
        if len(snapshots) < k:
            assert average is None
            continue
        assert average is not None
        window = snapshots[-k:]
        for name, value in average.items():
            if value.is_floating_point():
                expected = torch.stack([s[name] for s in window]).sum(0) / k
                torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6)
            else:
                assert torch.equal(value, window[-1][name])
    assert lawa.snapshot_steps == [s for s in range(1, 201) if s % nu == 0][-k:]
    if store == "disk":
        lawa.close()  # the newest file is written in the background: all of them are on disk once closed
        assert sorted(os.listdir(tmp_path / "snaps")) == [f"snapshot-{s:010d}.safetensors" for s in lawa.snapshot_steps]


@pytest.mark.parametrize("store", ["cpu", "disk"])
def test_lawa_bf16_is_accumulated_in_fp32_and_stored_in_bf16(store: str) -> None:
    # Values in [1, 2) have 8 significant bits in bf16: a window sum of 4 needs 10, exact in fp32 (but not bf16).
    k, nu = 4, 3
    model = nn.Linear(16, 8).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    lawa = LAWA(k=k, nu=nu, store=store)
    snapshots: list[dict[str, Tensor]] = []
    for step in range(1, 201):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.rand(p.shape, generator=gen) + 1)
        lawa.observe(step, model)
        if step % nu == 0:
            snapshots.append({n: t.clone() for n, t in model.state_dict().items()})
        average = lawa.average()
        assert (average is None) == (len(snapshots) < k)
        if average is not None:
            for name, value in average.items():
                expected = (torch.stack([s[name].float() for s in snapshots[-k:]]).sum(0) / k).to(torch.bfloat16)
                assert value.dtype == torch.bfloat16
                assert torch.equal(value, expected), name
    state = lawa.state_dict()["state"]
    assert all(t.dtype == torch.float32 for t in state["sum"])
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for snap in state["snapshots"] for t in snap)


@pytest.mark.parametrize("store", ["cpu", "disk"])
def test_lawa_sum_does_not_drift_after_large_snapshots_leave(store: str) -> None:
    # Subtracting a 1e4-sized snapshot from an fp32 sum leaves ~1e-3 of rounding error behind, as large as
    # the small weights that follow; the periodic exact recompute must remove it.
    k = 4
    gen = torch.Generator().manual_seed(0)
    lawa = LAWA(k=k, nu=1, store=store)
    values = [torch.randn(64, generator=gen) * (1e4 if step <= k else 1e-3) for step in range(1, 3 * k + 2)]
    for step, value in enumerate(values, start=1):
        lawa.observe(step, {"w": value})
    average = lawa.average()
    assert average is not None
    expected = torch.stack(values[-k:]).double().mean(0).float()
    torch.testing.assert_close(average["w"], expected, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("store", ["cpu", "disk"])
def test_lawa_not_ready_before_k_snapshots(store: str) -> None:
    lawa = LAWA(k=3, nu=5, store=store)
    assert lawa.average() is None
    for step in range(1, 15):
        lawa.observe(step, {"w": torch.full((2,), float(step))})
        assert lawa.average() is None  # snapshots at 5 and 10 only
    lawa.observe(15, {"w": torch.full((2,), 15.0)})
    average = lawa.average()
    assert average is not None and average["w"].tolist() == [10.0, 10.0]


def test_lawa_snapshot_steps_must_increase() -> None:
    lawa = LAWA(k=2, nu=2, store="disk")
    lawa.observe(4, {"w": torch.ones(2)})
    with pytest.raises(ValueError, match="must increase"):
        lawa.observe(4, {"w": torch.ones(2)})
    assert lawa.snapshot_steps == [4] and lawa.updates == 1


def test_lawa_disk_store_temporary_folder_is_removed_with_the_averager() -> None:
    lawa = LAWA(k=2, nu=1, store="disk")
    lawa.observe(1, {"w": torch.ones(2)})
    store = lawa._store
    assert isinstance(store, DiskSnapshots)
    folder = store.folder
    lawa.wait()  # (written in the background)
    assert os.listdir(folder) == ["snapshot-0000000001.safetensors"]
    del lawa, store
    gc.collect()
    assert not os.path.exists(folder)


# -- shared behaviour -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(MAKERS))
def test_snapshots_and_averages_are_not_aliases(kind: str) -> None:
    model = bn_model()
    averager = MAKERS[kind]()
    steps = trajectory(model, 8)
    for step in steps:
        averager.observe(step, model)
    average = averager.average()
    assert average is not None
    before = {n: t.clone() for n, t in average.items()}
    with torch.no_grad():  # an optimizer step edits the live weights in place
        for tensor in model.state_dict().values():
            tensor.add_(1)
    assert_same(averager.average(), before)
    # Editing the returned average must not edit the averager either.
    returned = averager.average()
    assert returned is not None
    for tensor in returned.values():
        tensor.add_(1)
    assert_same(averager.average(), before)


@pytest.mark.parametrize("kind", list(MAKERS))
def test_state_dict_round_trip_continues_identically(kind: str) -> None:
    weights = recorded(60)
    run_a = MAKERS[kind]()
    for step, w in enumerate(weights, start=1):
        run_a.observe(step, w)
    run_b = MAKERS[kind]()
    for step, w in enumerate(weights[:30], start=1):
        run_b.observe(step, w)
    state = through_safetensors(run_b.state_dict())
    del run_b
    resumed = MAKERS[kind]()
    resumed.load_state_dict(state)
    for step, w in enumerate(weights[30:], start=31):
        resumed.observe(step, w)
    assert_same(resumed.average(), run_a.average())
    assert (resumed.updates, resumed.last_step) == (run_a.updates, run_a.last_step)
    assert_same(resumed.state_dict(), run_a.state_dict())


def test_lawa_round_trip_mid_recompute_cycle_and_disk_state_is_self_contained(tmp_path: Any) -> None:
    weights = recorded(60)
    run_a = LAWA(k=4, nu=2, store="disk", dir=str(tmp_path / "a"))
    for step, w in enumerate(weights, start=1):
        run_a.observe(step, w)
    run_b = LAWA(k=4, nu=2, store="disk", dir=str(tmp_path / "b"))
    for step, w in enumerate(weights[:34], start=1):
        run_b.observe(step, w)
    state = through_safetensors(run_b.state_dict())
    assert state["state"]["evictions"] % 4 != 0 and len(state["state"]["snapshots"]) == 4
    del run_b  # (a resume is a new process: the folder is free again)
    resumed = LAWA(k=4, nu=2, store="disk", dir=str(tmp_path / "b"))
    for name in os.listdir(tmp_path / "b"):  # the checkpoint alone must suffice
        os.remove(tmp_path / "b" / name)
    resumed.load_state_dict(state)
    resumed.wait()  # (written in the background)
    assert len(os.listdir(tmp_path / "b")) == 4
    for step, w in enumerate(weights[34:], start=35):
        resumed.observe(step, w)
    assert_same(resumed.average(), run_a.average())


@pytest.mark.parametrize("kind", list(MAKERS))
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_observation_is_refused(kind: str, bad: float) -> None:
    weights = recorded(12)
    averager = MAKERS[kind]()
    for step, w in enumerate(weights[:10], start=1):
        averager.observe(step, w)
    average = averager.average()
    assert average is not None
    before = {n: t.clone() for n, t in average.items()}
    updates = averager.updates
    poisoned = {n: t.clone() for n, t in weights[10].items()}
    poisoned["3.weight"][0, 0] = bad
    with pytest.warns(NonFiniteWarning, match="step 12"):
        assert averager.observe(12, poisoned) is False
    assert averager.refused == 1 and averager.last_step == 10
    assert_same(averager.average(), before)
    assert averager.updates == updates
    if isinstance(averager, LAWA):
        assert averager.snapshot_steps == [6, 8, 10]
    assert averager.observe(14, weights[11])  # and it carries on


@pytest.mark.parametrize("kind", list(MAKERS))
def test_layout_mismatch_is_an_error(kind: str) -> None:
    averager = MAKERS[kind]()
    averager.observe(2, {"a": torch.zeros(3), "b": torch.zeros(2)})
    with pytest.raises(ValueError, match="extra"):
        averager.observe(4, {"a": torch.zeros(3), "b": torch.zeros(2), "c": torch.zeros(1)})
    with pytest.raises(ValueError, match="'a'"):
        averager.observe(4, {"a": torch.zeros(4), "b": torch.zeros(2)})


@pytest.mark.parametrize(("name", "kwargs", "field"), [
    ("ema", {"decay": 1.0}, "decay"),
    ("ema", {"decay": 0.0}, "decay"),
    ("ema", {"every": 0}, "every"),
    ("ema", {"start": -1}, "start"),
    ("swa", {"every": 0}, "every"),
    ("swa", {"start": 2.5}, "start"),
    ("swa", {"start": -1}, "start"),
    ("lawa", {"k": 0}, "k"),
    ("lawa", {"nu": 0}, "nu"),
    ("lawa", {"k": 2.5}, "k"),
    ("lawa", {"store": "gpu"}, "store"),
])
def test_bad_config_names_the_field(name: str, kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}: expected"):
        registry.averagers.create(name, **kwargs)


@pytest.mark.parametrize("kind", list(MAKERS))
def test_module_and_mapping_give_the_same_average(kind: str) -> None:
    model = bn_model()
    from_module, from_mapping = MAKERS[kind](), MAKERS[kind]()
    for step in trajectory(model, 14):
        from_module.observe(step, model)
        # Parameters that require grad, as a mapping: no autograd graph may build up in the averager.
        from_mapping.observe(step, model.state_dict(keep_vars=True))
        average = from_mapping.average()
        assert average is None or not any(t.requires_grad for t in average.values())
        assert not any(t.requires_grad for t in tensors_in(from_mapping.state_dict()))
    assert_same(from_module.average(), from_mapping.average())


def test_registry_creates_every_averager() -> None:
    assert {"ema", "lawa", "swa"} <= set(registry.averagers.names())
    lawa = registry.averagers.create("lawa", k=3, nu=2)
    assert isinstance(lawa, LAWA) and (lawa.config.k, lawa.config.nu) == (3, 2)
    assert isinstance(registry.averagers.create("ema", decay=0.99), EMA)
    assert isinstance(registry.averagers.create("swa", start=10), SWA)


# -- tied weights, reused buffers, persistent staging (issue 9) -------------------------------------------
class TiedModel(nn.Module):
    """GPT-2's tying in miniature: the output layer's weight is the embedding's (two state_dict names)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 4)
        self.hidden = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.hidden(x))


@pytest.mark.parametrize("kind", ["ema", "swa", "lawa", "phema", "wma", "bema"])
def test_tied_weights_are_averaged_once_and_returned_under_both_names(kind: str) -> None:
    model = TiedModel()
    avg = MAKERS[kind]()
    oracle = MAKERS[kind]()
    for step in trajectory(model, 8):
        avg.observe(step, model)
        oracle.observe(step, {n: t.clone() for n, t in model.state_dict().items()})  # no aliasing: both averaged
    assert avg.layout.aliases == (("head.weight", "embed.weight"),)
    assert len(avg.layout.float_names) == 3          # embed.weight, hidden.weight, hidden.bias
    assert_same(avg.average(), oracle.average())
    restored = MAKERS[kind]()
    restored.load_state_dict(through_safetensors(avg.state_dict()))
    assert restored.layout.aliases == avg.layout.aliases
    assert_same(restored.average(), avg.average())
    model.load_state_dict(avg.average())               # loads into the tied model as it is
    assert model.head.weight is model.embed.weight


def test_untied_later_observation_of_an_aliased_name_is_an_error() -> None:
    model = TiedModel()
    ema = EMA(decay=0.9)
    ema.observe(1, model)
    weights = {n: t.clone() for n, t in model.state_dict().items()}
    weights["head.weight"] = weights["head.weight"] + 1.0
    with pytest.raises(ValueError, match="'head.weight' was the same tensor as 'embed.weight'"):
        ema.observe(2, weights)


def test_lawa_memory_store_cycles_k_plus_one_buffers() -> None:
    """After the window first slides, every snapshot is copied into the buffers of one that left (no fresh
    memory); k + 1 buffers take turns because the leaving one is still being subtracted in the background."""
    model = bn_model()
    lawa = LAWA(k=2, nu=1)
    steps = trajectory(model, 12)
    seen = []
    for _ in range(12):
        lawa.observe(next(steps), model)
        seen.append(list(lawa._store)[-1][0].data_ptr())
    assert len(set(seen)) == 3 and set(seen[3:]) == set(seen[:3])
    assert lawa.snapshot_steps == [11, 12]
    first, second = list(lawa._store)
    brute = {n: (a + b) / 2 for n, a, b in zip(lawa.layout.float_names, first, second)}
    assert all(torch.equal(lawa.average()[n], brute[n]) for n in lawa.layout.float_names)


def test_lawa_window_arithmetic_runs_off_the_calling_thread_and_is_waited_for(monkeypatch) -> None:
    import threading

    import lawa_suite.averagers.lawa as lawa_module

    threads = []
    real_push = lawa_module.window_push_

    def slow_push(total, new, *rest):
        threads.append(threading.current_thread().name)
        time.sleep(0.2)  # the caller must wait for this before it reads the sum
        real_push(total, new, *rest)
    monkeypatch.setattr(lawa_module, "window_push_", slow_push)
    model = bn_model()
    online, inline = LAWA(k=3, nu=1), LAWA(k=3, nu=1, store="disk")
    observe_all([online, inline], model, trajectory(model, 7), 7)
    assert any(name.startswith("lawa-window") for name in threads)
    assert_same(online.average(), inline.average())        # bit for bit what the inline arithmetic gives
    restored = LAWA(k=3, nu=1)
    restored.load_state_dict(online.state_dict())
    assert_same(restored.average(), online.average())


def test_lawa_background_error_surfaces_at_the_next_call(monkeypatch) -> None:
    import lawa_suite.averagers.lawa as lawa_module

    model = bn_model()
    lawa = LAWA(k=2, nu=1)
    steps = trajectory(model, 3)
    lawa.observe(next(steps), model)

    def broken(total, new, *rest):
        raise RuntimeError("window arithmetic failed")
    monkeypatch.setattr(lawa_module, "window_push_", broken)
    lawa.observe(next(steps), model)
    with pytest.raises(RuntimeError, match="window arithmetic failed"):
        lawa.average()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork exists only on POSIX")
def test_lawa_keeps_working_in_a_forked_child(monkeypatch) -> None:
    """A process that forks (DataLoader workers, a crash harness) after LAWA started its background thread:
    the fork waits for the queued job, and the child, which has no copy of the thread, starts its own."""
    import lawa_suite.averagers.lawa as lawa_module

    real_push = lawa_module.window_push_

    def slow_push(total, new, *rest):
        time.sleep(0.3)  # still running when fork is called
        real_push(total, new, *rest)
    monkeypatch.setattr(lawa_module, "window_push_", slow_push)
    model = bn_model()
    online, inline = LAWA(k=3, nu=1), LAWA(k=3, nu=1, store="disk")
    steps = trajectory(model, 6)
    observe_all([online, inline], model, steps, 2)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: finish the trajectory in both, report whether they agree bit for bit
        ok = False
        try:
            observe_all([online, inline], model, steps, 4)
            a, b = online.average(), inline.average()
            ok = a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
        finally:
            os.write(write, b"same" if ok else b"different")
            os._exit(0)
    os.close(write)
    deadline = time.monotonic() + 60
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            pytest.fail("the forked child hung on LAWA's background thread")
        time.sleep(0.05)
    assert os.read(read, 16) == b"same"
    assert online.snapshot_steps == [1, 2]  # the parent's own averager is unaffected


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device: LAWA's queued-copy path exists only there")


def on_cpu(state: Any) -> Any:
    """``state`` with every tensor moved to the CPU (nested dicts and lists)."""
    if isinstance(state, Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {k: on_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [on_cpu(v) for v in state]
    return state


def set_weights(live: dict[str, Tensor], state: dict[str, Tensor]) -> None:
    """Overwrite a model's tensors in place, as an optimizer step does (LAWA's copy must come first)."""
    for name, t in live.items():
        t.copy_(state[name])


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lawa_on_cuda_equals_lawa_on_cpu_bit_for_bit(dtype) -> None:
    """CUDA weights: snapshots go to pinned host memory unwaited, the sum is updated on the device. Through the
    window filling, sliding, recomputing and a state round trip mid-run, the numbers are the CPU's exactly."""
    states = [{n: t.to(dtype) if t.is_floating_point() else t for n, t in s.items()} for s in recorded(11)]
    model = bn_model(dtype=dtype).cuda()
    live = model.state_dict()
    on_device, reference = LAWA(k=3, nu=1), LAWA(k=3, nu=1)
    for step, state in enumerate(states, start=1):
        set_weights(live, state)
        on_device.observe(step, model, checked=True)  # as in the loop, whose one NaN/Inf check is its host sync
        reference.observe(step, state)
        if step == 6:
            restored = LAWA(k=3, nu=1)
            restored.load_state_dict(on_device.state_dict())
            on_device = restored
    assert_same(on_cpu(on_device.state_dict()), reference.state_dict())  # snapshots and sum, bitwise
    assert all(t.is_pinned() for snapshot in on_device._store for t in snapshot)
    average = on_device.average()
    assert average is not None and all(t.is_cuda for t in average.values())
    # sum / k: a device may round the division differently by an ulp; a misordered copy is far larger
    torch.testing.assert_close(on_cpu(average), reference.average())


@needs_cuda
def test_lawa_on_cuda_takes_a_snapshot_without_waiting_for_the_device() -> None:
    """With a second of device work queued, a snapshot step returns at once; ``average()`` then waits, and the
    result is right (the copy happened before the weights changed)."""
    states = recorded(8)
    model = bn_model().cuda()
    live = model.state_dict()
    lawa = LAWA(k=2, nu=1)
    for step in range(1, 7):  # past the first fill, slide and recompute: pinned spares exist
        set_weights(live, states[step - 1])
        lawa.observe(step, model, checked=True)
    set_weights(live, states[6])
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))  # about a second of device time ahead of the snapshot
    start = time.perf_counter()
    lawa.observe(7, model, checked=True)  # a slide: copy the new weights off the device, upload and subtract the
    # leaving ones
    queued_for = time.perf_counter() - start
    set_weights(live, states[7])  # the next optimizer step: stream order keeps it behind the copy
    average = lawa.average()
    waited_for = time.perf_counter() - start
    assert queued_for < 0.25 * waited_for, f"the snapshot step waited {queued_for:.3f} s of {waited_for:.3f} s"
    reference = LAWA(k=2, nu=1)
    for step, state in enumerate(states[:7], start=1):
        reference.observe(step, state)
    assert_same(on_cpu(lawa.state_dict()["state"]), reference.state_dict()["state"])
    torch.testing.assert_close(on_cpu(average), reference.average())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["ema", "swa", "lawa", "phema", "wma", "bema"])
def test_load_average_into_equals_average_and_leaves_the_averager_alone(name, dtype) -> None:
    """What evaluation uses: the average copied into the model's own tensors, bit for bit average(); editing
    the model afterwards (training goes on) must not reach the accumulators it was copied from."""
    model = bn_model(dtype=dtype)
    avg = registry.averagers.create(name, **({"k": 2, "nu": 1} if name in ("lawa", "wma") else {}))
    avg.start_run(6)
    target = bn_model(seed=5, dtype=dtype)
    assert avg.load_average_into(target.state_dict()) is False  # not ready: nothing copied
    assert not torch.equal(target.state_dict()["0.weight"], model.state_dict()["0.weight"])
    steps = trajectory(model, 6)
    for _ in range(6):
        avg.observe(next(steps), model)
    expected = avg.average()
    assert avg.load_average_into(target.state_dict()) is True
    assert_same(dict(target.state_dict()), expected)
    with torch.no_grad():
        for t in target.state_dict().values():
            t.add_(1) if t.is_floating_point() else t.add_(7)
    assert_same(avg.average(), expected)
    with pytest.raises(KeyError, match="no target tensor for"):
        avg.load_average_into({"0.weight": target.state_dict()["0.weight"]})


def test_bf16_updates_stage_into_persistent_fp32_buffers() -> None:
    model = bn_model(dtype=torch.bfloat16)
    ema = EMA(decay=0.9)
    steps = trajectory(model, 3)
    ema.observe(next(steps), model)
    ema.observe(next(steps), model)
    buffers = [b.data_ptr() for b in ema._staging if b is not None]
    ema.observe(next(steps), model)
    assert buffers and [b.data_ptr() for b in ema._staging if b is not None] == buffers
    assert all(b.dtype == torch.float32 for b in ema._staging if b is not None)


def test_two_windows_in_one_folder_are_refused(tmp_path: Any) -> None:
    """Two LAWA windows in one folder (two runs with the same lawa.dir, or two instances of one run) deleted each
    other's snapshots; the second is refused in one line while the first lives, and may go on once it is gone."""
    weights = recorded(4)
    first = LAWA(k=2, nu=1, store="disk", dir=str(tmp_path / "snaps"))
    first.observe(1, weights[0])
    first.wait()  # (written in the background)
    second = LAWA(k=2, nu=1, store="disk", dir=str(tmp_path / "snaps"))
    with pytest.raises(ConfigError, match=r"^dir: .*snaps holds the snapshots of another window in use") as info:
        second.observe(1, weights[0])
    assert "\n" not in str(info.value) and os.listdir(tmp_path / "snaps") == ["snapshot-0000000001.safetensors"]
    child = subprocess.run([sys.executable, "-c", "import sys; from lawa_suite.averagers.lawa "
                            "import LAWA; import torch; l = LAWA(k=2, nu=1, store='disk', dir=sys.argv[1]); "
                            "l.observe(1, {'w': torch.ones(2)})", str(tmp_path / "snaps")],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode != 0 and "holds the snapshots of another window" in child.stderr  # another process too
    del first
    gc.collect()
    third = LAWA(k=2, nu=1, store="disk", dir=str(tmp_path / "snaps"))
    third.observe(2, weights[1])
    third.close()
    assert (tmp_path / ".snaps.lock").exists()
    del third
    gc.collect()
    assert sorted(os.listdir(tmp_path)) == ["snaps"]  # its holder gone, the lock file goes too (it was left behind)


def test_two_averagers_of_one_run_may_not_share_a_snapshot_folder(tmp_path: Any) -> None:
    from lawa_suite.training.loop import train

    folder = tmp_path / "snaps"
    with pytest.raises(ConfigError, match=r"^lawa_b\.dir: .* is lawa's snapshot folder too") as info:
        train(resolve(["task=toy", f"out={tmp_path / 'run'}", "averager=lawa,lawa_b", "lawa_b.of=lawa",
                       "lawa.store=disk", "lawa_b.store=disk", f"lawa.dir={folder}", f"lawa_b.dir={folder}"]))
    assert "\n" not in str(info.value) and not folder.exists()
