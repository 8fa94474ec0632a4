"""Shared fixtures: a tiny test-only task (``toy``) so the loop's tests run in milliseconds, a test-only averager
(``spy``) that records what it is shown, and ``tiny_run``, one ``suite run`` shared by a module's tests. Plain
helper functions are in helpers.py.

The toy model is the reliability harness's: Linear -> BatchNorm1d -> ReLU -> Dropout -> Linear, so it has a
float buffer, an integer buffer and a consumer of global RNG (dropout), which exact resume must restore.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from lawa_suite import registry
from lawa_suite.averagers.base import Averager
from lawa_suite.cli import app
from lawa_suite.data.stream import IndexStream, TensorStream
from lawa_suite.tasks.base import Task

# One intra-op thread: tiny tensors gain nothing from more, and spinning OpenMP threads on a busy 2-core
# machine turns microsecond kernels into tens of milliseconds.
torch.set_num_threads(1)


class SimulatedCrash(Exception):
    """Raised by the toy task to stand in for a process dying mid-run."""


@dataclass
class ToyConfig:
    hidden: int = 16
    dropout: float = 0.1
    samples: int = 256


class ToyTask(Task):
    name = "toy"
    Config = ToyConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"steps": 20, "lr": 0.05, "batch_size": 16, "eval.every": 5, "eval.bn_batches": 2,
                 "averager": ["lawa", "ema", "swa"], "lawa.k": 3, "lawa.nu": 2, "ema.decay": 0.9,
                 "swa.start": 0.5, "progress": False, "log_every": 1},
    }
    default_preset = "tiny"
    evaluator = "accuracy"
    data_sources = ("synthetic",)

    # Fault injection for loop tests (class attributes, not config: a resumed run must see the same config).
    nan_at: ClassVar[set[int]] = set()      # steps whose next loss is NaN, once each (a skipped step is retried)
    nan_from: ClassVar[int | None] = None   # every loss from this step on is NaN
    crash_at: ClassVar[int | None] = None   # step at which loss() raises, simulating a crash
    sigterm_at: ClassVar[int | None] = None  # step at which loss() sends this process SIGTERM (preemption)
    consumed: ClassVar[list[int]] = []      # sample ids in the order the loop consumed them

    def setup(self) -> None:
        g = torch.Generator().manual_seed(1234)
        x = torch.randn(self.config.samples + 64, 8, generator=g)
        y = (x @ torch.randn(8, 4, generator=g)).argmax(1)
        self.x, self.y = x[:self.config.samples], y[:self.config.samples]
        self.x_test, self.y_test = x[self.config.samples:], y[self.config.samples:]

    def build_model(self) -> nn.Module:
        h = self.config.hidden
        return nn.Sequential(nn.Linear(8, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Dropout(self.config.dropout),
                             nn.Linear(h, 4))

    def build_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=lr)

    def train_stream(self, micro_batch: int, rank: int, world: int) -> TensorStream:
        indices = IndexStream(len(self.x), micro_batch, self.run.seed, rank, world)
        return TensorStream(indices, lambda idx: (self.x[idx], self.y[idx], idx))

    def eval_batches(self) -> list[Any]:
        return [(self.x_test[i:i + 32], self.y_test[i:i + 32]) for i in range(0, len(self.x_test), 32)]

    def calibration_batches(self, count: int) -> list[Any]:
        return [(self.x[i * 16:(i + 1) * 16], self.y[i * 16:(i + 1) * 16]) for i in range(count)]

    def loss(self, model: nn.Module, batch: Any, step: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        if step >= 0 and len(batch) > 2:
            if step == ToyTask.crash_at:
                raise SimulatedCrash(f"simulated crash at step {step}")
            if step == ToyTask.sigterm_at:
                ToyTask.sigterm_at = None
                os.kill(os.getpid(), signal.SIGTERM)
            ToyTask.consumed.extend(batch[2].tolist())
        loss = F.cross_entropy(model(x), y)
        poisoned = step in ToyTask.nan_at or (ToyTask.nan_from is not None and step >= ToyTask.nan_from)
        ToyTask.nan_at.discard(step)
        return loss * float("nan") if poisoned else loss

    def logits_and_targets(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return model(batch[0]), batch[1]


# A complete third-party averager (class ``Thing``) as plugin tests install it: the smallest subclass of Averager.
PLUGIN_AVERAGER = """
from dataclasses import dataclass
from lawa_suite import Averager
class Thing(Averager):
    @dataclass
    class Config:
        alpha: float = 0.5
    ready = False
    def wants(self, step): return True
    def _update(self, step, floats): pass
    def _averaged_floats(self): return []
    def _extra_state(self): return {}
    def _load_extra_state(self, state): pass
"""


@dataclass
class SpyConfig:
    pass


class Spy(Averager):
    """An averager (``averager=spy``) that records the steps it is shown; never ready."""
    name = "spy"
    Config = SpyConfig
    seen: ClassVar[list[int]] = []

    @property
    def ready(self):
        return False

    def wants(self, step):
        return True

    def _update(self, step, floats):
        Spy.seen.append(step)

    def _averaged_floats(self):
        return []

    def _extra_state(self):
        return {}

    def _load_extra_state(self, state):
        pass


if "toy" not in registry.tasks._builtins:
    registry.tasks.register("toy")(ToyTask)


def reset_toy_faults() -> None:
    ToyTask.nan_at, ToyTask.nan_from, ToyTask.crash_at, ToyTask.sigterm_at = set(), None, None, None
    ToyTask.consumed = []


@pytest.fixture(autouse=True)
def _reset_toy_faults():
    reset_toy_faults()
    yield
    reset_toy_faults()


@pytest.fixture
def spy():
    """``averager=spy`` for one test, its record emptied. Registered only meanwhile: test_profiles holds every
    registered averager to the averager contract, which a never-ready stand-in does not meet."""
    Spy.seen = []
    registry.averagers.register("spy")(Spy)
    yield Spy
    registry.averagers._builtins.pop("spy", None)


@pytest.fixture(scope="module")
def tiny_run(request, tmp_path_factory) -> Path:
    """One ``suite run`` through the CLI for a module's tests: the words are the module's ``TINY_RUN``; the run's
    folder is ``<tmp>/run`` and its data cache ``<tmp>/cache`` beside it."""
    words = request.module.TINY_RUN
    root = tmp_path_factory.mktemp("tiny-run")
    result = CliRunner().invoke(app, ["run", *words, f"out={root / 'run'}", f"data.cache={root / 'cache'}",
                                      "progress=false"])
    assert result.exit_code == 0, result.output
    return root / "run"


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """A private, empty torch hub cache (``$TORCH_HOME``) and no network (every download raises URLError); returns
    the hub's checkpoints folder, where torch-fidelity looks for its Inception weights."""
    import urllib.error
    import urllib.request

    import torch.hub

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable (test)")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return tmp_path / "torch-home" / "hub" / "checkpoints"
