"""The task contract: what the one training loop needs from a domain (model, data, loss, evaluation).

A task is one file that registers itself with ``registry.tasks``. Its ``Config`` dataclass owns the task's
own keys (``cifar.width=16``; a bare ``width=16`` also reaches it), ``presets`` maps preset names to the
overrides they apply (run keys and task keys, dotted), and ``evaluator`` names the registered evaluator
that scores it. Everything specific to a domain (augmentation, token shifting, noise sampling) lives in
the task file; the loop never branches on which task it runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from lawa_suite.registry import class_contract_problem
from lawa_suite.errors import DataUnavailable, ExportUnsupported  # re-exported: tasks raise them

if TYPE_CHECKING:
    from lawa_suite.config import RunConfig

__all__ = ["Task", "BatchStream", "DataUnavailable", "ExportUnsupported", "has_batchnorm", "parameter_count",
           "contract_problem"]


class BatchStream(Protocol):
    """An endless, resumable source of this process's training micro-batches."""

    def next_batch(self) -> Any: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Task(ABC):
    """Base of every task. The loop calls, in order: setup, build_model, build_optimizer, train_stream,
    eval_batches / calibration_batches, then loss once per micro-batch."""

    name: ClassVar[str] = ""
    Config: ClassVar[type]                          # dataclass of the task's own keys
    presets: ClassVar[dict[str, dict[str, Any]]]    # preset -> {dotted key: value}
    default_preset: ClassVar[str] = "cpu"
    evaluator: ClassVar[str]                        # registered evaluator name
    data_sources: ClassVar[tuple[str, ...]]         # values `data=` accepts; the first is the default
    # what the one-line error about saved weights that do not fit the model tells the user to check
    weights_hint: ClassVar[str] = "check task= and its keys (e.g. the width) against the run that saved them"

    def __init__(self, config: Any, run: "RunConfig") -> None:
        self.config = config
        self.run = run

    def setup(self) -> None:
        """Find, fetch or prepare the data. Raise DataUnavailable with a one-line fix when offline."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialised model (seeded by the loop before the call)."""

    @abstractmethod
    def build_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        """The optimizer; the loop sets each group's learning rate every step from the schedule."""

    @abstractmethod
    def train_stream(self, micro_batch: int, rank: int, world: int) -> BatchStream:
        """This process's share (``micro_batch // world`` examples) of each global micro-batch."""

    @abstractmethod
    def eval_batches(self) -> list[Any]:
        """Fixed held-out batches: the same ones for raw weights and every averager, every evaluation."""

    @abstractmethod
    def calibration_batches(self, count: int) -> list[Any]:
        """``count`` fixed training batches used to recompute BatchNorm statistics of averaged weights.

        The loop feeds each to ``loss(model, batch, step=-1)`` in train mode under ``no_grad``: for these
        batches (and step -1) ``loss`` should skip augmentation and any side effect."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any, step: int) -> Tensor:
        """The training loss of one micro-batch. ``step`` seeds any augmentation, so resume is exact."""

    def export(self, weights: Mapping[str, Tensor], out: Path) -> None:
        """Write ``weights`` (a state_dict of ``build_model()``'s model) into the empty folder ``out`` in the
        domain's standard format (a Hugging Face model folder, a diffusers pipeline). ``suite export`` calls it
        without ``setup()`` (the training data may be absent where weights are exported); tasks without a
        standard format keep this default."""
        raise ExportUnsupported(f"task '{self.name}' has no export format; its weights are plain safetensors "
                                f"(the checkpoint's model.safetensors)")

    def fit_weights(self, model: nn.Module, weights: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """Saved ``weights`` as ``model``'s state_dict, before ``suite eval`` and ``suite analyze lmc`` load them. The
        suite's checkpoints hold the model's own state_dict, taken as it is; a task that scores another tool's
        checkpoints maps their names here (``tasks/causal_lm.py``: as ``from_pretrained`` reads them)."""
        return weights

    def describe_scoring(self) -> str:
        """What scores the weights, for the reports of ``suite eval``: by default the task and its preset."""
        return f"task {self.run.task} ({self.run.preset})"

    def summary(self, model: nn.Module) -> str:
        """One line printed at start: what model, how many parameters, what data."""
        params = sum(p.numel() for p in model.parameters())
        return f"{self.name}: {type(model).__name__}, {params:,} parameters"


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def parameter_count(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


#: What the loop, config resolution, evaluation, analysis and export use of a task class.
CONTRACT = ("Config", "presets", "default_preset", "evaluator", "data_sources", "setup", "build_model",
            "build_optimizer", "train_stream", "eval_batches", "calibration_batches", "loss", "export", "summary",
            "fit_weights", "describe_scoring", "weights_hint")


def contract_problem(obj: Any) -> str | None:
    """Why ``obj`` cannot serve as a task (checked by the registry when it is selected), or None."""
    problem = class_contract_problem(obj, "task", CONTRACT, "lawa_suite.Task")
    if problem is None and obj.default_preset not in obj.presets:
        problem = (f"{obj.__qualname__}: default_preset {obj.default_preset!r} is not one of its presets "
                   f"({', '.join(obj.presets)})")
    return problem
