"""Pick one set of weights out of a run (raw or averaged, from a checkpoint or a saved snapshot) and hand
it to the task, which writes it in its domain's standard format (``Task.export``).

Where the weights come from:

- a run folder: its newest valid checkpoint;
- a checkpoint folder (``checkpoints/step-NNNNNNNN``): the raw weights, or with ``weights=<averager>`` that
  averager's average, rebuilt from the state the checkpoint holds;
- a ``.safetensors`` file (a ``trajectory/`` snapshot, a post-hoc derived checkpoint): the weights in it.

The task and its settings come from the ``config.yaml`` of the run the path lies in (or ``config=``).

``out`` is never an input, nor a folder holding one (``rundir.claim_out``). The export marks the folder it writes
with ``suite-output.json`` (``files.mark_output``: the command, the source, the weights): that mark is how a later
``--force`` knows the folder is an earlier export, the only kind of folder it replaces. Its files get the modes a plain
``open()`` gives (``files.plain_modes``): safetensors writes its files 0600.

A model of the suite's own (the image task's PreAct-ResNet-18) is exported as a folder that ``module_folders.py``
writes and reads; ``load_model`` is re-exported here, where exported folders' READMEs name it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from torch import Tensor

from lawa_suite import checkpoints as ckpt
from lawa_suite import registry
from lawa_suite.config import ResolvedConfig
from lawa_suite.rundir import claim_out, find_run_config, load_resolved
from lawa_suite.errors import CheckpointError, ConfigError
from lawa_suite.files import commit_folder, mark_output, plain_modes, staged_folder
from lawa_suite.module_folders import MODULE_FORMAT, load_model, write_module_folder
from lawa_suite.sharded_checkpoints import is_sharded_checkpoint, read_whole

__all__ = ["select_weights", "export", "MODULE_FORMAT", "write_module_folder", "load_model"]


def _checkpoint_folder(path: Path) -> Path:
    if (path / ckpt.MANIFEST).is_file():
        return path
    found = ckpt.latest_valid(path / "checkpoints", warn=lambda message: None)
    if found is None:
        raise CheckpointError(f"{path}: neither a checkpoint folder (manifest.json) nor a run folder "
                              f"holding a valid checkpoint in checkpoints/")
    return found.path


def select_weights(path: Path, weights_name: str, cfg: ResolvedConfig) -> tuple[dict[str, Tensor], str]:
    """``(state_dict, description)`` of the weights named ``weights_name`` ("raw" or an averager of the run) found
    at ``path``: a weights file, a checkpoint folder, or a run folder (its newest valid checkpoint)."""
    from safetensors.torch import load_file

    if path.is_file():
        if weights_name != "raw":
            raise ConfigError(f"weights: {path} is a single weights file; weights=raw is the only choice, "
                              f"got {weights_name!r}")
        return load_file(str(path)), str(path)
    folder = _checkpoint_folder(path)
    problems = ckpt.verify(folder)
    if problems:
        raise CheckpointError(problems[0])
    sharded = is_sharded_checkpoint(folder)  # distributed=fsdp: every rank's shards, assembled whole here
    raw, saved = read_whole(folder) if sharded else (None, None)
    if weights_name == "raw":
        return (raw if sharded else load_file(str(folder / "model.safetensors"))), f"{folder} (raw)"
    if not sharded:
        saved = ckpt.read_state(folder, "state")["averagers"]
    if weights_name not in saved:
        raise ConfigError(f"weights: {folder} holds raw, {', '.join(sorted(saved)) or '(no averagers)'}; "
                          f"got {weights_name!r}")
    if weights_name not in cfg.averagers:
        raise ConfigError(f"weights: averager {weights_name!r} is not in the run's config.yaml")
    averager = cfg.build_averagers()[weights_name]
    averager.load_state_dict(saved[weights_name])
    average = averager.average()
    if average is None:
        raise ConfigError(f"weights: averager {weights_name!r} was not ready yet at {folder.name} (no average to "
                          f"export)")
    return average, f"{folder} ({weights_name})"


def export(path: Path, out: Path, weights_name: str = "raw", config: Path | None = None, force: bool = False) -> str:
    """Export the chosen weights to ``out``; returns a one-line description of what was written."""
    path, out = Path(path), Path(out)
    if not path.exists():
        raise ConfigError(f"path: {path} does not exist")
    config = Path(config) if config else find_run_config(path)
    claim_out(out, "suite export", [path, config], force)
    cfg = load_resolved(config)
    state, source = select_weights(path, weights_name, cfg)
    task = registry.tasks.get(cfg.run.task)(cfg.task, cfg.run)
    # Written next to the target and renamed into place: a failed export leaves nothing half-written.
    staging = staged_folder(out)
    try:
        task.export(state, staging)
        mark_output(staging, "suite export", source=path, weights=weights_name, config=config)
        plain_modes(staging)
        commit_folder(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return f"exported {source} as a {cfg.run.task} model to {out}"
