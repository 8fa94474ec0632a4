"""Schedule-free training (Defazio et al. 2024, the ``schedulefree`` package) inside the one loop.

A schedule-free optimizer keeps three sequences. ``z`` takes the plain optimizer steps (in the optimizer's state),
``x`` is a running weighted average of ``z`` (the weights to evaluate and ship: ``optimizer.eval()`` puts them in the
parameters), and ``y = (1 - beta) z + beta x`` is where gradients are taken (``optimizer.train()`` puts it back).
How the suite uses them:

- Training, checkpoints and the trajectory hold ``y``: the live parameters stay in train mode for the whole run, so
  a checkpoint's weights and optimizer state (``z``, ``train_mode=True``) are consistent and resume is bit for bit.
  Mode round trips (``train()`` after ``eval()``) are not exact in floating point, so the loop never makes one on
  weights it keeps (``EvalSequence``).
- The raw evaluation scores ``x``, with BatchNorm statistics recomputed for it (those gathered in training belong to
  ``y``): the optimizer's ``eval()`` inside the loop's weight swap, which puts the exact saved ``y`` back after.
- Averagers observe ``y``, the loop's raw weights at each step: what checkpoints and trajectory files hold, so an
  online average equals ``suite average`` over the run's trajectory and each averager's profile is over the
  iterates it saw; it costs no extra copy a step. (``x`` is itself an average of ``z``; averaging it would average
  twice.) Averaged weights are scored as they are, after the usual BatchNorm recalibration.
- One warm-up: the run's ``warmup`` (the loop's learning-rate multiplier); the optimizer's own ``warmup_steps`` is
  0. The schedule is ``constant``; the config refuses any other (``config.settle_schedule_free``).
- No fused kernel exists for these optimizers: they run their ``foreach`` form on CUDA and on the CPU alike.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lawa_suite.config import SCHEDULE_FREE, ConfigError, RunConfig, ScheduleFreeConfig

__all__ = ["adamw", "sgd", "is_schedule_free", "prepare", "EvalSequence"]


def _package() -> Any:
    try:
        import schedulefree
    except ImportError:
        raise ConfigError(f"optimizer: {SCHEDULE_FREE} needs the schedulefree package; pip install schedulefree "
                          f"(a dependency of lawa-suite: reinstall it)") from None
    return schedulefree


def adamw(params: Iterable[Any], lr: float, cfg: ScheduleFreeConfig, *, betas: tuple[float, float], eps: float = 1e-8,
          weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Schedule-free AdamW in train mode; ``betas[0]`` is its interpolation ``beta`` (> 0: ``eval()`` divides)."""
    optimizer = _package().AdamWScheduleFree(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                             warmup_steps=0, r=cfg.r, weight_lr_power=cfg.weight_lr_power,
                                             foreach=True)
    optimizer.train()  # (no state yet: only the mode flag changes)
    return optimizer


def sgd(params: Iterable[Any], lr: float, cfg: ScheduleFreeConfig, *, momentum: float,
        weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Schedule-free SGD in train mode; ``momentum`` is its interpolation ``beta``, in (0, 1)."""
    optimizer = _package().SGDScheduleFree(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                           warmup_steps=0, r=cfg.r, weight_lr_power=cfg.weight_lr_power,
                                           foreach=True)
    optimizer.train()
    return optimizer


def _unwrapped(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer holds the real one


def is_schedule_free(optimizer: Any) -> bool:
    """Whether ``optimizer`` keeps schedule-free's train and eval sequences (the package's optimizers do; a
    plugin's may too): it has ``train()`` and ``eval()`` and marks its mode in its parameter groups."""
    inner = _unwrapped(optimizer)
    groups = getattr(inner, "param_groups", None) or [{}]
    return callable(getattr(inner, "eval", None)) and callable(getattr(inner, "train", None)) \
        and "train_mode" in groups[0]


def prepare(optimizer: Any, rc: RunConfig) -> bool:
    """Whether the run trains schedule-free; if so, checks that the loop's schedule and the optimizer's own warm-up
    do not both shape the learning rate (a task plugin may build one with ``warmup_steps``) and leaves the optimizer
    in train mode. Called on the task's optimizer before any work, so a refusal creates nothing."""
    if not is_schedule_free(optimizer):
        return False
    inner = _unwrapped(optimizer)
    if rc.schedule != "constant":
        raise ConfigError(f"schedule: a schedule-free optimizer replaces the learning-rate decay with its own "
                          f"averaging; expected constant (a warm-up is warmup=N), got {rc.schedule!r}")
    own = max(int(group.get("warmup_steps", 0) or 0) for group in inner.param_groups)
    if own and rc.warmup:
        raise ConfigError(f"warmup: the task's schedule-free optimizer warms up over {own} steps itself; expected 0 "
                          f"(one warm-up, not two), got {rc.warmup}")
    if not all(group["train_mode"] for group in inner.param_groups):
        inner.train()
    return True


class EvalSequence:
    """Puts a schedule-free run's evaluation weights ``x`` into the model for the raw evaluation. ``load`` must
    follow ``WeightSwap.save_raw`` (the parameters hold ``y``), and ``release`` must precede ``restore_raw``:
    it returns the optimizer to train mode (which moves whatever weights the model then holds, not ``y``), and
    ``restore_raw`` then copies the exact ``y`` back. So the live weights never make an inexact round trip."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = _unwrapped(optimizer)

    def load(self) -> None:
        self.optimizer.eval()

    def release(self) -> None:
        self.optimizer.train()
