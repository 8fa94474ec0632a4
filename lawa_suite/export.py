"""Pick one set of weights out of a run (raw or averaged, from a checkpoint or a saved snapshot) and hand
it to the task, which writes it in its domain's standard format (``Task.export``).

Where the weights come from:

- a run folder: its newest valid checkpoint;
- a checkpoint folder (``checkpoints/step-NNNNNNNN``): the raw weights, or with ``weights=<averager>`` that
  averager's average, rebuilt from the state the checkpoint holds;
- a ``.safetensors`` file (a ``trajectory/`` snapshot, a post-hoc derived checkpoint): the weights in it.

The task and its settings come from the ``config.yaml`` of the run the path lies in (or ``config=``).
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

from torch import Tensor

from lawa_suite import checkpoints as ckpt
from lawa_suite import registry
from lawa_suite.config import ConfigError, ResolvedConfig, load_resolved

__all__ = ["find_run_config", "load_weights", "export"]


def find_run_config(path: Path) -> Path:
    """The ``config.yaml`` of the run that ``path`` lies in (the nearest one above it)."""
    for folder in [path, *path.parents] if path.is_dir() else list(path.parents):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    raise ConfigError(f"config: no config.yaml in {path} or any folder above it; pass config=<run>/config.yaml")


def _checkpoint_folder(path: Path) -> Path:
    if (path / ckpt.MANIFEST).is_file():
        return path
    found = ckpt.latest_valid(path / "checkpoints", warn=lambda message: None)
    if found is None:
        raise ckpt.CheckpointError(f"{path}: neither a checkpoint folder (manifest.json) nor a run folder "
                                   f"holding a valid checkpoint in checkpoints/")
    return found.path


def load_weights(path: Path, weights: str, cfg: ResolvedConfig) -> tuple[dict[str, Tensor], str]:
    """``(state_dict, description)`` of the ``weights`` ("raw" or an averager name) found at ``path``."""
    from safetensors.torch import load_file

    if path.is_file():
        if weights != "raw":
            raise ConfigError(f"weights: {path} is a single weights file; weights=raw is the only choice, got {weights!r}")
        return load_file(str(path)), str(path)
    folder = _checkpoint_folder(path)
    problems = ckpt.verify(folder)
    if problems:
        raise ckpt.CheckpointError(problems[0])
    if weights == "raw":
        return load_file(str(folder / "model.safetensors")), f"{folder} (raw)"
    saved = ckpt.read_state(folder, "state")["averagers"]
    if weights not in saved:
        raise ConfigError(f"weights: {folder} holds raw, {', '.join(sorted(saved)) or '(no averagers)'}; got {weights!r}")
    if weights not in cfg.averagers:
        raise ConfigError(f"weights: averager {weights!r} is not in the run's config.yaml")
    averager = registry.averagers.create(weights, **dataclasses.asdict(cfg.averagers[weights]))
    averager.load_state_dict(saved[weights])
    average = averager.average()
    if average is None:
        raise ConfigError(f"weights: averager {weights!r} was not ready yet at {folder.name} (no average to export)")
    return average, f"{folder} ({weights})"


def export(path: Path, out: Path, weights: str = "raw", config: Path | None = None, force: bool = False) -> str:
    """Export the chosen weights to ``out``; returns a one-line description of what was written."""
    path, out = Path(path), Path(out)
    if not path.exists():
        raise ConfigError(f"path: {path} does not exist")
    cfg = load_resolved(config or find_run_config(path))
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"out: {out} exists and is not empty; choose another folder or pass --force")
    state, source = load_weights(path, weights, cfg)
    task = registry.tasks.get(cfg.run.task)(cfg.task, cfg.run)
    # Written next to the target and renamed into place: a failed export leaves nothing half-written.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        task.export(state, staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return f"exported {source} as a {cfg.run.task} model to {out}"
