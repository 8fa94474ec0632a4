"""Batch helpers shared by tasks: the per-batch random generator that makes augmentation and noise resume-exact."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import Tensor

__all__ = ["batch_generator", "generator_seed"]


def batch_generator(seed: int, step: int, indices: Tensor) -> torch.Generator:
    """A CPU generator determined by (seed, step, the batch's example indices) alone: resume-exact, and
    different for every micro-batch of a step (they hold different examples)."""
    digest = hashlib.blake2b(np.asarray([seed, step], dtype=np.int64).tobytes() +
                             indices.cpu().numpy().astype(np.int64).tobytes(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def generator_seed(generator: torch.Generator) -> int:
    """A 63-bit seed out of a seeded generator, to seed generators on other devices."""
    return int(torch.randint(0, 2**62, (), generator=generator))
