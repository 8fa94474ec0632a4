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
from lawa_suite.averagers.base import all_finite, local_shard
from lawa_suite.errors import CheckpointError, ConfigError, NonFiniteTraining
from lawa_suite.training.state import TrainState
from lawa_suite.rundir import truncate_metrics
from lawa_suite.training.scoring import rng_state, set_rng_state
from lawa_suite.training.sharded_checkpoints import is_sharded_checkpoint, load_sharded, save_sharded

if TYPE_CHECKING:
    from lawa_suite.training.state import Checkpointable

__all__ = ["RunCheckpointer", "nonfinite_parts", "any_rank_poisoned"]


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

    def resume(self, run: Checkpointable) -> None:
        """Continue from ``resume=auto`` (the newest valid checkpoint, if any) or ``resume=<checkpoint folder>``."""
        if run.cfg.run.resume == "auto":
            found = ckpt.latest_valid(self.folder, warn=run.log)
            if found is None:
                run.log(f"resume=auto: no valid checkpoint in {self.folder}; starting from step 0")
                if run.is_main:
                    truncate_metrics(run.out / "metrics.jsonl", 0)
                return
            path = found.path
        else:
            path = Path(run.cfg.run.resume)
            if not path.is_dir():
                raise ConfigError(f"resume: {path} does not exist or is not a folder; pass resume=auto (the newest "
                                  f"valid checkpoint of out=) or a checkpoint folder such as "
                                  f"{self.folder / ckpt.step_dir_name(1000)}")
            problems = ckpt.verify(path)
            if problems:
                raise CheckpointError(f"resume: {problems[0]}")
        self.load(run, path)
        run.log(f"resumed from {path} at step {run.state.step}")

    def load(self, run: Checkpointable, path: Path) -> None:
        from safetensors.torch import load_file

        reset = run.cfg.run.reset_averagers
        state = ckpt.read_state(path, "state")
        sharded = run.cfg.run.distributed == "fsdp"
        if sharded != is_sharded_checkpoint(path):
            saved = "sharded (distributed=fsdp)" if not sharded else "whole (distributed=ddp)"
            raise CheckpointError(f"resume: {path} was saved {saved}; resume it with distributed="
                                  f"{'fsdp' if not sharded else 'ddp'}")
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
