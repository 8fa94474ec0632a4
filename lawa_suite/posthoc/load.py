"""Whole checkpoints into memory, checked (readable, consistent shards, finite): what scoring and analysis
read (``suite eval``, ``suite analyze lmc``), as opposed to the streamed averaging."""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor

from lawa_suite.errors import PosthocError
from lawa_suite.posthoc.checks import nonfinite_problem
from lawa_suite.posthoc.discover import Snapshot, snapshot_of_path
from lawa_suite.posthoc.reader import Reader

__all__ = ["read_checkpoint", "load_snapshot"]


def read_checkpoint(path: str | os.PathLike[str], allow_torch_load: bool = False) -> dict[str, Tensor]:
    """Every tensor of one checkpoint (a safetensors file, a ``.pt`` file with the flag, or a folder holding
    ``model.safetensors`` or its shards), checked and copied into memory."""
    snapshot, problems = snapshot_of_path(Path(path), allow_torch_load)
    if problems or snapshot is None:
        raise PosthocError("; ".join(problems))
    return load_snapshot(snapshot)


def load_snapshot(snapshot: Snapshot) -> dict[str, Tensor]:
    """Every tensor of ``snapshot``, checked (readable, consistent shards, finite) and copied into memory."""
    reader = Reader(snapshot)
    try:
        bad = nonfinite_problem(reader, sorted(reader.layout))
        problems = reader.problems + ([bad] if bad else [])
        if problems:
            raise PosthocError("; ".join(problems))
        return {name: reader.tensor(name).clone() for name in sorted(reader.layout)}
    finally:
        reader.close()
