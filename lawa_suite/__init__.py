"""lawa-suite: measure whether averaging weights along a training run (LAWA, EMA, SWA, yours) helps.

Public API::

    from lawa_suite import registry
    avg = registry.averagers.create("lawa", k=5, nu=1000)
    avg.observe(step, model)        # after each optimizer step
    avg.average()                   # dict of averaged tensors, or None before ready

Heavy modules (torch) load on first use, so importing the package (and ``suite --help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from lawa_suite import registry

__version__ = "0.1.0"
__all__ = ["registry", "resolve", "train", "Averager", "Task", "Evaluator", "ConfigError", "__version__"]

_LAZY = {
    "resolve": ("lawa_suite.config", "resolve"),
    "ConfigError": ("lawa_suite.config", "ConfigError"),
    "train": ("lawa_suite.training.loop", "train"),
    "Averager": ("lawa_suite.averagers.base", "Averager"),
    "Task": ("lawa_suite.tasks.base", "Task"),
    "Evaluator": ("lawa_suite.evaluators.base", "Evaluator"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'lawa_suite' has no attribute {name!r}")
