"""Checkpoints of a ``distributed=fsdp`` run with ``torch.distributed.checkpoint`` (DCP), under the suite's commit.

Every rank writes its own shards (raw weights, optimizer, every averager's tensors) with ``dcp.save`` into a scratch
folder named like a staging folder (so ``clean_leftovers`` removes it after a crash); rank 0 then commits them with
``checkpoints.commit_checkpoint``: each DCP file is moved into the staging folder, fsynced and hashed into the
manifest, which is written last, then the folder is renamed. A kill at any point before the rename leaves only
leftovers; ``verify`` checks every rank's file. The rest of the state (counters, data position, every rank's RNG,
how each averager's tensors map to parameters) is ``state.json``/``state.safetensors`` as in an unsharded checkpoint.

Averager tensors are saved as DTensors laid out like the parameter whose shard they are: a list in an averager's
state with one tensor per float name of its layout (EMA's average, each LAWA snapshot, its running sum) is taken
as those names' shards. Their global shape is the parameter's, so DCP can load them on another number of processes
(one included), like the weights and the optimizer. Any other tensor must be the same on every rank (BatchNorm's
counters); a shard the rule cannot place is refused, so no rank's shard is dropped silently.
"""

from __future__ import annotations

import os
import secrets
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lawa_suite import checkpoints as ckpt
from lawa_suite.averagers.base import Averager, named_tensors
from lawa_suite.errors import CheckpointError

if TYPE_CHECKING:
    from lawa_suite.training.state import Checkpointable

__all__ = ["is_sharded_checkpoint", "save_sharded", "load_sharded", "read_whole", "ShardedWeights"]

DCP_METADATA = ckpt.DCP_METADATA


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / DCP_METADATA).is_file()


def _dtensor_type() -> type:
    from torch.distributed.tensor import DTensor
    return DTensor


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _owners(avg: Averager, tensors: dict[str, Tensor], params: dict[str, Tensor]) -> dict[str, str | None]:
    """path -> the parameter whose shard the averager tensor at ``path`` is (None: the same on every rank)."""
    dtensor = _dtensor_type()
    floats = avg.layout.float_names if avg.layout is not None else []
    counts: dict[str, int] = {}
    for path in tensors:
        parent, _, index = path.rpartition("/")
        if index.isdigit():
            counts[parent] = counts.get(parent, 0) + 1
    owners: dict[str, str | None] = {}
    for path, t in tensors.items():
        parent, _, index = path.rpartition("/")
        owner = None
        if (index.isdigit() and not path.startswith("/others/") and counts[parent] == len(floats)
                and int(index) < len(floats)):
            name = floats[int(index)]
            param = params.get(name)
            local_shape = None if param is None else tuple(
                param.to_local().shape if isinstance(param, dtensor) else param.shape)
            if tuple(t.shape) != local_shape:
                raise CheckpointError(f"averager {avg.name}: cannot tell whose shard {path} {tuple(t.shape)} is; "
                                      f"sharded checkpoints need one tensor per layout name")
            owner = name
        elif not path.startswith("/others/") and t.numel() > 1:
            raise CheckpointError(f"averager {avg.name}: {path} is neither a list of the layout's tensors nor "
                                  f"rank-independent; it cannot be saved sharded")
        owners[path] = owner
    return owners


def _as_global(t: Tensor, like: Tensor) -> Tensor:
    """``t`` (a local shard, or a whole tensor) laid out as ``like``: a DTensor with ``like``'s global shape,
    given explicitly (inferring it as local x world is wrong for uneven shards: NCAR/miles-credit #416)."""
    dtensor = _dtensor_type()
    if not isinstance(like, dtensor):
        return t
    return dtensor.from_local(t, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())


def _template(t_shape: list[int], dtype: str, like: Tensor | None) -> Tensor:
    """An empty tensor for DCP to load into: the shard of ``like``'s layout on this rank, or a whole tensor."""
    dtensor = _dtensor_type()
    dt = getattr(torch, dtype)
    if like is not None and isinstance(like, dtensor):
        local = torch.empty(like.to_local().shape, dtype=dt, device=like.to_local().device)
        return _as_global(local, like)
    device = like.device if like is not None else torch.device("cpu")
    return torch.empty(t_shape, dtype=dt, device=device)


def _averager_tensors(run: Checkpointable) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
    """Every averager's tensors for DCP (keyed by averager, then path) and what rebuilds them: skeletons, owners,
    global shapes and dtypes."""
    params = run.unwrapped.state_dict()
    out, described = {}, {}
    for name, avg in run.averagers.items():
        state = avg.state_dict()
        if state["layout"] is not None:  # the whole model's shapes, not this rank's: any number of processes reads it
            state["layout"] = {**state["layout"], "shapes": [list(params[n].shape) for n in state["layout"]["names"]]}
        tensors, skeleton = ckpt.flatten_state(state)
        owners = _owners(avg, tensors, params)
        out[name] = {path: (_as_global(t.contiguous(), params[owners[path]]) if owners[path] else t)
                     for path, t in tensors.items()}
        described[name] = {"skeleton": skeleton, "tensors": {
            path: {"owner": owners[path], "dtype": str(t.dtype).removeprefix("torch."),
                   "shape": list(params[owners[path]].shape) if owners[path] else list(t.shape)}
            for path, t in tensors.items()}}
    return out, described


def save_sharded(run: Checkpointable, folder: Path, plain_state: dict[str, Any], info: dict[str, Any]) -> Path | None:
    """Write checkpoint ``run.state.step`` into ``folder``: DCP shards from every rank, committed by rank 0. Every rank
    calls it. ``plain_state``: the rank-independent rest (rank 0's is written). Returns the committed folder on rank
    0, None elsewhere."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    step = run.state.step
    model_state, optim_state = get_state_dict(run.unwrapped, _inner(run.optimizer))
    averagers, described = _averager_tensors(run)
    scratch_name = [f".{ckpt.step_dir_name(step)}.tmp-{secrets.token_hex(6)}"]  # a staging name: cleaned after a crash
    if _distributed():
        torch.distributed.broadcast_object_list(scratch_name, src=0)
    scratch = folder / scratch_name[0]
    if run.is_main:
        scratch.mkdir(parents=True)
    run.accelerator.wait_for_everyone()
    try:
        with _quiet_single_process():
            dcp.save({"model": model_state, "optimizer": optim_state, "averagers": averagers},
                     checkpoint_id=scratch, no_dist=not _distributed())
    except Exception as exc:
        raise CheckpointError(f"could not write the sharded checkpoint of step {step} into {scratch}: {exc}") from exc
    run.accelerator.wait_for_everyone()
    committed = None
    if run.is_main:
        files = ckpt.state_writers("state", {**plain_state, "sharded_averagers": described})
        for file in sorted(os.listdir(scratch)):  # moved, not copied: commit_checkpoint fsyncs and hashes each
            files[file] = lambda target, src=scratch / file: os.replace(src, target)
        try:
            committed = ckpt.commit_checkpoint(folder, step, files, {**info, "sharded": run.accelerator.num_processes})
        finally:
            for leftover in scratch.iterdir() if scratch.exists() else ():
                leftover.unlink()
            if scratch.exists():
                scratch.rmdir()
    run.accelerator.wait_for_everyone()
    return committed


def load_sharded(run: Checkpointable, path: Path, state: dict[str, Any]) -> None:
    """Load the weights and optimizer of the sharded checkpoint ``path`` into the run (of any number of processes)
    and put every averager's saved state, as this rank's shards, into ``state["averagers"]``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(run.unwrapped, _inner(run.optimizer))
    params = run.unwrapped.state_dict()
    described = state["sharded_averagers"]
    templates = {name: {p: _template(d["shape"], d["dtype"], params[d["owner"]] if d["owner"] else None)
                        for p, d in info["tensors"].items()} for name, info in described.items()}
    everything = {"model": model_state, "optimizer": optim_state, "averagers": templates}
    try:
        with _quiet_single_process():
            dcp.load(everything, checkpoint_id=path, no_dist=not _distributed())
    except Exception as exc:
        raise CheckpointError(f"resume: could not read the sharded checkpoint {path}: {exc}") from exc
    set_state_dict(run.unwrapped, _inner(run.optimizer), model_state_dict=everything["model"],
                   optim_state_dict=everything["optimizer"])
    dtensor = _dtensor_type()
    local = named_tensors(run.unwrapped)
    state["averagers"] = {}
    for name, info in described.items():
        averager = ckpt.unflatten_state(info["skeleton"], {p: (t.to_local() if isinstance(t, dtensor) else t)
                                                           for p, t in everything["averagers"][name].items()})
        if averager["layout"] is not None:  # the layout of this rank's shards
            layout = averager["layout"]
            missing = [n for n in layout["names"] if n not in local]
            if missing:
                raise CheckpointError(f"resume: averager {name} in {path} has tensors the model lacks: {missing[:3]}")
            layout["shapes"] = [list(local[n].shape) for n in layout["names"]]
        state["averagers"][name] = averager


def read_whole(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The raw weights and every averager's state of the sharded checkpoint ``path``, assembled whole in this one
    process (for ``suite export``): the averagers' layouts hold the whole model's shapes, so ``load_state_dict`` then
    ``average()`` gives the full average."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(path)
    state = ckpt.read_state(path, "state")
    metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    model = {key.removeprefix("model."): torch.empty(tuple(md.size), dtype=md.properties.dtype)
             for key, md in metadata.items() if key.startswith("model.") and hasattr(md, "size")}
    described = state["sharded_averagers"]
    averagers = {name: {p: torch.empty(d["shape"], dtype=getattr(torch, d["dtype"]))
                        for p, d in info["tensors"].items()} for name, info in described.items()}
    with _quiet_single_process():
        dcp.load({"model": model, "averagers": averagers}, checkpoint_id=path, no_dist=True)
    return model, {name: ckpt.unflatten_state(info["skeleton"], averagers[name]) for name, info in described.items()}


class ShardedWeights(Mapping[str, Tensor]):
    """The raw weights of the sharded checkpoint ``path`` by name, each tensor assembled whole from every rank's
    shards only when asked for (``suite average``: memory for a tensor at a time, not for the whole model). The
    names and layouts come from DCP's ``.metadata`` alone. The last ``keep`` tensors asked for are kept, so the
    averaging and the NaN check reading the same tensor read it once."""

    def __init__(self, path: Path, keep: int = 2) -> None:
        from torch.distributed.checkpoint import FileSystemReader

        self.path = Path(path)
        read = FileSystemReader(str(self.path)).read_metadata()
        needed = sorted({info.relative_path for info in (read.storage_data or {}).values()})
        missing = [name for name in needed if not (self.path / name).is_file()]
        if missing:
            raise CheckpointError(f"{', '.join(missing)} missing: every rank's file ({len(needed)}) is needed")
        metadata = read.state_dict_metadata
        self.layout: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
            key.removeprefix("model."): (md.properties.dtype, tuple(md.size))
            for key, md in metadata.items() if key.startswith("model.") and hasattr(md, "size")}
        self._keep = keep
        self._kept: OrderedDict[str, Tensor] = OrderedDict()
        self._lock = threading.Lock()  # DCP's reader is not meant for concurrent loads; the averaging threads wait

    def __getitem__(self, name: str) -> Tensor:
        import torch.distributed.checkpoint as dcp

        dtype, shape = self.layout[name]  # KeyError for a name the checkpoint lacks, as a mapping does
        with self._lock:
            if name not in self._kept:
                tensor = torch.empty(shape, dtype=dtype)
                with _quiet_single_process():
                    dcp.load({"model": {name: tensor}}, checkpoint_id=self.path, no_dist=True)
                self._kept[name] = tensor
                while len(self._kept) > self._keep:
                    self._kept.popitem(last=False)
            return self._kept[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layout)

    def __len__(self) -> int:
        return len(self.layout)


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it "assumes" one process when there is no process group: here that is what was meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)
