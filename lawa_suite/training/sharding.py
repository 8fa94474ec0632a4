"""FSDP2 (``distributed=fsdp``): the model's parameters sharded over the processes, averagers on local shards.

``torch.distributed.fsdp.fully_shard`` is applied directly, not through accelerate's FSDP plugin: accelerate
(1.16) ignores the plugin when it runs on CPU (``cpu=True`` makes it MULTI_CPU and wraps the model in DDP), and the
suite's multi-process tests run on CPU over gloo. Each element of every ``nn.ModuleList`` (a transformer's blocks)
becomes its own FSDP unit, then the root takes the rest (embeddings, tied heads: one unit keeps tied names tied).

Every method here is elementwise linear in the weights, so each rank averages the local shard of each parameter
(``DTensor.to_local()``) with no communication and holds exactly its shard of the full-weight average, about
1/world of the memory. Buffers (BatchNorm statistics) are not sharded: rank 0's are given to every rank after each
step (``Run.sync_buffers``). Full tensors are assembled only where a file needs them (trajectory) or a test compares;
checkpoints stay sharded (``sharded_checkpoints.py``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["shard_model", "is_sharded", "gathered", "reshard", "agree_finite", "gather_full"]


def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor
    return DTensor


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (the model went through ``fully_shard``)."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters())


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``fully_shard`` every block of ``model`` (the elements of its ModuleLists), then the root, on a 1-D mesh over
    all processes. In place; returns ``model``. Call before building the optimizer: it must hold the DTensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    model.to(device)
    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Every FSDP unit's parameters gathered on every rank and kept so across forward passes while the block runs,
    then resharded: a forward makes no collective meanwhile, so each rank scores its own share of the evaluation
    batches (their sums are reduced after), not every rank all of them (FID sampling cost every rank the whole
    sample). Costs the full parameters on every rank while it lasts, as one forward's gathers did layer by layer."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    before = [_reshards_after_forward(m) for m in units]
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m, reshards in zip(units, before):
            m.reshard()
            m.set_reshard_after_forward(reshards, recurse=False)


def _reshards_after_forward(module: nn.Module) -> bool:
    """Whether an FSDP unit frees its gathered parameters after a forward (fully_shard's default: all but the root)."""
    group = getattr(module._get_fsdp_state(), "_fsdp_param_group", None)
    return group is None or getattr(group, "post_forward_mesh_info", True) is not None


def reshard(model: nn.Module) -> None:
    """Free every unsharded parameter (FSDP2 keeps the root's gathered after an eval forward), so the next forward
    gathers from the local shards again: after averaged weights were copied into them, it must see those."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def agree_finite(flag: Tensor) -> Tensor:
    """The minimum of a 0/1 finite flag over all processes (on the device, no host read): NaN in one rank's shard
    is refused by every rank, so the averagers of all ranks stay at the same step."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return flag


def gather_full(local: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Full tensors from the local shards ``local`` (an averager's average, or the model's own): each one laid out
    as the model's parameter of that name. Collective: every rank calls it and gets the full tensors. Shapes and
    strides are passed explicitly: ``DTensor.from_local`` would otherwise infer the global shape as local x world,
    which is wrong for FSDP2's unevenly split first dimension (and deadlocks, NCAR/miles-credit #416)."""
    dtensor = _dtensor_type()
    params = dict(model.state_dict())
    out = {}
    for name, t in local.items():
        param = params.get(name)
        if dtensor is not None and isinstance(param, dtensor):
            t = dtensor.from_local(t.to(param.dtype) if t.dtype != param.dtype else t, param.device_mesh,
                                   param.placements, run_check=False, shape=param.shape,
                                   stride=param.stride()).full_tensor()
        out[name] = t
    return out
