"""Which checkpoints ``suite eval`` scores as Hugging Face causal LMs, and the settings it scores them with.

The scoring itself is a task like any other, ``hf-causal-lm`` (``tasks/causal_lm.py``), run by ``analysis.Evaluation``
on the path every task takes. What lives here is what needs more than the tasks layer: finding the newest model folder
among checkpoints (``posthoc.discover``), and turning ``key=value`` words into that task's resolved config, checked
before any work. Its names are re-exported here, where they were before the task moved.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from lawa_suite import registry
from lawa_suite.config import ResolvedConfig, resolve
from lawa_suite.errors import ConfigError
from lawa_suite.posthoc.discover import discover
from lawa_suite.posthoc.modelfolder import CONFIG_FILE, model_folders
from lawa_suite.tasks.causal_lm import NAME, CausalLMConfig, CausalLMTask, check_causal_lm

__all__ = ["CausalLMConfig", "CausalLMTask", "NAME", "causal_lm_folder", "causal_lm_config", "check_causal_lm", "KEYS"]

# the keys a user gives for scoring Hugging Face folders (the task's and the few run keys that apply)
KEYS = ("data.path", "eval.batches", "seq_len", "batch_size", "tokenizer", "mixed_precision", "data.source")


def causal_lm_folder(near: str | os.PathLike[str]) -> Path | None:
    """The model folder whose ``config.json`` describes the checkpoints at ``near`` (itself when it is a model
    folder; else the newest of the Hugging Face model folders it holds), checked to be a causal LM; None when
    ``near`` holds no model folders. A model folder of another kind is a one-line AnalysisError naming it."""
    near = Path(near)
    if (near / CONFIG_FILE).is_file():
        folder = near
    else:
        found = discover(near, allow_torch_load=True)  # only lists files: nothing is loaded here
        folders = model_folders(found.snapshots) if found.snapshots else None
        if folders is None:
            return None
        folder = folders.folders[max(folders.folders)]
    check_causal_lm(folder)
    return folder


def causal_lm_config(folder: Path, pairs: Mapping[str, str]) -> ResolvedConfig:
    """The ``hf-causal-lm`` task's config for the model folder ``folder`` from ``key=value`` pairs, checked before any
    work: known keys and values, the text present, the tokenizer at hand, ``seq_len`` resolved against the model's
    maximum positions (``CausalLMTask.settle``)."""
    unknown = sorted(k for k in pairs if k not in KEYS)
    if unknown:
        raise ConfigError(f"{unknown[0]}: not a key for scoring Hugging Face causal-LM folders; known: "
                          f"{', '.join(KEYS[:-1])} (or task=<name> to score with a suite task)")
    # the folder goes in typed (as a saved config would): a path is never read as YAML
    cfg = resolve(dict(pairs), base={"task": NAME, f"{NAME}.model": str(folder), "progress": False})
    registry.tasks.get(NAME)(cfg.task, cfg.run).settle()  # settles cfg.task.seq_len in place
    return cfg
