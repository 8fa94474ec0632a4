"""A training run's checkpoints: what goes into one, saving it, and continuing from one.

A checkpoint holds everything needed to continue an uninterrupted run exactly: raw weights, optimizer (and the
mixed-precision scaler), data position, every process's RNG, the loop's counters and every averager's state.
One whose state holds NaN or Inf is never written (it would poison every resumed run). With several processes
only rank 0 writes; the others wait. With ``distributed=fsdp`` every rank writes its shards with
torch.distributed.checkpoint and rank 0 commits them (``sharded_checkpoints.py``); such a checkpoint resumes on
any number of processes, with ``distributed=fsdp``. The commit protocol itself (staging, manifest last, rename,
fsync) is ``checkpoints.py``'s.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lawa_suite import checkpoints as ckpt
from lawa_suite.averagers.base import all_finite, local_shard, settings_that_differ
from lawa_suite.errors import CheckpointError, ConfigError, NonFiniteTraining
from lawa_suite.training.state import TrainState
from lawa_suite.rundir import truncate_metrics
from lawa_suite.training.scoring import rng_state, set_rng_state
from lawa_suite.training.sharded_checkpoints import is_sharded_checkpoint, load_sharded, save_sharded

if TYPE_CHECKING:
    from lawa_suite.training.state import Checkpointable

__all__ = ["RunCheckpointer", "resume_source", "check_fits", "nonfinite_parts", "any_rank_poisoned"]


def nonfinite_parts(state: Any) -> list[str]:
    """Paths (``optimizer/state/0/exp_avg``) of the floating tensors in a nested state that hold NaN or Inf."""
    tensors, _ = ckpt.flatten_state(state)
    floats = {path: t for path, t in tensors.items() if t.is_floating_point() and t.numel()}
    if all_finite(list(floats.values())):
        return []
    return [path.lstrip("/") for path, t in floats.items() if not bool(torch.isfinite(t).all())]


class RunCheckpointer:
    """Saves and restores a ``Run``'s state in ``folder``. It keeps no reference to the run (each method is
    given it): a cycle would keep the run, and its DataLoader workers, alive until the garbage collector ran."""

    def __init__(self, folder: Path, is_main: bool) -> None:
        self.folder = folder
        if is_main:
            ckpt.clean_leftovers(self.folder)

    def state(self, run: Checkpointable) -> dict[str, Any]:
        """Everything but the raw weights (those go to ``model.safetensors``)."""
        state = {
            "train": dataclasses.asdict(run.state),
            "optimizer": run.optimizer.state_dict(),
            "stream": run.stream.state_dict(),
            "rng": rng_state(),
            "averagers": {name: avg.state_dict() for name, avg in run.averagers.items()},
        }
        if run.accelerator.scaler is not None:
            state["scaler"] = run.accelerator.scaler.state_dict()
        return state

    def save(self, run: Checkpointable) -> None:
        step = run.state.step
        if run.cfg.run.distributed == "fsdp":
            self.save_sharded(run)
            return
        weights = run.unwrapped.state_dict()
        if not all_finite([t for t in weights.values() if t.is_floating_point()]):
            raise NonFiniteTraining(f"the raw weights at step {step} hold NaN or Inf; no checkpoint was written")
        rngs = _rng_states_of_all_processes(run)
        if run.is_main:
            state = self.state(run)
            if rngs is not None:
                state["rng_ranks"] = rngs
            poisoned = nonfinite_parts(state)
            if poisoned:
                raise NonFiniteTraining(f"the training state at step {step} holds NaN or Inf in "
                                        f"{', '.join(poisoned)}; no checkpoint was written")
            files = {"model.safetensors": ckpt.tensor_writer(weights, {"step": str(step)}),
                     **ckpt.state_writers("state", state)}
            info = {"averagers": sorted(run.averagers), "task": run.cfg.run.task}
            ckpt.commit_checkpoint(self.folder, step, files, info)
            ckpt.apply_retention(self.folder, run.cfg.run.checkpoint.keep, warn=run.log)
        run.accelerator.wait_for_everyone()

    def save_sharded(self, run: Checkpointable) -> None:
        """distributed=fsdp: every rank's shards with torch.distributed.checkpoint (``sharded_checkpoints``), after
        every rank has checked its own shards (NaN or Inf in any rank's stops all of them, and nothing is written)."""
        step = run.state.step
        local = {"weights": run.unwrapped.state_dict(), "optimizer": run.optimizer.state_dict(),
                 "averagers": {name: avg.state_dict() for name, avg in run.averagers.items()}}
        poisoned = nonfinite_parts(_local_shards(local))
        if any_rank_poisoned(bool(poisoned), run.accelerator.device):
            where = ", ".join(poisoned) if poisoned else "another process's shards"
            raise NonFiniteTraining(f"the training state at step {step} holds NaN or Inf in {where}; "
                                    f"no checkpoint was written")
        rngs = _rng_states_of_all_processes(run)
        plain = {"train": dataclasses.asdict(run.state), "stream": run.stream.state_dict(), "rng": rng_state()}
        if rngs is not None:
            plain["rng_ranks"] = rngs
        if run.accelerator.scaler is not None:
            plain["scaler"] = run.accelerator.scaler.state_dict()
        info = {"averagers": sorted(run.averagers), "task": run.cfg.run.task}
        save_sharded(run, self.folder, plain, info)
        if run.is_main:
            ckpt.apply_retention(self.folder, run.cfg.run.checkpoint.keep, warn=run.log)
        run.accelerator.wait_for_everyone()

    def resume(self, run: Checkpointable, path: Path | None) -> None:
        """Continue from ``path``, the checkpoint ``resume_source`` found and checked before the run wrote anything
        (None: ``resume=auto`` found none, and the run starts from step 0)."""
        if path is None:
            run.log(f"resume=auto: no valid checkpoint in {self.folder}; starting from step 0")
            if run.is_main:
                truncate_metrics(run.out / "metrics.jsonl", 0)
            return
        self.load(run, path)
        run.log(f"resumed from {path} at step {run.state.step}")

    def load(self, run: Checkpointable, path: Path) -> None:
        from safetensors.torch import load_file

        reset = run.cfg.run.reset_averagers
        state = ckpt.read_state(path, "state")
        sharded = run.cfg.run.distributed == "fsdp"
        if sharded:  # weights, optimizer and averager shards, on this run's number of processes
            load_sharded(run, path, state)
        else:
            try:
                run.unwrapped.load_state_dict(load_file(str(path / "model.safetensors")))
                run.optimizer.load_state_dict(state["optimizer"])
            except (RuntimeError, ValueError, KeyError) as exc:  # another task's or another width's checkpoint
                saved = _saved_task(path)
                raise CheckpointError(f"resume: {path} holds another model's state (saved by task {saved}; "
                                      f"{str(exc).strip().splitlines()[0][:200]}); resume a checkpoint of this "
                                      f"run's model, task {run.cfg.run.task} as configured") from None
        run.stream.load_state_dict(state["stream"])
        run.state = TrainState(**state["train"])
        missing = sorted(set(run.averagers) - set(state["averagers"]))
        if missing and not reset:
            raise CheckpointError(f"resume: {path} holds no state for averager(s) {', '.join(missing)}; "
                                  f"pass reset_averagers=true to start them afresh at step {run.state.step}")
        for name, avg in run.averagers.items():
            if name not in state["averagers"]:
                run.log(f"resume: averager {name} starts afresh at step {run.state.step} (reset_averagers=true)")
                continue
            try:
                avg.load_state_dict(state["averagers"][name])
            except ValueError as exc:  # saved with other settings
                if not reset:
                    raise CheckpointError(f"resume: {exc}") from None
                run.log(f"resume: averager {name} starts afresh at step {run.state.step} (its settings changed)")
        if "scaler" in state and run.accelerator.scaler is not None:
            run.accelerator.scaler.load_state_dict(state["scaler"])
        _restore_rng(run, state, path)
        if run.is_main:
            truncate_metrics(run.out / "metrics.jsonl", run.state.step)


# -- the checkpoint to resume, checked before the run writes anything -------------------------------------------
def resume_source(run: Checkpointable) -> Path | None:
    """The checkpoint ``resume=`` names, checked against the built run before anything is written into ``out``: it
    exists, is a checkpoint folder (a run folder, or its ``checkpoints/``, is named as such, with its newest valid
    checkpoint), verifies against its manifest, and fits the run (``check_fits``). ``resume=auto``: the newest
    valid checkpoint of ``out``, or None where ``out`` holds no checkpoint (the run starts from step 0); where it
    holds only invalid ones, a ``CheckpointError`` (starting over would write over the run)."""
    rc = run.cfg.run
    folder = run.out / "checkpoints"
    if rc.resume == "auto":
        found = ckpt.latest_valid(folder, warn=run.log)
        if found is None:
            committed = ckpt.list_checkpoints(folder)
            if committed:  # starting over would truncate the run's records: a run is never written over
                raise CheckpointError(
                    f"resume=auto: none of the {len(committed)} checkpoint(s) in {folder} is valid (each is named "
                    f"above); nothing was changed: repair them, move them out of {folder} to start this run again "
                    f"from step 0, or pass resume=<a checkpoint folder>")
            return None
        path = found.path
    else:
        path = Path(rc.resume)
        if not path.is_dir():
            raise ConfigError(f"resume: {path} does not exist or is not a folder; pass resume=auto (the newest "
                              f"valid checkpoint of out=) or a checkpoint folder such as "
                              f"{folder / ckpt.step_dir_name(1000)}")
        if not (path / ckpt.MANIFEST).exists():
            _refuse_a_folder_of_checkpoints(path)
        problems = ckpt.verify(path)
        if problems:
            raise CheckpointError(f"resume: {problems[0]}")
    check_fits(run, path)
    return path


def _refuse_a_folder_of_checkpoints(path: Path) -> None:
    """``resume=`` names a folder without a manifest: a run folder or a folder of checkpoints is a ``ConfigError``
    saying what resume= takes (and naming the newest valid checkpoint there); a ``step-N`` folder is left to
    ``verify`` (a checkpoint never committed); anything else is not a checkpoint."""
    is_run = (path / "config.yaml").is_file() or (path / "checkpoints").is_dir()
    inner = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if is_run or ckpt.list_checkpoints(inner):
        newest = ckpt.latest_valid(inner, warn=lambda message: None)
        what = "a run folder" if is_run else "a folder of checkpoints"
        which = f"the newest valid one here is {newest.path}" if newest else "it holds no valid checkpoint"
        raise ConfigError(f"resume: {path} is {what}; resume= takes one checkpoint folder ({which}), or auto to "
                          f"continue the run in out= from its newest valid checkpoint")
    if ckpt.step_in_name(path.name) is None:
        raise ConfigError(f"resume: {path} is not a checkpoint folder (no {ckpt.MANIFEST}); resume= takes a "
                          f"checkpoint folder (<run>/checkpoints/step-N) or auto")


class _NoTensors:
    """What ``unflatten_state`` finds for every tensor of a skeleton read without its tensors: None."""

    def __getitem__(self, key: str) -> None:
        return None


def check_fits(run: Checkpointable, path: Path) -> None:
    """A ``CheckpointError`` unless the checkpoint at ``path`` (verified) can be loaded into the run as built, read
    from its manifest, its state's skeleton and its weights' shapes (no tensor is read): saved whole or sharded as the
    run is, by the run's task, the same weights by name and shape, the optimizer's parameter groups of the same
    sizes, and state for every averager (unless ``reset_averagers``) made with the same settings. So a checkpoint of
    another task or width is refused before the run writes anything (``load`` found it after config.yaml)."""
    rc = run.cfg.run
    sharded = rc.distributed == "fsdp"
    if sharded != is_sharded_checkpoint(path):
        saved = "sharded (distributed=fsdp)" if not sharded else "whole (distributed=ddp)"
        raise CheckpointError(f"resume: {path} was saved {saved}; resume it with distributed="
                              f"{'fsdp' if not sharded else 'ddp'}")
    task = _saved_task(path)
    if task not in ("?", rc.task):
        raise _another_model(run, path, f"this run is task {rc.task}")
    try:
        _check_state_fits(run, path, ckpt.unflatten_state(ckpt.read_state_skeleton(path, "state"), _NoTensors()))
    except (KeyError, TypeError, AttributeError, ValueError) as exc:  # verified, yet not the state the suite writes
        raise CheckpointError(f"resume: {path / 'state.json'} is not a lawa-suite training state "
                              f"({type(exc).__name__}: {str(exc)[:100]}); resume a checkpoint suite run "
                              f"wrote") from None


def _check_state_fits(run: Checkpointable, path: Path, skeleton: dict[str, Any]) -> None:
    """``check_fits`` for the weights, the optimizer and the averagers, given the state's skeleton."""
    rc = run.cfg.run
    sharded = rc.distributed == "fsdp"
    if not sharded:
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), framework="pt") as saved_weights:
            shapes = {name: list(saved_weights.get_slice(name).get_shape()) for name in saved_weights.keys()}
        mismatch = _weights_mismatch(shapes, {name: list(t.shape) for name, t in run.unwrapped.state_dict().items()})
        if mismatch:
            raise _another_model(run, path, mismatch)
        groups = [len(group["params"]) for group in skeleton["optimizer"]["param_groups"]]
        ours = [len(group["params"]) for group in run.optimizer.state_dict()["param_groups"]]
        if groups != ours:
            raise _another_model(run, path, f"its optimizer has parameter groups of {groups} tensors, this run's "
                                            f"{ours}")
    saved_averagers = ({name: info["skeleton"] for name, info in skeleton.get("sharded_averagers", {}).items()}
                       if sharded else skeleton["averagers"])
    if sharded:
        saved_averagers = {name: ckpt.unflatten_state(part, _NoTensors()) for name, part in saved_averagers.items()}
    missing = sorted(set(run.averagers) - set(saved_averagers))
    if missing and not rc.reset_averagers:
        raise CheckpointError(f"resume: {path} holds no state for averager(s) {', '.join(missing)}; "
                              f"pass reset_averagers=true to start them afresh at its step")
    for name, avg in run.averagers.items():
        saved = saved_averagers.get(name)
        if isinstance(saved, dict) and "config" in saved and not rc.reset_averagers:
            differ = _settings_differ(avg, saved["config"])
            if differ:
                raise CheckpointError(f"resume: averager {name} in {path} was made with other settings "
                                      f"({', '.join(differ)}); pass reset_averagers=true to start it afresh")


def _weights_mismatch(saved: dict[str, list[int]], model: dict[str, list[int]]) -> str:
    """What keeps weights of ``saved`` shapes from loading into a model of ``model`` shapes (by name), or ''."""
    missing, unexpected = sorted(set(model) - set(saved)), sorted(set(saved) - set(model))
    other = [f"{name} {saved[name]} (the model's: {model[name]})" for name in sorted(set(saved) & set(model))
             if saved[name] != model[name]]
    parts = ([f"{len(other)} tensor(s) of another shape, such as {other[0]}"] if other else []) + \
        ([f"{len(missing)} missing, such as {missing[0]}"] if missing else []) + \
        ([f"{len(unexpected)} the model lacks, such as {unexpected[0]}"] if unexpected else [])
    return "; ".join(parts)


def _settings_differ(avg: Any, saved: Any) -> list[str]:
    """The settings that affect the average in which ``avg`` differs from a saved state's ``config``, by the rule of
    ``Averager.load_state_dict``, which refuses such a state (keys marked ``affects_average=False`` may change)."""
    config = getattr(avg, "config", None)
    if not dataclasses.is_dataclass(config):  # a plugin keeping its settings otherwise: its load_state_dict decides
        return []
    try:
        return settings_that_differ(config, saved)
    except Exception:  # noqa: BLE001 - not this averager's settings at all (load_state_dict would fail on them)
        return ["config"]


def _another_model(run: Checkpointable, path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"resume: {path} holds another model's state (saved by task {_saved_task(path)}; "
                           f"{why}); resume a checkpoint of this run's model, task {run.cfg.run.task} as "
                           f"configured")


def any_rank_poisoned(poisoned: bool, device: torch.device) -> bool:
    """Whether any process found NaN or Inf in its shards: one MAX all-reduce, on ``device`` (the accelerator's:
    NCCL, the group accelerate starts on GPUs, takes no host tensor)."""
    bad = torch.tensor([float(poisoned)], device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return bool(bad.item())


def _saved_task(path: Path) -> str:
    """The task a checkpoint's manifest names, or "?"."""
    import json

    try:
        return str(json.loads((path / ckpt.MANIFEST).read_text()).get("task", "?"))
    except (OSError, ValueError, AttributeError):
        return "?"


def _local_shards(state: Any) -> dict[str, torch.Tensor]:
    """This rank's shard of every tensor in a nested state (a DTensor's ``to_local()``), by path."""
    tensors, _ = ckpt.flatten_state(state)
    return {path: local_shard(t) for path, t in tensors.items()}


def _restore_rng(run: Checkpointable, state: dict[str, Any], path: Path) -> None:
    """This process's own random streams, or rank 0's when the checkpoint came from another number of processes."""
    accelerator = run.accelerator
    ranks = state.get("rng_ranks") or []
    if len(ranks) == accelerator.num_processes:
        set_rng_state(ranks[accelerator.process_index])
        return
    set_rng_state(state["rng"])
    if accelerator.num_processes > 1:
        run.log(f"resume: {path} was saved by {max(len(ranks), 1)} process(es), not "
                f"{accelerator.num_processes}: every process continues rank 0's random streams")


def _rng_states_of_all_processes(run: Checkpointable) -> list[dict[str, Any]] | None:
    """Each process's RNG state (its own dropout stream), gathered for the checkpoint; None for one process."""
    if run.accelerator.num_processes == 1:
        return None
    from accelerate.utils import gather_object
    return gather_object([rng_state()])
