"""What a training run's checkpoint code needs of the run: its counters (``TrainState``) and a protocol
(``Checkpointable``) that the loop's ``Run`` satisfies.

They live here, below both, so the checkpointing modules (``run_checkpoints``, ``sharded_checkpoints``) depend on
this small contract and not on the trainer that uses them (``train.Run``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from lawa_suite.averagers.base import Averager
    from lawa_suite.config import ResolvedConfig

__all__ = ["TrainState", "Checkpointable"]


@dataclass
class TrainState:
    step: int = 0            # optimizer steps taken
    skipped: int = 0         # steps skipped for non-finite loss or gradients, in total
    bad_in_a_row: int = 0    # consecutive skipped steps


class Checkpointable(Protocol):
    """The parts of a run a checkpoint saves and restores, and what saving needs to know."""

    cfg: ResolvedConfig
    out: Path
    state: TrainState
    accelerator: Accelerator
    optimizer: torch.optim.Optimizer
    stream: Any                       # the task's training stream: state_dict() / load_state_dict()
    averagers: Mapping[str, Averager]
    unwrapped: torch.nn.Module        # the model without DDP's wrapper
    is_main: bool                     # this process writes what only one process writes

    def log(self, message: str) -> None: ...
