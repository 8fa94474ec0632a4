"""The host copies that fill LAWA's and wma's window: real copies (``.cpu()`` of a CPU tensor is the tensor itself,
which made the original LAWA code store ``k`` aliases of the live weights on CPU), pinned in one block per dtype, and
from CUDA taken off the training stream (``DeviceToHost``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["snapshot_copy", "pinned_snapshot_copy", "flat_like", "pinned_like", "DeviceToHost"]


def snapshot_copy(floats: list[Tensor]) -> list[Tensor]:
    """Contiguous host copies of ``floats`` in their own dtype; always copies, even from CPU tensors."""
    return [t.detach().to("cpu", copy=True, memory_format=torch.contiguous_format) for t in floats]


def pinned_snapshot_copy(floats: list[Tensor]) -> list[Tensor]:
    """Host copies of CUDA tensors ``floats`` in pinned memory, queued on the current stream and not waited for:
    read them on the host only after synchronizing. Where pinned memory runs out, plain copies (they wait)."""
    try:
        host = pinned_like(floats)
    except RuntimeError:  # cudaHostAlloc failed: page-locked memory is limited by the OS
        return snapshot_copy(floats)
    torch._foreach_copy_(host, [t.detach() for t in floats], non_blocking=True)
    return host


def flat_like(floats: list[Tensor], device: torch.device | str = "cpu",
              pin_memory: bool = False) -> tuple[dict[torch.dtype, Tensor], list[Tensor]]:
    """One flat block per dtype on ``device``, and views of it shaped like ``floats`` (in order)."""
    sizes: dict[torch.dtype, int] = {}
    for t in floats:
        sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
    flat = {dtype: torch.empty(n, dtype=dtype, device=device, pin_memory=pin_memory) for dtype, n in sizes.items()}
    offsets = dict.fromkeys(sizes, 0)
    views = []
    for t in floats:
        start = offsets[t.dtype]
        views.append(flat[t.dtype][start:start + t.numel()].view(t.shape))
        offsets[t.dtype] = start + t.numel()
    return flat, views


def pinned_like(floats: list[Tensor]) -> list[Tensor]:
    """Empty pinned host tensors shaped like ``floats``: views into one pinned buffer per dtype. PyTorch's caching
    host allocator rounds every block up to a power of two, so a pinned tensor per weight cost about 1.5x the
    model (1.66x for GPT-2 small), k + 1 times over in LAWA's window, on every DDP rank; one block per snapshot
    rounds once."""
    return flat_like(floats, pin_memory=True)[1]


def _blocks_of(views: list[Tensor]) -> dict[torch.dtype, Tensor] | None:
    """The flat pinned block per dtype that ``views`` (made by ``pinned_like``) are views of, or None."""
    blocks: dict[torch.dtype, Tensor] = {}
    for t in views:
        base = t._base
        if base is None or blocks.setdefault(t.dtype, base) is not base:
            return None
    return blocks


class DeviceToHost:
    """Host copies of CUDA weights that keep the training stream free: on the current (training) stream only a
    device-to-device copy into one flat staging block per dtype, then, on a side stream, one copy of each block into a
    flat pinned host block (one transfer per dtype at full bus speed) and whatever the caller queues after it (LAWA's
    window sum). ``record()`` puts an event after that side work: the host waits on it before reading a copy
    (``synchronize``), the training stream before reading what the side work wrote (``wait_for_side``). Before the
    staging blocks are overwritten by the next snapshot the training stream waits, on the device, for the side work
    still reading them: no host synchronization anywhere on the way.

    The price is one copy of the weights in their dtype on the device (the staging blocks), made on first use."""

    def __init__(self) -> None:
        self._stream: Any = None
        self._staging: dict[torch.dtype, Tensor] = {}   # flat device blocks, one per dtype
        self._views: list[Tensor] = []                   # the weights' shapes within them
        self.event: Any = None                           # after the newest copy and the side work queued with it

    def copy(self, floats: list[Tensor], into: list[Tensor] | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """Queue copies of CUDA tensors ``floats``: returns the device staging views (what side work should read: the
        weights themselves change at the next step) and the host copies, pinned (in ``into``, a spare made by an
        earlier call, or fresh flat blocks; plain blocking copies where pinned memory ran out)."""
        device = floats[0].device
        training = torch.cuda.current_stream(device)
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        training.wait_stream(self._stream)  # the previous snapshot's side work still reads the staging blocks
        if len(self._views) != len(floats) or any(v.shape != t.shape or v.dtype != t.dtype
                                                  for v, t in zip(self._views, floats)):
            self._staging, self._views = flat_like(floats, device)
        torch._foreach_copy_(self._views, [t.detach() for t in floats])
        self._stream.wait_stream(training)
        with torch.cuda.stream(self._stream):
            host = into if into is not None else self._pinned(floats)
            blocks = _blocks_of(host) if host and all(t.is_pinned() for t in host) else None
            if blocks is not None and all(blocks[d].numel() == s.numel() for d, s in self._staging.items()):
                for dtype, block in blocks.items():
                    block.copy_(self._staging[dtype], non_blocking=True)
            else:  # (pinned memory ran out: blocking copies, read at once)
                torch._foreach_copy_(host, self._views, non_blocking=bool(blocks))
        return self._views, host

    @staticmethod
    def _pinned(floats: list[Tensor]) -> list[Tensor]:
        try:
            return pinned_like(floats)
        except RuntimeError:  # cudaHostAlloc failed: page-locked memory is limited by the OS
            return [torch.empty_like(t, device="cpu", memory_format=torch.contiguous_format) for t in floats]

    def side(self) -> Any:
        """A context in which queued work goes onto the side stream (after the copies queued there)."""
        return torch.cuda.stream(self._stream)

    def record(self) -> Any:
        """Record (and return) the event after everything queued on the side stream so far."""
        self.event = torch.cuda.Event()
        self.event.record(self._stream)
        return self.event

    def synchronize(self) -> None:
        """Make the host wait for the side work (skipped where the event has passed: a sync of its own)."""
        event, self.event = self.event, None
        if event is not None and not event.query():
            event.synchronize()

    def wait_for_side(self) -> None:
        """Order the training stream after the side work, on the device (the host goes on)."""
        if self._stream is not None:
            torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)


