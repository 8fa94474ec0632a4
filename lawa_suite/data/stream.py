"""A resumable stream of index batches over an in-memory dataset.

Epoch ``e`` visits the examples in the permutation drawn from a generator seeded with ``(seed, e)``, so the
order depends only on the seed and the position, never on global RNG state: resuming from
``{"epoch", "offset"}`` continues the exact same sequence. Each global micro-batch is split across
processes by rank (rank ``r`` takes every ``world``-th example of it).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from lawa_suite.errors import ConfigError


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


class IndexStream:
    """Endless index batches; drops the ragged tail of each epoch so every batch has the same size."""

    def __init__(self, n: int, batch: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if batch > n:
            raise ConfigError(f"batch_size: a micro-batch of {batch} examples (batch_size / grad_accum) is larger "
                              f"than the training set ({n} examples); expected at most {n}, or a larger grad_accum")
        if batch % world:
            raise ConfigError(f"batch_size: a micro-batch of {batch} examples does not split evenly over {world} "
                              f"processes; expected a multiple of {world}")
        self.n, self.batch, self.seed, self.rank, self.world = n, batch, seed, rank, world
        self.epoch, self.offset = 0, 0
        self._perm: Tensor | None = None
        self.last_indices: Tensor | None = None  # this process's indices of the newest batch

    def next_indices(self) -> Tensor:
        if self.offset + self.batch > self.n:
            self.epoch, self.offset, self._perm = self.epoch + 1, 0, None
        if self._perm is None:
            self._perm = epoch_permutation(self.n, self.seed, self.epoch)
        global_batch = self._perm[self.offset:self.offset + self.batch]
        self.offset += self.batch
        self.last_indices = global_batch[self.rank::self.world]
        return self.last_indices

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.offset, self._perm = int(state["epoch"]), int(state["offset"]), None


class TensorStream:
    """A BatchStream over in-memory tensors: ``next_batch()`` returns ``make_batch(indices)``."""

    def __init__(self, indices: IndexStream, make_batch: Callable[[Tensor], Any]) -> None:
        self.indices = indices
        self.make_batch = make_batch

    def next_batch(self) -> Any:
        return self.make_batch(self.indices.next_indices())

    def state_dict(self) -> dict[str, Any]:
        return self.indices.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.indices.load_state_dict(state)
