"""``averaged_weights``: an averager's weights inside a plain PyTorch loop, for one ``with`` block.

::

    with averaged_weights(model, ema, calibration_batches):
        val_loss = evaluate(model)        # the EMA weights (BatchNorm statistics recomputed on the batches)
    # the raw weights are back, bit for bit, and training goes on

The swap is ``scoring.WeightSwap``'s (fused copies into the model's own tensors, the raw ones kept in a buffer and
copied back), and the recalibration ``scoring.recalibrate_batchnorm`` (a plain average over the batches, like
``torch.optim.swa_utils.update_bn``), run under a forked RNG: what the loop scores and what the block does never
change training. BatchNorm's running statistics are buffers, so they come back with the raw weights too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lawa_suite.averagers.base import Averager
from lawa_suite.errors import AnalysisError
from lawa_suite.training.scoring import WeightSwap, forked_rng, recalibrate_batchnorm
from lawa_suite.tasks.base import has_batchnorm

__all__ = ["averaged_weights", "default_forward", "check_fits"]

Forward = Callable[[nn.Module, Any], Any]


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def default_forward(model: nn.Module, batch: Any) -> Any:
    """One forward pass the way most loops feed a model: ``model(**batch)`` for a mapping (Hugging Face style),
    ``model(batch[0])`` for an ``(inputs, targets)`` pair, ``model(batch)`` otherwise; tensors moved to the
    model's device first."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batch = _to(batch, device)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


@dataclass
class _ForwardTask:
    """What ``recalibrate_batchnorm`` calls on a task (``loss``), for a loop that has no task: a forward pass."""
    forward: Forward

    def loss(self, model: nn.Module, batch: Any, step: int) -> Any:
        return self.forward(model, batch)


def check_fits(model: nn.Module, averager: Any, where: str) -> None:
    """One line for an averager that cannot go into ``model`` now: not an averager, no average yet, or averaging a
    model of another shape."""
    if not isinstance(averager, Averager):
        raise TypeError(f"{where}: expected an averager (registry.averagers.create(...)), got "
                        f"{type(averager).__name__}")
    if not averager.ready or averager.layout is None:
        raise AnalysisError(f"{where}: averager '{averager.name}' has no average yet ({averager.updates} "
                            f"observations accepted, {averager!r}); observe more steps first or check .ready")
    problem = averager.layout.mismatch(model.state_dict())
    if problem is not None:
        raise AnalysisError(f"{where}: averager '{averager.name}' averaged another model: the model's {problem}")


@contextmanager
def averaged_weights(model: nn.Module, averager: Averager, calibration: Iterable[Any] | None = None,
                     forward: Forward | None = None) -> Iterator[nn.Module]:
    """Within the block ``model`` holds ``averager``'s averaged weights; after it, the raw ones, bit for bit.

    Args:
        model: the model the averager observed (the same names and shapes).
        averager: a ready averager (``averager.ready``); one that is not is an error naming it.
        calibration: batches to recompute BatchNorm running statistics on, for a model with BatchNorm (ignored
            without; without them a BatchNorm model keeps the averaged running statistics).
        forward: ``forward(model, batch)``, one forward pass on a calibration batch; ``default_forward`` if None.

    The model is left in the train/eval mode it had on entry (also after recalibration) and gets it back on exit.
    """
    check_fits(model, averager, "averaged_weights")
    batches = None if calibration is None else list(calibration)
    if batches is not None and not batches:  # recalibrating on nothing would reset the statistics to 0 and 1
        raise AnalysisError("averaged_weights: calibration holds no batches; pass training batches, or None to keep "
                            "the averaged BatchNorm statistics")
    was_training = model.training
    swap = WeightSwap(model)
    swap.save_raw()
    try:
        swap.load(averager)
        if batches and averager.needs_bn_recalibration and has_batchnorm(model):
            with forked_rng():
                recalibrate_batchnorm(model, _ForwardTask(forward or default_forward), batches)
            model.train(was_training)
        yield model
    finally:
        swap.restore_raw()
        model.train(was_training)
