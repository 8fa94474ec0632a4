"""Scoring weights the one way the suite does it, in training (``train.py``) and after it (``evaluation.py``).

Raw weights and every averager are scored on the same fixed held-out batches, in eval mode under the run's
autocast, by the task's evaluator. Averaged weights of a BatchNorm model first get fresh running statistics
from a fixed set of training batches (like ``torch.optim.swa_utils.update_bn``): an average of weights does not
come with matching statistics. Scoring runs under a forked RNG, so it never changes training. Averaged weights
go into the model by fused copies into its own tensors, and the raw ones come back bit for bit. A run whose raw
weights to score are not the live ones (schedule-free: the optimizer's eval sequence) passes ``raw_weights``, which
puts them in inside the same swap; they get fresh BatchNorm statistics too.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from lawa_suite.averagers.base import Averager, find_aliases, named_tensors
from lawa_suite.evaluators.base import EvaluationContext, create_evaluator
from lawa_suite.training.sharding import gathered, is_sharded, reshard

__all__ = ["rng_state", "set_rng_state", "seed_everything", "forked_rng", "recalibrate_batchnorm", "WeightSwap",
           "RawWeights", "Scorer", "score_line"]


# -- random number generators --------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def forked_rng() -> Iterator[None]:
    """Evaluation may draw random numbers (dropout in calibration, samplers); training must not notice."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


# -- weights in and out of the model ---------------------------------------------------------------------------
@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, task: Any, batches: list[Any]) -> None:
    """Recompute BatchNorm running statistics as a plain average over ``batches`` (like swa_utils.update_bn)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    model.train()
    # Eager even in a compiled model (compile=true): the cumulative average reads num_batches_tracked on the host,
    # a graph break and a third compiled variant, for a few batches that gain nothing from compiled code.
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    with set_stance("force_eager") if set_stance else nullcontext():
        for batch in batches:
            task.loss(model, batch, step=-1)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


class WeightSwap:
    """Puts other weights into a model and the raw ones back, by fused copies into the model's own tensors (each
    tied tensor once): no state_dict clones, and the raw copy is a buffer reused between evaluations. A sharded
    (FSDP2) model's own tensors are this rank's local shards, which is what its averagers hold; after each copy the
    model is resharded, so its next forward gathers the new shards (FSDP2 keeps the root's gathered after a
    forward in eval mode, which would otherwise score the previous weights)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.sharded = is_sharded(model)
        self.names: list[str] = []
        self.live: list[Tensor] = []
        self.raw: list[Tensor] = []

    def save_raw(self) -> None:
        if self.sharded:
            reshard(self.model)
        state = named_tensors(self.model)  # looked up each time: a resume or a move may have replaced tensors
        aliased = {alias for alias, _ in find_aliases(state)}
        self.names = [n for n in state if n not in aliased]
        self.live = [state[n] for n in self.names]
        if len(self.raw) != len(self.live) or any(r.shape != t.shape or r.dtype != t.dtype or r.device != t.device
                                                  for r, t in zip(self.raw, self.live)):
            self.raw = [torch.empty_like(t) for t in self.live]
        torch._foreach_copy_(self.raw, self.live)

    def load(self, averager: Averager) -> None:
        """The averager's weights into the model, copied from its own tensors (no new set of weights)."""
        if self.sharded:
            reshard(self.model)
        averager.load_average_into(dict(zip(self.names, self.live)))

    def restore_raw(self) -> None:
        if self.sharded:
            reshard(self.model)
        torch._foreach_copy_(self.live, self.raw)


# -- scores ------------------------------------------------------------------------------------------------------
class RawWeights(Protocol):
    """The raw weights to score when they are not the live ones (``tasks.schedule_free.EvalSequence``)."""

    def load(self) -> None:
        """Put them into the model's own tensors, which hold the live weights (already saved aside)."""

    def release(self) -> None:
        """Undo any state ``load`` changed outside the weights, before the live weights are copied back."""


class Scorer:
    """Scores a model's weights on a task's held-out batches (this process's share of them) the way the loop
    does; ``calibration`` is empty when the model has no BatchNorm (the caller decides). ``raw_weights``: what
    "raw" scores when it is not the live weights. ``context``: what the evaluator is handed of the run (by default
    read off the task's run config here, ``EvaluationContext.of_run``, so the evaluator never reads it)."""

    def __init__(self, task: Any, accelerator: Any, model: nn.Module, batches: list[Any], calibration: list[Any],
                 raw_weights: RawWeights | None = None, context: EvaluationContext | None = None):
        self.task, self.accelerator, self.model = task, accelerator, model
        self.raw_weights = raw_weights
        self.context = context if context is not None else EvaluationContext.of_run(getattr(task, "run", None))
        self.evaluator = create_evaluator(task.evaluator, task, self.context)
        # Each rank scores its share and the evaluator reduces the sums. A sharded model's forward is collective (each
        # unit all-gathers), so its parameters are gathered once for the whole evaluation (sharding.gathered).
        self.sharded = is_sharded(model)
        self.batches = batches[accelerator.process_index::accelerator.num_processes]
        self.calibration = calibration
        self.swap = WeightSwap(model)

    @property
    def metrics(self) -> dict[str, str]:
        """Metric -> "max"|"min" (the first is the headline)."""
        return dict(self.evaluator.metrics)

    def recalibrate(self) -> None:
        """Fresh BatchNorm statistics for the weights now in the model (nothing without BatchNorm)."""
        if self.calibration:
            with self.accelerator.autocast():
                recalibrate_batchnorm(self.model, self.task, self.calibration)

    @torch.no_grad()
    def score(self, step: int | None = None, weights_name: str | None = None) -> dict[str, float]:
        """The evaluator's metrics for the weights now in the model, then its ``details`` (FID's sample count).
        ``step`` and ``weights_name`` ("raw" or an averager's name) tell evaluators that write per-evaluation
        artefacts (sample grids), or draw more samples at some steps, what they score."""
        if step is not None and weights_name is not None:
            self.evaluator.begin(step, weights_name)
        self.model.eval()
        with self.accelerator.autocast(), gathered(self.model) if self.sharded else nullcontext():
            scores = self.evaluator.evaluate(self.model, self.batches, self.accelerator)
        details = getattr(self.evaluator, "details", None)  # a plugin not built on Evaluator may lack it
        return {**scores, **details()} if details is not None else scores

    @torch.no_grad()
    def score_all(self, averagers: Mapping[str, Averager], step: int) -> dict[str, dict[str, float]]:
        """Raw weights and every ready averager on the same batches; the raw weights are restored after."""
        was_training = self.model.training
        with forked_rng():
            ready = {name: avg for name, avg in averagers.items() if avg.ready}
            swapping = bool(ready) or self.raw_weights is not None
            if swapping:
                self.swap.save_raw()  # every tensor of the state_dict: BatchNorm statistics come back too
            # however scoring ends (an out-of-memory error, missing FID data), the live weights and the optimizer's
            # mode come back: a caller that goes on, or saves, must not hold x or an average in the model
            try:
                if self.raw_weights is not None:
                    self.raw_weights.load()
                    self.recalibrate()  # the statistics gathered in training belong to the live weights, not these
                scores = {"raw": self.score(step, "raw")}
                for name, avg in ready.items():
                    self.swap.load(avg)
                    if avg.needs_bn_recalibration:
                        self.recalibrate()
                    scores[name] = self.score(step, name)
            finally:
                if self.raw_weights is not None:
                    self.raw_weights.release()
                if swapping:
                    self.swap.restore_raw()
                self.model.train(was_training)
        return scores


def score_line(step: int, scores: Mapping[str, Mapping[str, float]], metrics: Collection[str] | None = None) -> str:
    """``step 100 | raw: accuracy=0.91 loss=0.3 | lawa: ...``: one evaluation on one line. Given the evaluator's
    ``metrics``, the other numbers (its details: what a score rests on) that every weights share are said once, after
    the step (``step 100 (1,000 examples) | raw: ...``), instead of beside each weights' scores."""
    shared = {} if metrics is None else {
        k: v for k, v in next(iter(scores.values()), {}).items()
        if k not in metrics and all(vals.get(k) == v for vals in scores.values())}
    parts = [f"{w}: " + " ".join(f"{k}={v:.4g}" for k, v in values.items() if k not in shared)
             for w, values in scores.items()]
    said = ", ".join(f"{int(v):,} {k}" if float(v).is_integer() else f"{k}={v:.4g}" for k, v in shared.items())
    return f"step {step}" + (f" ({said})" if said else "") + " | " + " | ".join(parts)
