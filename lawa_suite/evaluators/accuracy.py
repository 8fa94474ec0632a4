"""Top-1 accuracy and mean cross-entropy of a classifier on the task's fixed held-out batches.

The task supplies ``logits_and_targets(model, batch) -> (logits (B, K), targets (B,))``; this file knows
nothing else about its batches. Totals (correct, summed loss, count) are summed over processes before
dividing, so every rank reports the exact figures of the whole evaluation set. How many held-out examples that set
held (over every process) is recorded beside the scores as ``examples`` (``details``): what each evaluation rests on.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lawa_suite import registry
from lawa_suite.evaluators.base import Evaluator, reduce_sums


@registry.evaluators.register("accuracy")
class Accuracy(Evaluator):
    """``accuracy`` (fraction of top-1 hits, in [0, 1]) and ``loss`` (mean cross-entropy, no label smoothing);
    ``details``: ``examples``, the held-out examples the last evaluation scored over every process."""

    name = "accuracy"
    metrics = {"accuracy": "max", "loss": "min"}
    _examples: int | None = None

    def details(self) -> dict[str, float]:
        """``examples``: how many held-out examples (summed over processes) the last evaluation scored."""
        return {} if self._examples is None else {"examples": self._examples}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list[Any], accelerator: Any = None) -> dict[str, float]:
        correct: list[Tensor] = []
        losses: list[Tensor] = []
        count = 0
        for batch in batches:
            logits, targets = self.task.logits_and_targets(model, batch)
            logits = logits.float()
            correct.append((logits.argmax(dim=-1) == targets).sum())
            losses.append(F.cross_entropy(logits, targets, reduction="sum").double())
            count += targets.numel()
        # one host sync for the whole evaluation, not one per batch
        sums = {"correct": float(torch.stack(correct).sum()) if correct else 0.0,
                "loss": float(torch.stack(losses).sum()) if losses else 0.0, "count": float(count)}
        sums = reduce_sums(sums, accelerator)
        self._examples = int(sums["count"])
        if sums["count"] == 0:
            raise ValueError("accuracy: no held-out examples to evaluate (the task returned no batches)")
        return {"accuracy": sums["correct"] / sums["count"], "loss": sums["loss"] / sums["count"]}
