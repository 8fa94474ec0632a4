"""The evaluator contract: score one set of weights on the task's fixed held-out batches."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn


class Evaluator(ABC):
    """Base of every evaluator. ``metrics`` maps each metric it reports to "max" or "min" (which is better);
    the first one is the headline metric of reports."""

    name: ClassVar[str] = ""
    metrics: ClassVar[dict[str, str]]
    #: a sentence for a metric whose name alone could mislead; reports print it where the metric appears
    notes: ClassVar[dict[str, str]] = {}

    def __init__(self, task: Any) -> None:
        self.task = task

    def begin(self, step: int, weights_name: str) -> None:
        """Called before each ``evaluate`` with the step and the weights' name ("raw" or an averager's) it
        scores, for evaluators that write per-evaluation artefacts (sample grids). Most ignore it."""

    @abstractmethod
    def evaluate(self, model: nn.Module, batches: list[Any], accelerator: Any = None) -> dict[str, float]:
        """Score ``model`` (already in eval mode, under no_grad) on this process's ``batches``; with an
        accelerator, reduce across processes so every rank returns the same numbers."""


def reduce_sums(sums: dict[str, float], accelerator: Any = None, device: Any = None) -> dict[str, float]:
    """Sum per-process totals over every process (no-op in a single process). The sums travel on the
    accelerator's device: NCCL, the group accelerate starts on GPUs, takes no host tensor, and a rank that got no
    evaluation batch has no device of its own to tell (``device`` is ignored; kept for evaluators that pass it)."""
    if accelerator is None or accelerator.num_processes == 1:
        return sums
    keys = sorted(sums)
    values = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(values, "sum")
    return dict(zip(keys, total.tolist()))


def contract_problem(obj: Any) -> str | None:
    """Why ``obj`` cannot serve as an evaluator (checked by the registry when it is selected), or None."""
    from lawa_suite.registry import class_contract_problem

    problem = class_contract_problem(obj, "evaluator", ("metrics", "begin", "evaluate"), "lawa_suite.Evaluator")
    if problem is None and (not isinstance(obj.metrics, dict) or not obj.metrics):
        problem = f"{obj.__qualname__}.metrics must map each metric it reports to 'max' or 'min'"
    return problem
