"""The one pass: tensor by tensor, slice by slice, every saved checkpoint in step order through every track.

An ``elementwise`` averager (each element of its average depends only on the same element of the observations)
sees each large tensor in slices of at most ``Limits.block_elements``, one fresh averager per slice, so memory
stays at a few slices however large the model; every checkpoint is read once for all averagers and grid points
together, and the slices stay in cache while all of them work. Other averagers see whole tensors. A windowed
averager re-reads a member leaving its window from the mapped input (``Averager.replay_from``) instead of
keeping copies, and so runs the very update sequence of its online class. Slices are independent, so
``Limits.average_threads`` batches of them (``Limits.batch_slices`` consecutive slices, of one tensor or of several
small ones) are averaged at once, each on a thread with one torch thread, and their outputs written in order (the
bytes depend neither on the thread count nor on the batch size).

NaN/Inf are found without a pass of their own over the inputs. An input some output averages shows them in that
output: each output slice is checked (by its sum) before it is written, and one that is not finite is traced to
the input slice behind it, or written if none (finite values whose average overflowed). Every other input (all of
them, where an averager does not document a weighted-sum profile or outputs outnumber inputs) has each float slice
checked on a thread of its own, a few slices ahead of the averaging, which waits for the verdict before any
averager sees the slice. The first NaN or Inf stops the pass (``NonFiniteInput``); the caller then finds every input
holding any and runs the pass again with them left out: refused by every track (``Track.feed``), checked by
nothing, their slices never read.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lawa_suite.files import fsync_dir, fsync_file
from lawa_suite.averagers.base import Averager
from lawa_suite.posthoc.checks import CheckAhead, slice_finite, values_finite
from lawa_suite.posthoc.limits import Limits
from lawa_suite.posthoc.modelfolder import ModelFolders, copy_carried
from lawa_suite.posthoc.plan import Output, Track
from lawa_suite.posthoc.reader import Reader
from lawa_suite.posthoc.writer import DIRECT_ALIGN, OutputFile, Writer, in_memory, safetensors_header
from lawa_suite.threads import torch_threads

__all__ = ["DERIVED_FORMAT", "NonFiniteInput", "average_all", "write_outputs", "Order"]

DERIVED_FORMAT = "lawa-suite-derived/1"
Order = list[tuple[str, torch.dtype, tuple[int, ...]]]


class NonFiniteInput(Exception):
    """A slice of an input holds NaN or Inf (``label``: the input, ``name``: the tensor); nothing averaged it."""

    def __init__(self, label: str, name: str) -> None:
        super().__init__(f"{label}: NaN or Inf in {name}")


def average_all(readers: list[Reader], tracks: list[Track], order: Order, staging: Path,
                limits: Limits, folders: ModelFolders | None = None,
                done_reading: Callable[[], None] | None = None) -> list[Output]:
    """Compute and write every output of every track into ``staging``; returns the outputs with their hashes.
    ``done_reading`` is called once the inputs are no longer read (before the outputs are synced)."""
    outputs = [o for t in tracks for outs in t.outputs.values() for o in outs]
    return write_outputs(outputs, order, staging, limits,
                         lambda files: _stream_tensors(readers, tracks, order, outputs, files, limits), folders,
                         done_reading)


def write_outputs(outputs: list[Output], order: Order, staging: Path, limits: Limits,
                  stream: Callable[[dict[int, OutputFile]], None], folders: ModelFolders | None = None,
                  done_reading: Callable[[], None] | None = None) -> list[Output]:
    """Open a file per output in ``staging``, let ``stream`` write their tensors in ``order`` (one torch thread),
    then finish them (fsync, sha256). On any error every file is closed and the error goes on. With ``folders``
    (the inputs are model folders) each output is a model folder of the same kind (``modelfolder.py``).
    ``done_reading`` is called once every byte is written (the queued ones may be views of the inputs)."""
    outputs.sort(key=lambda o: (o.job.folder, o.step))
    files: dict[int, OutputFile] = {}
    # the sha256 and the writes of the outputs on a thread each (each in order): one thread doing both was the slowest
    # stage of the pass. Up to 8 batches of slices queued (32 MiB an output at the default sizes): room to fall
    # behind while other processes run
    hasher, writer = Writer(depth=8), Writer(depth=8)
    try:
        _open_outputs(outputs, order, staging, files, writer, hasher, limits, folders)
        # torch on one thread while the pass runs: its ops work on cache-sized slices, where an OpenMP team per op
        # costs more than it gains, and far more when other processes share the cores (each op then waits for a
        # descheduled team member, benchmarks/posthoc.py); the pass gets its parallelism from its own threads
        with torch_threads(1):
            stream(files)
        hasher.close()
        writer.close()
        if done_reading is not None:
            done_reading()
    except BaseException:
        for thread in (hasher, writer):
            try:
                thread.close()
            except BaseException:  # noqa: BLE001 - the first error is the one to report
                pass
        for f in files.values():
            f.close_now()
        raise
    for o in outputs:
        f = files[id(o)]
        o.sha256, o.size = f.finish(), f.size
        if folders is not None:  # the describing files of the newest input it averages
            o.notes["carried"] = copy_carried(folders.folders[o.members[-1]], o.path.parent)
            for name in o.notes["carried"]:
                fsync_file(o.path.parent / name)
            fsync_dir(o.path.parent)
    return outputs


def block_elements(tracks: int, limits: Limits) -> int:
    """Slice size for elementwise averagers: ``block_elements``, smaller when many averagers share the budget."""
    per_track = limits.block_budget // max(1, tracks) // (4 * 4)  # ~4 fp32 slices live per averager at a time
    return max(4096, min(limits.block_elements, per_track // 4096 * 4096))


def _open_outputs(outputs: list[Output], order: Order, staging: Path, files: dict[int, OutputFile], writer: Writer,
                  hasher: Writer, limits: Limits, folders: ModelFolders | None) -> None:
    data_size = sum(math.prod(s) * d.itemsize for _, d, s in order)
    buffer_bytes = max(16 * DIRECT_ALIGN, min(limits.direct_buffer, limits.block_budget // max(1, len(outputs))))
    buffer_bytes -= buffer_bytes % DIRECT_ALIGN
    direct = not in_memory(staging)  # every output is in staging: one file system
    for o in outputs:
        (staging / o.job.folder).mkdir(exist_ok=True)
        metadata = {"format": DERIVED_FORMAT, "step": str(o.step), "averager": o.job.name,
                    "config": json.dumps(o.job.config, sort_keys=True), "inputs": ",".join(map(str, o.members))}
        if folders is None:
            o.path = staging / o.job.folder / f"step-{o.step:08d}.safetensors"
        else:  # transformers refuses a safetensors file whose metadata format is not "pt": ours moves aside
            o.path = folders.output_path(staging / o.job.folder, o.step)
            o.path.parent.mkdir()
            metadata = {**metadata, "format": "pt", "lawa_suite_format": DERIVED_FORMAT}
        files[id(o)] = OutputFile(o.path, safetensors_header(order, metadata), data_size, writer, buffer_bytes,
                                  hasher, direct)


def _stream_tensors(readers: list[Reader], tracks: list[Track], order: Order, outputs: list[Output],
                    files: dict[int, OutputFile], limits: Limits) -> None:
    index_of = {r.snapshot.step: i for i, r in enumerate(readers)}
    many = len(files) > limits.max_open_outputs
    if many:
        for f in files.values():
            f.release()
    elementwise = [t for t in tracks if t.cls.elementwise]
    whole = [t for t in tracks if not t.cls.elementwise]
    block = block_elements(len(elementwise), limits)
    revealed = _revealed_by_outputs(readers, tracks, outputs)
    left_out = frozenset().union(*(t.refused for t in tracks))  # never observed: nothing to check them for
    # for the outputs' check ("" for an input left out, which no output averages)
    labels = ["" if i in left_out else r.snapshot.label for i, r in enumerate(readers)] if revealed else []
    ahead = [r for i, r in enumerate(readers) if i not in revealed and i not in left_out]  # checked themselves
    checks = CheckAhead(ahead, [(name, start, start + block) for name, dtype, shape in order if dtype.is_floating_point
                                for start in range(0, max(1, math.prod(shape)), block)]) if ahead else None
    checked = 0
    slices = _InOrder(limits.average_threads, files)
    # consecutive slices (of one tensor or of several small ones) go to a thread together: a hand-over between
    # threads costs tens of microseconds of wake-ups, more when other processes share the cores
    batch: list[tuple[list[Tensor], str]] = []
    batched = 0

    def flush() -> None:
        nonlocal batch, batched
        slices.submit(_replay_batch, elementwise, batch, labels)
        batch, batched = [], 0

    try:
        with torch.no_grad():
            for name, dtype, shape in order:
                numel = math.prod(shape)
                flats = [r.flat(name) for r in readers]
                if not dtype.is_floating_point:  # never averaged: the newest observation the averager accepted
                    flush()
                    slices.drain()
                    for o in outputs:
                        files[id(o)].write(flats[index_of[o.members[-1]]])
                    continue
                for start in range(0, max(1, numel), block):
                    if checks is not None and (bad := checks.verdict(checked)) is not None:
                        raise NonFiniteInput(bad, name)
                    checked += 1
                    if elementwise:
                        batch.append(([f[start:start + block] for f in flats], name))
                        batched += min(block, numel - start)
                        if batched >= limits.batch_slices * block:
                            flush()
                if whole or many:
                    flush()
                if whole:  # an averager without the elementwise promise sees every tensor whole, in its shape
                    slices.drain()
                    slices.write(_replay(whole, [f.view(shape) for f in flats], name, labels))  # on this thread
                if many:
                    slices.drain()
                    for f in files.values():
                        f.release()
            flush()
            slices.drain()
    finally:
        slices.close()
        if checks is not None:
            checks.close()


class _InOrder:
    """Slice replays on ``threads`` threads of their own (torch's ops release the GIL; each runs one torch thread),
    at most ``2 * threads`` at a time; their outputs go to the files in submission order, so every file gets its
    bytes in order. One thread: each replay runs on the calling thread."""

    def __init__(self, threads: int, files: dict[int, OutputFile]) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="posthoc-average") if threads > 1 else None
        self._pending: deque[Future[list[tuple[Output, Tensor]]]] = deque()
        self._limit, self._files = 2 * threads, files

    def submit(self, replay: Callable[..., list[tuple[Output, Tensor]]], tracks: list[Track],
               batch: list[tuple[list[Tensor], str]], *args: Any) -> None:
        if not tracks or not batch:
            return
        args = (tracks, batch, *args)
        if self._pool is None:
            self.write(replay(*args))
            return
        self._pending.append(self._pool.submit(replay, *args))
        while len(self._pending) > self._limit:
            self.write(self._pending.popleft().result())

    def drain(self) -> None:
        while self._pending:
            self.write(self._pending.popleft().result())

    def write(self, results: list[tuple[Output, Tensor]]) -> None:
        """Each output's slices of ``results``, in order, as one piece of work for the writing threads."""
        per_output: dict[int, list[Tensor]] = {}
        for o, t in results:
            per_output.setdefault(id(o), []).append(t)
        for key, tensors in per_output.items():
            self._files[key].write(*tensors)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _revealed_by_outputs(readers: list[Reader], tracks: list[Track], outputs: list[Output]) -> set[int]:
    """The inputs whose NaN/Inf the outputs' own values reveal, so checking the outputs checks them: those an output
    averages (its ``members``: its window, or every observation its averager accepted), when every averager is
    elementwise and documents its profile (a weighted sum of observations, held to it by the contract tests): a
    NaN or Inf that enters a sum, a difference, a lerp or a product with a finite factor, even 0, leaves NaN or Inf
    in the result. Empty (check every input itself) for other averagers, and when there are at least as many
    outputs as inputs (checking the outputs would read more)."""
    linear = all(t.cls.elementwise and t.cls.documented_profile.__func__ is not Averager.documented_profile.__func__
                 for t in tracks)
    if not linear or len(outputs) >= len(readers):
        return set()
    averaged = {step for o in outputs for step in o.members}
    return {i for i, r in enumerate(readers) if r.snapshot.step in averaged}


def _replay_batch(tracks: list[Track], batch: list[tuple[list[Tensor], str]],
                  labels: list[str]) -> list[tuple[Output, Tensor]]:
    """``_replay`` of each ``(pieces, name)`` of ``batch`` in turn, their outputs in that order."""
    return [due for pieces, name in batch for due in _replay(tracks, pieces, name, labels)]


def _replay(tracks: list[Track], pieces: list[Tensor], name: str, labels: list[str]) -> list[tuple[Output, Tensor]]:
    """Feed ``pieces`` (one slice of tensor ``name`` per snapshot, in step order) to a fresh averager per track;
    returns each track's outputs as they came due, with their slice. With ``labels`` (the inputs' names) each output
    slice is checked for NaN/Inf (``_revealed_by_outputs``); one that has any is traced to the input slice that holds
    it (``NonFiniteInput``), or kept if none does (finite values whose average overflowed)."""
    averagers = [track.new(_read_again(pieces, track)) for track in tracks]
    due = []
    with torch.no_grad():  # per thread: the caller's does not reach a worker
        for i, piece in enumerate(pieces):
            for track, averager in zip(tracks, averagers):
                track.feed(averager, i, {name: piece})
                for o in track.outputs.get(i, ()):
                    averaged = averager.average()[name]
                    if labels and not slice_finite(averaged.reshape(-1)) and (bad := _nonfinite(pieces, labels)):
                        raise NonFiniteInput(bad, name)
                    due.append((o, averaged))
    return due


def _nonfinite(pieces: list[Tensor], labels: list[str]) -> str | None:
    """The label of the first input whose piece holds NaN or Inf (the exact check), or None. Inputs left out (their
    label is "") are not looked at: no output averages them."""
    return next((label for label, p in zip(labels, pieces)
                 if label and not values_finite(p.reshape(-1), Limits.check_bytes)), None)


def _read_again(pieces: list[Tensor], track: Track) -> Callable[[int], list[Tensor]]:
    """What ``replay_from`` gets: the piece observed at a clock, read again from the mapped input."""
    index = {clock: i for i, clock in enumerate(track.clocks)}
    return lambda clock: [pieces[index[clock]]]
