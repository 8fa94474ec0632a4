"""Checks before any arithmetic: every input's layout against the others, and every float value (NaN/Inf): in full
(``nonfinite_keys``) or, where the averaging reads a slice anyway, by its sum (``slice_finite``).

Shapes must be equal, not merely broadcastable: averaging ``[1]`` with ``[16]`` would run and be wrong. The
layout reference is what most checkpoints share, so the message blames the outliers.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lawa_suite.posthoc.discover import split_name, step_of
from lawa_suite.posthoc.limits import Limits
from lawa_suite.posthoc.reader import CODES, Reader

__all__ = ["values_finite", "slice_finite", "check_layouts", "nonfinite_keys", "nonfinite_problem", "most_common",
           "problem_list"]


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
    overflow). Half-precision pieces sum in float32 (no overflow short of 2**24 terms of 65504); float8 pieces take
    the exact check. For the calling thread (torch's own threads), where the slice is about to be averaged."""
    if piece.dtype in (torch.float32, torch.float64):
        total = piece.sum()
    elif piece.dtype in (torch.float16, torch.bfloat16):
        total = piece.sum(dtype=torch.float32)
    else:
        return _piece_finite(piece)
    return math.isfinite(total.item()) or _piece_finite(piece)


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
