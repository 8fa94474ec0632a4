"""Mean next-token cross-entropy and perplexity on the task's fixed held-out windows.

The task supplies ``logits_and_targets(model, batch) -> (logits (N, V), targets (N,))`` (the same contract as
``accuracy``). Summed loss and token counts are reduced over processes before dividing, so every rank
reports the figures of the whole held-out set; perplexity is ``exp`` of that mean loss (not a mean of
per-batch perplexities). How many held-out tokens were scored (over every process) is recorded beside the scores as
``tokens`` (``details``): what each evaluation rests on.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lawa_suite import registry
from lawa_suite.evaluators.base import Evaluator, reduce_sums


@registry.evaluators.register("perplexity")
class Perplexity(Evaluator):
    """``loss`` (mean cross-entropy in nats per token) and ``perplexity`` (``exp(loss)``); ``details``: ``tokens``,
    the held-out tokens (predicted positions) the last evaluation scored over every process."""

    name = "perplexity"
    metrics = {"loss": "min", "perplexity": "min"}
    _tokens: int | None = None

    def details(self) -> dict[str, float]:
        """``tokens``: how many held-out tokens (summed over processes) the last evaluation scored."""
        return {} if self._tokens is None else {"tokens": self._tokens}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list[Any], accelerator: Any = None) -> dict[str, float]:
        losses: list[Tensor] = []
        count = 0
        for batch in batches:
            logits, targets = self.task.logits_and_targets(model, batch)
            losses.append(F.cross_entropy(logits.float(), targets, reduction="sum").double())
            count += targets.numel()
        sums = {"loss": float(torch.stack(losses).sum()) if losses else 0.0, "count": float(count)}
        sums = reduce_sums(sums, accelerator)
        self._tokens = int(sums["count"])
        if sums["count"] == 0:
            raise ValueError("perplexity: no held-out tokens to evaluate (the task returned no batches)")
        loss = sums["loss"] / sums["count"]
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}  # exp overflows past ~709
