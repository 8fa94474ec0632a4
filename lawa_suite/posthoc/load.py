"""Whole checkpoints into memory, checked (readable, consistent shards, finite): what scoring and analysis
read (``suite eval``, ``suite analyze lmc``), as opposed to the streamed averaging."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from lawa_suite.errors import PosthocError
from lawa_suite.posthoc.checks import nonfinite_problem, problem_list
from lawa_suite.posthoc.discover import Snapshot, snapshot_of_path
from lawa_suite.posthoc.peers import WeightsAt
from lawa_suite.posthoc.reader import Reader, describe_found

__all__ = ["read_checkpoint", "load_snapshot"]


def read_checkpoint(path: str | os.PathLike[str], allow_torch_load: bool = False, at: WeightsAt = WeightsAt(),
                    log: Callable[[str], None] = lambda message: None) -> dict[str, Tensor]:
    """Every tensor of one checkpoint (a safetensors file, a torch file with the flag, or a folder holding
    ``model.safetensors`` or its shards), checked and copied into memory."""
    snapshot, problems = snapshot_of_path(Path(path), allow_torch_load)
    if problems or snapshot is None:
        raise PosthocError(_problems(path, problems))
    return load_snapshot(snapshot, at, log)


def load_snapshot(snapshot: Snapshot, at: WeightsAt = WeightsAt(),
                  log: Callable[[str], None] = lambda message: None) -> dict[str, Tensor]:
    """Every tensor of ``snapshot``, checked (readable, consistent shards, finite) and copied into memory; ``at``
    and ``log`` as for ``average``."""
    reader = Reader(snapshot, at)
    try:
        bad = nonfinite_problem(reader, sorted(reader.layout))
        problems = reader.problems + ([bad] if bad else [])
        if problems:
            raise PosthocError(_problems(snapshot.label, problems))
        for line in describe_found([reader]):
            log(line)
        return {name: reader.tensor(name).clone() for name in sorted(reader.layout)}
    finally:
        reader.close()


def _problems(what: str | os.PathLike[str], problems: list[str]) -> str:
    return problems[0] if len(problems) == 1 else problem_list(problems, str(what))
