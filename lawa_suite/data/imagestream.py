"""Image folders too big for memory (ImageNet at 128 px is 63 GB as uint8): decode files as the batches are
needed, with DataLoader workers, in an order that depends only on (seed, position).

The order is ``IndexStream``'s (a seeded permutation per epoch, split over processes by rank), so a
stream restored from ``state_dict()`` continues exactly where the saved one stopped, and it yields the same
batches as the in-memory ``TensorStream`` over the same files would. Workers decode ahead of the consumer
(``prefetch`` batches each); the saved position is the one *consumed*, never the one prefetched: the
main process advances its own copy of the index stream as batches are handed out, and the workers are
restarted from that position on resume.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lawa_suite.data.images import decode_image
from lawa_suite.data.stream import IndexStream

__all__ = ["FileImages", "FileImageStream", "decode_batches"]


class FileImages(Dataset):
    """``files[i]`` decoded to uint8 ``(3, size, size)`` (short side resized, centre square cut out)."""

    def __init__(self, files: Sequence[str], size: int) -> None:
        self.files, self.size = list(files), size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tensor:
        pixels = decode_image(self.files[index], self.size, crop=True).copy()  # PIL arrays are read-only
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


class _Batches:
    """The loader's batch sampler: index batches of a private copy of the stream, from a given position."""

    def __init__(self, indices: IndexStream) -> None:
        self.indices = indices

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.indices.next_indices().tolist()


def _collate(items: list[Tensor]) -> Tensor:
    return torch.stack(items)


class FileImageStream:
    """A BatchStream of ``{"images": uint8 (B, 3, S, S), "indices": (B,), "augment": True}`` over image files."""

    def __init__(self, files: Sequence[str], size: int, micro_batch: int, seed: int, rank: int = 0, world: int = 1,
                 workers: int = 4, prefetch: int = 2) -> None:
        self.dataset = FileImages(files, size)
        self.indices = IndexStream(len(self.dataset), micro_batch, seed, rank, world)  # the consumed position
        self.args = (len(self.dataset), micro_batch, seed, rank, world)
        self.workers, self.prefetch = workers, prefetch
        self._batches: Iterator[Tensor] | None = None

    def _start(self) -> Iterator[Tensor]:
        ahead = IndexStream(*self.args)
        ahead.load_state_dict(self.indices.state_dict())
        loader = DataLoader(self.dataset, batch_sampler=_Batches(ahead), num_workers=self.workers,
                            collate_fn=_collate, prefetch_factor=self.prefetch if self.workers else None,
                            persistent_workers=False,
                            # its own generator: seeding the workers must not draw from the global RNG,
                            # or a resumed run's dropout and diffusion noise would differ from an uninterrupted one
                            generator=torch.Generator().manual_seed(0))
        return iter(loader)

    def next_batch(self) -> dict[str, Any]:
        if self._batches is None:
            self._batches = self._start()
        images = next(self._batches)
        indices = self.indices.next_indices()  # the same indices the loader's copy drew for this batch
        return {"images": images, "indices": indices, "augment": True}

    def state_dict(self) -> dict[str, Any]:
        return self.indices.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.indices.load_state_dict(state)
        self.close()  # prefetched batches belong to the old position: restart the workers from the new one

    def close(self) -> None:
        self._batches = None  # dropping the iterator shuts its workers down


def decode_batches(files: Sequence[str], size: int, batch: int, workers: int = 4) -> Iterator[Tensor]:
    """``files`` decoded in order, ``batch`` at a time, as uint8 ``(B, 3, size, size)`` (for FID references)."""
    if not files:
        return iter(())
    loader = DataLoader(FileImages(files, size), batch_size=batch, shuffle=False, num_workers=workers,
                        collate_fn=_collate, generator=torch.Generator().manual_seed(0))
    return iter(loader)


def fixed_subset(n: int, count: int, seed: int) -> np.ndarray:
    """``min(count, n)`` distinct indices of ``range(n)``, the same for a given seed on every machine, sorted."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count]
    return np.sort(order.numpy())
