"""The evaluator contract: score one set of weights on the task's fixed held-out batches."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from lawa_suite import registry
from lawa_suite.registry import class_contract_problem


@dataclass(frozen=True)
class EvaluationContext:
    """What an evaluator may need of the run, handed in by whoever scores (the loop's ``Scorer``), so an evaluator
    never reads the run's config through the task."""

    out: Path | None = None   # the run folder: per-evaluation artefacts (sample grids) go under it; None = none
    cache: Path | None = None  # the data cache: statistics worth keeping between runs (FID references); None = none
    steps: int = 0            # the run's optimizer steps (to place points given as fractions of it); 0 = unknown
    eval_every: int = 0       # evaluations every this many steps, and at ``steps``; 0 = unknown

    @classmethod
    def of_run(cls, run: Any) -> EvaluationContext:
        """The context of a run config (``RunConfig``: ``out``, ``data.cache``, ``steps``, ``eval.every``); empty
        for None (a Hugging Face folder scored by ``suite eval`` has no run config)."""
        if run is None:
            return cls()
        out, cache = getattr(run, "out", ""), getattr(getattr(run, "data", None), "cache", "")
        every = getattr(getattr(run, "eval", None), "every", 0)
        return cls(out=Path(out) if out else None, cache=Path(cache) if cache else None,
                   steps=int(getattr(run, "steps", 0) or 0), eval_every=int(every or 0))


def create_evaluator(name: str, task: Any, context: EvaluationContext) -> "Evaluator":
    """The registered evaluator ``name`` for ``task``, given ``context`` when its constructor takes one (a plugin
    written for ``Evaluator(task)`` alone keeps working)."""
    return build_evaluator(registry.evaluators.get(name), task, context)


def build_evaluator(factory: Any, task: Any, context: EvaluationContext) -> "Evaluator":
    """``factory(task=task, context=context)``, or ``factory(task=task)`` when it takes no ``context``."""
    parameters = inspect.signature(factory).parameters
    takes = "context" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    return factory(task=task, context=context) if takes else factory(task=task)


class Evaluator(ABC):
    """Base of every evaluator. ``metrics`` maps each metric it reports to "max" or "min" (which is better);
    the first one is the headline metric of reports. ``context`` holds what it may need of the run (run folder,
    cache, length): the ``Scorer`` hands it in. Built without one (tests, older callers), it is read off the
    task's run config here, the one place an evaluator's base still looks at ``task.run``."""

    name: ClassVar[str] = ""
    metrics: ClassVar[dict[str, str]]
    #: a sentence for a metric whose name alone could mislead; reports print it where the metric appears
    notes: ClassVar[dict[str, str]] = {}

    def __init__(self, task: Any, context: EvaluationContext | None = None) -> None:
        self.task = task
        self.context = context if context is not None else EvaluationContext.of_run(getattr(task, "run", None))

    def begin(self, step: int, weights_name: str) -> None:
        """Called before each ``evaluate`` with the step and the weights' name ("raw" or an averager's) it
        scores, for evaluators that write per-evaluation artefacts (sample grids). Most ignore it."""

    def details(self) -> dict[str, float]:
        """Facts about the last ``evaluate`` that are not metrics (nothing better or worse about them), written
        beside its scores in metrics.jsonl (the ``Scorer`` adds them; metrics-meta.json lists the metrics alone).
        Every built-in evaluator says here what the evaluation rests on, summed over processes: ``examples``
        (``accuracy``), ``tokens`` (``perplexity``), ``fid_samples`` (``fid``); a report reads ``examples``,
        ``tokens``, ``windows``, ``images`` and ``fid_samples`` as such sizes, never as metrics. None by default."""
        return {}

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
    problem = class_contract_problem(obj, "evaluator", ("metrics", "begin", "evaluate"), "lawa_suite.Evaluator")
    if problem is None and (not isinstance(obj.metrics, dict) or not obj.metrics):
        problem = f"{obj.__qualname__}.metrics must map each metric it reports to 'max' or 'min'"
    return problem
