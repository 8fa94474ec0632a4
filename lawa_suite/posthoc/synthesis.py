"""Reconstruction from stored averages: outputs that are linear combinations of averages an averager kept during
training (EDM2's power-EMA snapshots, ``averages/<name>/`` in a run folder), with coefficients its class plans
(``Averager.plan_synthesis``: for phema, EDM2's least squares over the stored profiles). This module names no
averager: it plans through the class, then streams every tensor in slices, each output accumulated in float32
(float64 for float64 inputs) from the inputs it uses, as the replay does for trajectory averagers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from lawa_suite.averagers.base import accumulation_dtype
from lawa_suite.posthoc.jobs import Job
from lawa_suite.posthoc.limits import Limits
from lawa_suite.posthoc.plan import Output, derived_steps
from lawa_suite.posthoc.reader import Reader
from lawa_suite.posthoc.replay import Order, write_outputs
from lawa_suite.posthoc.writer import OutputFile

__all__ = ["plan_syntheses", "synthesize_all"]


def plan_syntheses(jobs: Sequence[Job], readers: Sequence[Reader],
                   interval: int | None) -> tuple[list[Output], list[str]]:
    """Every job's outputs (at the stored steps ``interval`` asks for, else the newest) and the problems."""
    steps = sorted({r.snapshot.step for r in readers})
    targets, problems = derived_steps(steps, interval) if interval else ([steps[-1]], [])
    outputs: list[Output] = []
    for job in jobs:
        mine = [i for i, r in enumerate(readers) if r.metadata.get("format") == job.cls.stored_format]
        plans, job_problems = job.cls.plan_synthesis(job.cls.Config(**job.config), [readers[i].metadata for i in mine],
                                                     targets)
        problems += [f"{job.folder}: {p}" for p in job_problems]
        for p in plans:
            used = [mine[j] for j, c in enumerate(p.coefficients) if c != 0.0]
            weight = dict(zip(mine, p.coefficients))
            coefficients = {readers[i].snapshot.label: weight[i] for i in used}
            outputs.append(Output(job, p.step, max(used), sorted({readers[i].snapshot.step for i in used}),
                                  notes={**p.notes, "coefficients": coefficients}))
    return outputs, problems


def synthesize_all(readers: list[Reader], outputs: list[Output], order: Order, staging: Path,
                   limits: Limits) -> list[Output]:
    """Write every output: ``sum_i c_i * input_i`` per float tensor, slice by slice; other tensors from the newest
    input it uses."""
    labels = [r.snapshot.label for r in readers]

    def stream(files: dict[int, OutputFile]) -> None:
        terms = [[(i, o.notes["coefficients"][label]) for i, label in enumerate(labels)
                  if label in o.notes["coefficients"]] for o in outputs]
        many = len(files) > limits.max_open_outputs
        with torch.no_grad():
            for name, dtype, shape in order:
                flats = [r.flat(name) for r in readers]
                for o, used in zip(outputs, terms):
                    if not dtype.is_floating_point:
                        files[id(o)].write(flats[max(i for i, _ in used)])
                        continue
                    for start in range(0, max(1, math.prod(shape)), limits.block_elements):
                        files[id(o)].write(_combine(flats, used, start, limits.block_elements).to(dtype))
                if many:
                    for f in files.values():
                        f.release()

    return write_outputs(outputs, order, staging, limits, stream)


def _combine(flats: list[Tensor], used: list[tuple[int, float]], start: int, size: int) -> Tensor:
    first = flats[used[0][0]][start:start + size]
    total = torch.zeros(first.shape, dtype=accumulation_dtype(first.dtype))
    for i, c in used:
        total.add_(flats[i][start:start + size].to(total.dtype), alpha=c)
    return total
