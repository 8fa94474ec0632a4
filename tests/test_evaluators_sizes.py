"""Every built-in evaluator records the size of what it scored beside each evaluation's scores (issue 29, item 13):
the held-out examples (``accuracy``), the held-out tokens (``perplexity``); ``fid`` records its generated samples
(``fid_samples``). Under DDP/FSDP each rank scores a share and the recorded size is the total over ranks. The size
is a detail (``Evaluator.details``), never a metric: ``evaluate`` returns the metrics alone."""

from __future__ import annotations

import torch

from lawa_suite import registry
from lawa_suite.evaluators.accuracy import Accuracy
from lawa_suite.evaluators.perplexity import Perplexity


class _FixedLogits:
    """A stand-in task whose batches are (logits, targets) and whose model is ignored."""

    def logits_and_targets(self, model, batch):
        return batch


class _TwoProcesses:
    """An accelerator stand-in: two processes, the other of which saw the same batches (its sums are doubled)."""
    num_processes, device = 2, torch.device("cpu")

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        return tensor * 2


def _batches(sizes, classes=5):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(n, classes, generator=g), torch.randint(0, classes, (n,), generator=g)) for n in sizes]


def test_accuracy_records_how_many_held_out_examples_it_scored_over_every_process():
    batches = _batches((7, 13, 1))
    evaluator = Accuracy(_FixedLogits())
    scores = evaluator.evaluate(None, batches)
    assert set(scores) == set(Accuracy.metrics)  # the size is no metric
    assert evaluator.details() == {"examples": 21}
    evaluator.evaluate(None, batches, _TwoProcesses())
    assert evaluator.details() == {"examples": 42}  # the total over ranks, not this rank's share


def test_perplexity_records_how_many_held_out_tokens_it_scored_over_every_process():
    batches = _batches((12, 30), classes=11)  # flattened (tokens, vocab) logits, as a language task hands them
    evaluator = Perplexity(_FixedLogits())
    scores = evaluator.evaluate(None, batches)
    assert set(scores) == set(Perplexity.metrics)
    assert evaluator.details() == {"tokens": 42}
    evaluator.evaluate(None, batches, _TwoProcesses())
    assert evaluator.details() == {"tokens": 84}


def test_every_built_in_evaluator_declares_a_size_that_the_report_reads_as_a_size():
    from lawa_suite.report.curves import SIZE_KEYS

    assert {"examples", "tokens", "images", "fid_samples"} <= set(SIZE_KEYS)
    for name in ("accuracy", "perplexity", "fid"):
        metrics = registry.evaluators.get(name).metrics
        assert not set(metrics) & set(SIZE_KEYS), name  # no size is ever taken for a metric
