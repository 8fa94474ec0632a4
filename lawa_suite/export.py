"""Pick one set of weights out of a run (raw or averaged, from a checkpoint or a saved snapshot) and hand
it to the task, which writes it in its domain's standard format (``Task.export``).

Where the weights come from:

- a run folder: its newest valid checkpoint (a newer one that is not valid is named in a warning, with why);
- a checkpoint folder (``checkpoints/step-NNNNNNNN``): the raw weights, or with ``weights=<averager>`` that
  averager's average, rebuilt from the state the checkpoint holds;
- a ``.safetensors`` file (a ``trajectory/`` snapshot, a post-hoc derived checkpoint): the weights in it.

The raw weights of a schedule-free run (``optimizer=schedulefree``, ``tasks/schedule_free.py``) are its eval sequence
``x``, what the run scored as raw: a checkpoint's ``model.safetensors`` holds the training sequence ``y``, so ``x`` is
computed from it and the checkpoint's optimizer state (``EvalWeights``: the task's optimizer, rebuilt on a scratch
model, does its own ``eval()``; nothing saved makes a round trip). That needs the task set up (its data: the model's
shape may come from it) where other exports read no data. BatchNorm statistics stay as saved (those of ``y``), as an
average's do. A trajectory file holds ``y`` and no optimizer state; it is exported as it
is, and the description says it is ``y``. ``suite eval`` reads a checkpoint's raw weights the same way.

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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lawa_suite import checkpoints as ckpt
from lawa_suite import registry
from lawa_suite.config import SCHEDULE_FREE, ResolvedConfig
from lawa_suite.rundir import claim_out, find_run_config, load_resolved
from lawa_suite.errors import CheckpointError, ConfigError, warn
from lawa_suite.files import commit_folder, mark_output, plain_modes, staged_folder
from lawa_suite.module_folders import MODULE_FORMAT, load_model, write_module_folder
from lawa_suite.training.scoring import forked_rng
from lawa_suite.training.sharded_checkpoints import is_sharded_checkpoint, read_whole
from lawa_suite.tasks.schedule_free import EvalSequence, is_schedule_free

__all__ = ["select_weights", "export", "MODULE_FORMAT", "write_module_folder", "load_model", "EvalWeights",
           "holds_schedule_free_state", "trains_schedule_free", "EVAL_SEQUENCE", "TRAIN_SEQUENCE"]

#: How outputs name the weights of a schedule-free run that they give as raw.
EVAL_SEQUENCE = "the schedule-free eval sequence x"
TRAIN_SEQUENCE = "the schedule-free training sequence y"


# -- schedule-free checkpoints: the raw weights are x -------------------------------------------------------------
def trains_schedule_free(cfg: Any) -> bool:
    """Whether the run's config selects schedule-free training (``<task>.optimizer=schedulefree``)."""
    return getattr(getattr(cfg, "task", None), "optimizer", None) == SCHEDULE_FREE


def _optimizer_skeleton(folder: Path) -> Any:
    """The optimizer part of the JSON skeleton of a whole checkpoint's ``state``, or None where it has none."""
    try:
        skeleton = ckpt.read_state_skeleton(folder, "state")
    except (OSError, ValueError):
        return None
    return skeleton.get("__dict__", {}).get("optimizer") if isinstance(skeleton, dict) else None


def holds_schedule_free_state(folder: Path) -> bool:
    """Whether the checkpoint ``folder`` holds a schedule-free optimizer's state: its parameter groups carry the
    ``train_mode`` flag (what ``tasks.schedule_free.is_schedule_free`` reads off a live optimizer, so a plugin's
    schedule-free optimizer counts too). Read off the state's JSON skeleton alone: no tensor is loaded."""
    node = _optimizer_skeleton(folder)
    try:
        groups = node["__dict__"]["param_groups"]
        return "train_mode" in groups[0]["__dict__"]
    except (TypeError, KeyError, IndexError):
        return False


class EvalWeights:
    """The eval sequence ``x`` of schedule-free checkpoints of one run: the checkpoint's ``y`` goes into a scratch
    model of the task, the task's optimizer (built once, on that model) loads the checkpoint's state, and its own
    ``eval()`` puts ``x`` in the parameters (``tasks.schedule_free.EvalSequence``), as the run's raw evaluation did.
    The scratch model is never put back: nothing makes a ``train()``/``eval()`` round trip."""

    def __init__(self, task: Any, lr: float) -> None:
        self.task, self.lr = task, lr
        self.model: nn.Module | None = None
        self.optimizer: Any = None

    def __call__(self, folder: Path, weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``x`` from the checkpoint ``folder``'s optimizer state and its ``weights`` (``y``, as read)."""
        if self.model is None:
            with forked_rng():  # building draws initial weights; whatever the caller seeded stays as it was
                self.model = self.task.build_model()
            self.optimizer = self.task.build_optimizer(self.model, self.lr)
        if not is_schedule_free(self.optimizer):  # the config in use is not the run's (config= elsewhere)
            raise CheckpointError(f"{folder}: holds a schedule-free optimizer's state, but the config in use builds "
                                  f"{type(self.optimizer).__name__}; use the run's own config.yaml (or "
                                  f"optimizer=schedulefree) to get its eval sequence x")
        try:
            self.model.load_state_dict(dict(weights))
            self.optimizer.load_state_dict(ckpt.read_state_part(folder, "state", "optimizer"))
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{folder}: its weights and optimizer state do not fit the run's model and "
                                  f"optimizer ({str(exc).strip().splitlines()[0][:160]}); the eval sequence x "
                                  f"needs both") from None
        EvalSequence(self.optimizer).load()  # the parameters now hold x
        return {name: tensor.detach().clone() for name, tensor in self.model.state_dict().items()}



def _checkpoint_folder(path: Path, warn: Callable[[str], None]) -> Path:
    if (path / ckpt.MANIFEST).is_file():
        return path
    found = ckpt.latest_valid(path / "checkpoints", warn=warn)  # a newer invalid one is named, as resume names it
    if found is None:
        raise CheckpointError(f"{path}: neither a checkpoint folder (manifest.json) nor a run folder "
                              f"holding a valid checkpoint in checkpoints/")
    return found.path


def select_weights(path: Path, weights_name: str, cfg: ResolvedConfig,
                   warn: Callable[[str], None] = warn) -> tuple[dict[str, Tensor], str]:
    """``(state_dict, description)`` of the weights named ``weights_name`` ("raw" or an averager of the run) found
    at ``path``: a weights file, a checkpoint folder, or a run folder (its newest valid checkpoint; each newer one
    that is not valid is skipped with a ``warn`` line saying why)."""
    from safetensors.torch import load_file

    if path.is_file():
        if weights_name != "raw":
            raise ConfigError(f"weights: {path} is a single weights file; weights=raw is the only choice, "
                              f"got {weights_name!r}")
        trajectory = path.parent.name == "trajectory" and trains_schedule_free(cfg)  # (an average is no sequence)
        said = f" ({TRAIN_SEQUENCE}: a trajectory file holds no optimizer state)" if trajectory else ""
        return load_file(str(path)), f"{path}{said}"
    folder = _checkpoint_folder(path, warn)
    problems = ckpt.verify(folder)
    if problems:
        raise CheckpointError(problems[0])
    sharded = is_sharded_checkpoint(folder)  # distributed=fsdp: every rank's shards, assembled whole here
    raw, saved = read_whole(folder) if sharded else (None, None)
    if weights_name == "raw":
        if sharded and trains_schedule_free(cfg):
            raise CheckpointError(f"{folder}: a distributed=fsdp checkpoint of a schedule-free run; its raw weights "
                                  f"(the eval sequence x) need the optimizer state, which it holds in shards, and "
                                  f"reading those whole is not supported; export a weights= average instead")
        if sharded:
            return raw, f"{folder} (raw)"
        weights = load_file(str(folder / "model.safetensors"))
        if not holds_schedule_free_state(folder):
            return weights, f"{folder} (raw)"
        task = registry.tasks.get(cfg.run.task)(cfg.task, cfg.run)
        task.setup()  # x needs the task's model and optimizer, whose shapes may come from the data (cifar's classes)
        return EvalWeights(task, cfg.run.lr)(folder, weights), f"{folder} (raw: {EVAL_SEQUENCE})"
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


def export(path: Path, out: Path, weights_name: str = "raw", config: Path | None = None, force: bool = False,
           warn: Callable[[str], None] = warn) -> str:
    """Export the chosen weights to ``out``; returns a one-line description of what was written. ``warn`` says which
    newer checkpoints were skipped and why, and what killed exports left beside ``out`` (removed)."""
    path, out = Path(path), Path(out)
    if not path.exists():
        raise ConfigError(f"path: {path} does not exist")
    config = Path(config) if config else find_run_config(path)
    claim_out(out, "suite export", [path, config], force)
    cfg = load_resolved(config)
    state, source = select_weights(path, weights_name, cfg, warn)
    task = registry.tasks.get(cfg.run.task)(cfg.task, cfg.run)
    # Written next to the target and renamed into place: a failed export leaves nothing half-written (and a killed
    # one's staging folder goes the next time: staged_folder removes what dead processes left beside out).
    staging = staged_folder(out, log=warn)
    try:
        task.export(state, staging)
        mark_output(staging, "suite export", source=path, weights=weights_name, config=config)
        plain_modes(staging)
        commit_folder(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return f"exported {source} as a {cfg.run.task} model to {out}"
