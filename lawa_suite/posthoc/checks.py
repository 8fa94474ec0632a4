"""Checks before any arithmetic: every input's layout against the others, and every float value (NaN/Inf): in full
(``nonfinite_keys``) or slice by slice just ahead of the averaging, by each slice's sum (``CheckAhead``).

Shapes must be equal, not merely broadcastable: averaging ``[1]`` with ``[16]`` would run and be wrong. The
layout reference is what most checkpoints share, so the message blames the outliers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lawa_suite.posthoc.discover import split_name, step_of
from lawa_suite.posthoc.limits import Limits
from lawa_suite.posthoc.reader import CODES, Reader

__all__ = ["values_finite", "slice_finite", "CheckAhead", "check_layouts", "nonfinite_keys", "nonfinite_problem",
           "most_common", "problem_list"]


# Non-finite bit patterns of the float formats numpy lacks: (unsigned view, mask, masked value of NaN/Inf).
_NONFINITE_BITS = {torch.bfloat16: (np.uint16, 0x7F80, 0x7F80),       # exponent all ones
                   torch.float8_e5m2: (np.uint8, 0x7C, 0x7C),          # exponent all ones
                   torch.float8_e4m3fn: (np.uint8, 0x7F, 0x7F)}        # no Inf; NaN is S.1111.111


def values_finite(flat: Tensor, check_bytes: int) -> bool:
    """True if the flat float tensor ``flat`` holds no NaN/Inf, checked in pieces of ``check_bytes``.

    numpy, not torch: the checks run in worker threads, where every torch op would start an OpenMP team that
    then competes with the averaging for the cores; numpy releases the GIL and starts no threads.
    """
    step = max(1, check_bytes // flat.element_size())
    return all(_piece_finite(flat[start:start + step]) for start in range(0, flat.numel(), step))


def slice_finite(piece: Tensor) -> bool:
    """True if the flat float tensor ``piece`` holds no NaN/Inf, decided by its sum where it can be: a sum of
    finite values is finite unless it overflows, and NaN or Inf in any term makes the sum NaN or Inf, so a finite
    sum settles it in one read with no mask; a sum that is not finite falls back to the exact check (it may be an
    overflow). float16 sums in float32 (no overflow short of 2**24 terms of 65504); bfloat16 and float8, which
    numpy lacks, take the exact check of their bits. numpy: safe on any thread (no GIL held, no OpenMP team)."""
    if piece.dtype in (torch.float32, torch.float64, torch.float16):
        with np.errstate(over="ignore", invalid="ignore"):
            total = np.add.reduce(piece.numpy(), dtype=np.float32 if piece.dtype == torch.float16 else None)
        if np.isfinite(total):
            return True
    return _piece_finite(piece)


class CheckAhead:
    """Checks every float slice of every input (``slice_finite``) on a thread of its own, at most ``depth`` slices
    ahead of the averaging, which waits for each verdict before any averager sees the slice: the check overlaps
    the arithmetic, and the pages it reads are still in cache when the averagers read them. ``slices`` are
    ``(tensor name, start, stop)`` in the order the averaging goes."""

    def __init__(self, readers: Sequence[Reader], slices: Sequence[tuple[str, int, int]], depth: int = 4) -> None:
        self._readers, self._slices, self._depth = readers, slices, depth
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="posthoc-check")
        self._futures: dict[int, Future[str | None]] = {}
        self._submitted = 0
        self._flats: tuple[str, list[Tensor]] = ("", [])  # the tensor the worker is in, as views of every input

    def verdict(self, i: int) -> str | None:
        """Wait for slice ``i``: the label of the first input whose slice holds NaN or Inf, or None."""
        while self._submitted < min(len(self._slices), i + 1 + self._depth):
            self._futures[self._submitted] = self._pool.submit(self._check, self._submitted)
            self._submitted += 1
        return self._futures.pop(i).result()

    def _check(self, i: int) -> str | None:
        name, start, stop = self._slices[i]
        if self._flats[0] != name:
            self._flats = (name, [r.flat(name) for r in self._readers])
        return next((r.snapshot.label for r, flat in zip(self._readers, self._flats[1])
                     if not slice_finite(flat[start:stop])), None)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _piece_finite(piece: Tensor) -> bool:
    if piece.dtype in (torch.float16, torch.float32, torch.float64):
        return bool(np.isfinite(piece.numpy()).all())
    unsigned, mask, value = _NONFINITE_BITS[piece.dtype]
    bits = piece.contiguous().view(torch.uint8).numpy().view(unsigned)
    return not bool(np.any((bits & mask) == value))


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def most_common(values: list[Any]) -> Any:
    """The most frequent value; ties go to the earliest (the lowest step): deterministic and blames outliers."""
    counts = Counter(values)
    best = max(counts.values())
    return next(v for v in values if counts[v] == best)


def check_layouts(readers: Sequence[Reader]) -> list[str]:
    """Missing/extra keys and shape/dtype mismatches, against the layout most checkpoints share.

    Shapes must be equal, not merely broadcastable: averaging ``[1]`` with ``[16]`` would run and be wrong.
    """
    problems: list[str] = []
    usable = [r for r in readers if r.layout]
    if not usable:
        return problems
    key_sets = [frozenset(r.layout) for r in usable]
    reference = most_common(key_sets)
    for r, keys in zip(usable, key_sets):
        missing, extra = sorted(reference - keys), sorted(keys - reference)
        if missing:
            problems.append(f"{r.snapshot.label}: missing keys {', '.join(missing)}")
        if extra:
            problems.append(f"{r.snapshot.label}: extra keys {', '.join(extra)}")
    for name in sorted(reference):
        specs = [(r, r.layout[name]) for r in usable if name in r.layout]
        ref_dtype = most_common([s[0] for _, s in specs])
        ref_shape = most_common([s[1] for _, s in specs])
        for r, (dtype, shape) in specs:
            if shape != ref_shape:
                problems.append(f"{r.snapshot.label}: key {name} has shape {_fmt_shape(shape)}, the others "
                                f"{_fmt_shape(ref_shape)}")
            if dtype != ref_dtype:
                problems.append(f"{r.snapshot.label}: key {name} has dtype {CODES[dtype]}, the others "
                                f"{CODES[ref_dtype]}")
    return problems


def nonfinite_keys(reader: Reader, names: Sequence[str], check_bytes: int = Limits.check_bytes) -> list[str]:
    """The float keys among ``names`` whose tensor in ``reader`` holds NaN or Inf, sorted. Reads, computes nothing."""
    layout = reader.layout
    return sorted(n for n in names if n in layout and layout[n][0].is_floating_point
                  and not values_finite(reader.flat(n), check_bytes))


def nonfinite_problem(reader: Reader, names: Sequence[str], check_bytes: int = Limits.check_bytes) -> str | None:
    """The problem line naming every float key of ``reader`` that holds NaN or Inf, or None."""
    bad = nonfinite_keys(reader, names, check_bytes)
    return f"{reader.snapshot.label}: NaN or Inf in {', '.join(bad)}" if bad else None


def problem_list(problems: Sequence[str], what: str) -> str:
    """"N problems with ``what``:" and one problem a line (one problem: one line). The files' problems come first,
    in step order (a step-10 file after step-2), then the others; one cause shared by several files is one line
    naming them all (``step-1.pt, step-2.pt: a pickle-based file``)."""
    def step(problem: str) -> float:
        label = problem.partition(": ")[0].partition("/")[0].partition(" -> ")[0]
        found = step_of(split_name(label)[0])
        return float("inf") if found is None else found

    ordered = sorted(dict.fromkeys(problems), key=step)  # stable: the others keep their order
    files: dict[str, list[str]] = {}
    for problem in ordered:
        if step(problem) != float("inf"):
            label, _, cause = problem.partition(": ")
            files.setdefault(cause, []).append(label)
    lines, said = [], set()
    for problem in ordered:
        label, _, cause = problem.partition(": ")
        if step(problem) == float("inf"):
            lines.append(problem)
        elif cause not in said:
            said.add(cause)
            labels = files[cause]
            named = ", ".join(labels[:6]) + (f" and {len(labels) - 6} more" if len(labels) > 6 else "")
            lines.append(f"{named}: {cause}")
    if len(lines) == 1:
        return f"1 problem with {what}: {lines[0]}"
    return f"{len(lines)} problems with {what}:" + "".join(f"\n  {line}" for line in lines)
