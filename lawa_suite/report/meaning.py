"""What a saved run means, read from its folder alone: the report imports no task, no trainer and no config code.

A run's ``config.yaml`` is fully resolved when the run starts, so it says everything the run computed, except keys
the suite gained later: ``ADDED_KEYS`` gives each the value that reproduces what a run made before it did (the
default it was added with), so runs made by two versions of the suite compare as one experiment. The metric
directions of the built-in tasks' evaluators are here too (``METRICS``; ``tests/test_report_imports.py`` holds them
equal to the evaluators'); a plugin's metrics fall back on their order in the records and a guess from the name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["ADDED_KEYS", "METRICS", "NOTES", "with_added_keys"]

# dotted key -> (the task whose runs have it, None for every run; the value a run made before the key existed
# computed with; when the key was added)
ADDED_KEYS: dict[str, tuple[str | None, Any, str]] = {
    "distributed": (None, "ddp", "2026-12-02"),
    "cifar.model": ("cifar", "preact_resnet18", "2026-12-02"),
    "cifar.patch_size": ("cifar", 0, "2026-12-02"),
    "compile": (None, False, "2026-12-05"),
    "tf32": (None, True, "2026-12-07"),
    "deterministic": (None, False, "2026-12-07"),
    "schedulefree.r": (None, 0.0, "2026-12-07"),              # used only by optimizer=schedulefree, added with it
    "schedulefree.weight_lr_power": (None, 2.0, "2026-12-07"),
    "gpt2.optimizer": ("gpt2", "adamw", "2026-12-07"),
    "ddpm.optimizer": ("ddpm", "adamw", "2026-12-07"),
}

# task -> its evaluator's metrics, "max" or "min" each; the first is the headline
METRICS: dict[str, dict[str, str]] = {
    "cifar": {"accuracy": "max", "loss": "min"},
    "gpt2": {"loss": "min", "perplexity": "min"},
    "ddpm": {"fid": "min", "fid_standin": "min", "loss": "min"},
}

# metric -> the sentence a report prints beside a metric whose name alone could mislead
NOTES: dict[str, str] = {
    "fid_standin": "Fréchet distance in the features of lawa-suite's offline stand-in network, not Inception's: it "
                   "ranks sample sets but is not comparable with published FIDs (the Inception weights, or "
                   "fid.extractor=inception-v3-compat, give the standard FID)",
}


def with_added_keys(task: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """A saved config's dotted keys, with every ``ADDED_KEYS`` entry of its task it lacks at the value it had."""
    added = {key: value for key, (of, value, _) in ADDED_KEYS.items() if of in (None, task)}
    return {**added, **config}
