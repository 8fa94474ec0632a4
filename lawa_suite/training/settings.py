"""What a run sets from its config and nothing else: the learning rate at each step (``lr_factor``, a pure function of
the step: nothing to save, nothing to drift) and the CUDA switches it turns on while it lasts (``cuda_settings``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from lawa_suite.config import RunConfig

__all__ = ["lr_factor", "cuda_settings"]


def lr_factor(step: int, rc: RunConfig) -> float:
    """Multiplier of ``rc.lr`` for the optimizer step that follows ``step`` completed steps."""
    if step < rc.warmup:
        return (step + 1) / rc.warmup
    if rc.schedule == "constant":
        return 1.0
    if rc.schedule == "wsd":  # stable until the last decay_fraction of the steps, then linear or 1-sqrt to min_lr
        start = max(rc.warmup, rc.steps - round(rc.decay_fraction * rc.steps))
        if step < start:
            return 1.0
        progress = min(1.0, (step - start) / max(1, rc.steps - start))
        shape = 1.0 - (math.sqrt(progress) if rc.decay_shape == "1-sqrt" else progress)
        return rc.min_lr + (1 - rc.min_lr) * shape
    progress = min(1.0, (step - rc.warmup) / max(1, rc.steps - rc.warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if rc.schedule == "cosine" else 1.0 - progress
    return rc.min_lr + (1 - rc.min_lr) * shape


@contextmanager
def cuda_settings(rc: RunConfig) -> Iterator[None]:
    """The process-wide CUDA switches a run sets while it lasts, put back on the way out (they outlive the call).

    ``tf32`` (default): TF32 for float32 matmuls and convolutions and cuDNN's autotuner, what a GPU user expects
    (nanoGPT and timm's trainers set them): about 8x the float32 matmul rate on an H100, a 10-bit mantissa in the
    products, float32 accumulation. ``deterministic``: PyTorch's deterministic algorithms and cuBLAS's fixed
    workspace, so a resumed run repeats an uninterrupted one bit for bit on a GPU as on the CPU (without it atomic
    adds in embedding and attention backward make runs differ in the last bits); ops without a deterministic kernel
    warn. Nothing on a machine without CUDA."""
    if not torch.cuda.is_available() or not (rc.tf32 or rc.deterministic):
        yield
        return
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    if rc.tf32:
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = rc.tf32 and not rc.deterministic  # autotuning may pick other kernels per run
    if rc.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS makes its first handle
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved[1], saved[2]
        torch.backends.cudnn.deterministic = saved[3]
        torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])
        if saved[6] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
