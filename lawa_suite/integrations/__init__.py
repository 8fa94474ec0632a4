"""The suite's averagers inside training loops users already have.

- ``AveragingCallback`` (``integrations/trainer.py``): a ``transformers.TrainerCallback`` that feeds averagers after
  every optimizer step and scores them on the Trainer's evaluation set next to the raw weights.
- ``averaged_weights`` (``integrations/loops.py``): ``with averaged_weights(model, averager[, batches]):`` puts an
  averager's weights into a model for the block (BatchNorm recalibrated on the batches) and the raw ones back.

Both load on first use: ``import lawa_suite.integrations`` imports neither torch nor transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["AveragingCallback", "averaged_weights", "build_averagers"]

_LAZY = {
    "AveragingCallback": "lawa_suite.integrations.trainer",
    "build_averagers": "lawa_suite.integrations.trainer",
    "averaged_weights": "lawa_suite.integrations.loops",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lawa_suite.integrations' has no attribute {name!r}")
