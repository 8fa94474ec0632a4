"""Tensor helpers every averager shares: reading weights by name, the accumulation dtype, one NaN/Inf check,
accumulator copies and casts, aliased names, and the ``Layout`` the first observation fixes. Pure functions of
tensors; the averager contract that uses them is ``base.py`` (which re-exports them, as plugins import them there).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

Weights = nn.Module | Mapping[str, Tensor]


class NonFiniteWarning(UserWarning):
    """An observation held NaN or Inf and was refused."""


def named_tensors(weights: Weights) -> dict[str, Tensor]:
    """The ``name -> tensor`` view of a module (its state_dict: parameters and buffers) or a mapping. A sharded
    (FSDP2) tensor is seen as this rank's local shard, a view of the model's own storage: averagers keep shards."""
    if isinstance(weights, nn.Module):
        return {name: local_shard(t) for name, t in weights.state_dict().items()}
    if isinstance(weights, Mapping):  # detached: in-place updates must never build an autograd graph
        return {name: local_shard(t.detach()) for name, t in weights.items()}
    raise TypeError(f"weights must be an nn.Module or a mapping of name -> Tensor, got {type(weights).__name__}")


def local_shard(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (``to_local()``, sharing its storage); any other tensor as it is."""
    to_local = getattr(t, "to_local", None)  # DTensor, without importing torch.distributed where it is absent
    return to_local() if to_local is not None else t


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for every float dtype up to 32 bits, float64 for float64: never accumulate in bf16/fp16."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def finite_flag(tensors: list[Tensor]) -> Tensor:
    """A float64 scalar, 1 if no tensor holds NaN or Inf, else 0, without a host sync: on the device of the
    accelerator tensors among ``tensors`` (the training loop reads it with the step's loss), on the host when
    there are none. Exact and overflow-free: a maximum of absolute values, or a minimum and a maximum, of finite
    values is finite (a sum of squares could overflow), and both propagate NaN.

    Tensors are checked where they live (a state mixes devices: AdamW's step counters and LAWA's pinned
    snapshots are host tensors), each device by its fastest form, measured (``benchmarks/averagers.py``): on an
    accelerator one fused inf-norm pass (``_foreach_norm``); on the CPU ``aminmax`` a tensor, about half the time
    of a ``lerp_`` over the same weights, where the fused inf-norm took 8x (its CPU kernel is not vectorised)."""
    host: list[Tensor] = []
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        if t.numel():  # an empty tensor holds nothing (and its inf-norm is undefined)
            (host if t.device.type == "cpu" else by_device.setdefault(t.device, [])).append(t)
    host_finite = all(_finite_on_host(t) for t in host) if host else True
    flags = [torch.stack([n.double() for n in torch._foreach_norm(group, ord=math.inf)]).isfinite().all().double()
             for group in by_device.values()]
    if not flags:
        return torch.tensor(float(host_finite), dtype=torch.float64)
    flag = flags[0]
    for other in flags[1:]:  # (several accelerators in one state: each flag joins the first device's)
        flag = flag * other.to(flag.device, non_blocking=True)
    return flag if host_finite else flag * 0.0


def _finite_on_host(t: Tensor) -> bool:
    """Whether a host tensor holds no NaN or Inf: its minimum and maximum (a NaN anywhere makes both NaN)."""
    if not t.is_floating_point():
        return True
    if t.dtype in (torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        low, high = t.aminmax()  # (computed in the tensor's dtype: no upcast copy)
    else:
        low, high = torch.aminmax(t)
    return math.isfinite(low.item()) and math.isfinite(high.item())


def all_finite(tensors: list[Tensor]) -> bool:
    """True if no tensor holds NaN or Inf: ``finite_flag`` read on the host (one sync)."""
    return bool(finite_flag(tensors))


def is_count(value: Any, minimum: int) -> bool:
    """True for a real integer (not a bool) ``>= minimum``: what step counts and window sizes must be."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def accumulator_copy(floats: list[Tensor]) -> list[Tensor]:
    """Fresh, contiguous copies of ``floats`` in the accumulation dtype, on their devices.

    ``copy=True`` matters: ``t.to(torch.float32)`` of a float32 tensor returns ``t`` itself, which would make
    the "average" an alias of the live weights.
    """
    return [t.detach().to(dtype=accumulation_dtype(t.dtype), memory_format=torch.contiguous_format, copy=True)
            for t in floats]


def cast_like(tensors: list[Tensor], like: list[Tensor], non_blocking: bool = False) -> list[Tensor]:
    """``tensors[i]`` in the dtype and on the device of ``like[i]``; tensors that already match pass through.
    ``non_blocking``: uploads from pinned host memory are queued on the device's stream, not waited for."""
    return [t if (t.dtype == ref.dtype and t.device == ref.device)
            else t.to(device=ref.device, dtype=ref.dtype, non_blocking=non_blocking) for t, ref in zip(tensors, like)]


def staged_like(tensors: list[Tensor], like: list[Tensor], staging: list[Tensor | None],
                non_blocking: bool = False) -> list[Tensor]:
    """``cast_like`` without allocating per call: entries whose dtype or device differ from ``like`` are copied
    into persistent ``staging`` buffers (made on first use), so a bf16 model's update into fp32 accumulators costs
    one fused copy instead of a fresh fp32 copy of the weights every step.

    Which entries need staging is decided at every call, from the tensors of that call: one caller hands it live
    device weights at one call and host snapshots at the next (LAWA's window slide subtracts the leaving host
    snapshot), and a decision fixed at the first call sent those host tensors unstaged into device arithmetic."""
    if len(staging) != len(tensors):
        staging[:] = [None] * len(tensors)
    out: list[Tensor] = []
    buffers, sources = [], []
    for i, (t, ref) in enumerate(zip(tensors, like)):
        if t.dtype == ref.dtype and t.device == ref.device:
            out.append(t)
            continue
        buffer = staging[i]
        if buffer is None or buffer.device != ref.device or buffer.dtype != ref.dtype or buffer.shape != ref.shape:
            buffer = staging[i] = torch.empty_like(ref)
        buffers.append(buffer)
        sources.append(t)
        out.append(buffer)
    if buffers:
        torch._foreach_copy_(buffers, sources, non_blocking=non_blocking)
    return out


def storage_key(t: Tensor) -> tuple | None:
    """What makes two tensors one tensor in memory; None where that cannot be told (meta or empty tensors)."""
    if t.device.type == "meta" or t.numel() == 0:
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def find_aliases(tensors: Mapping[str, Tensor]) -> tuple[tuple[str, str], ...]:
    """``(alias, source)`` pairs: later names that are the same tensor in memory as an earlier one."""
    first: dict[tuple, str] = {}
    aliases = []
    for name, t in tensors.items():
        key = storage_key(t)
        if key is None:
            continue
        if key in first:
            aliases.append((name, first[key]))
        else:
            first[key] = name
    return tuple(aliases)


def follow_devices(accumulators: list[Tensor], weights: list[Tensor]) -> list[Tensor]:
    """``accumulators`` moved to their weights' devices where they differ (after a load from a CPU checkpoint)."""
    return [a if a.device == w.device else a.to(w.device) for a, w in zip(accumulators, weights)]


@dataclasses.dataclass(frozen=True)
class Layout:
    """What the first observation fixed: order, shapes and dtypes of every tensor, which are floats, and which
    names alias an earlier one (``(alias, source)``; aliases are neither averaged nor stored)."""
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    aliases: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, tensors: Mapping[str, Tensor]) -> "Layout":
        return cls(tuple(tensors), tuple(tuple(t.shape) for t in tensors.values()),
                   tuple(t.dtype for t in tensors.values()), find_aliases(tensors))

    @property
    def float_names(self) -> list[str]:
        aliased = {alias for alias, _ in self.aliases}
        return [n for n, d in zip(self.names, self.dtypes) if d.is_floating_point and n not in aliased]

    @property
    def other_names(self) -> list[str]:
        aliased = {alias for alias, _ in self.aliases}
        return [n for n, d in zip(self.names, self.dtypes) if not d.is_floating_point and n not in aliased]

    def mismatch(self, tensors: Mapping[str, Tensor]) -> str | None:
        """A one-line description of how ``tensors`` differ from this layout, or None."""
        if tuple(tensors) != self.names:
            missing = sorted(set(self.names) - set(tensors))
            extra = sorted(set(tensors) - set(self.names))
            return f"keys differ from the first observation (missing: {missing or '-'}; extra: {extra or '-'})"
        for name, shape, dtype, t in zip(self.names, self.shapes, self.dtypes, tensors.values()):
            if tuple(t.shape) != shape or t.dtype != dtype:
                return f"'{name}' is {t.dtype} {tuple(t.shape)}, the first observation had {dtype} {shape}"
        for alias, source in self.aliases:  # averaged once: they must still hold one value
            a, b = tensors[alias], tensors[source]
            if storage_key(a) != storage_key(b) and not torch.equal(a, b):
                return f"'{alias}' was the same tensor as '{source}' in the first observation; now it differs"
        return None

    def to_json(self) -> dict[str, Any]:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes],
                "dtypes": [str(d).removeprefix("torch.") for d in self.dtypes],
                "aliases": [list(pair) for pair in self.aliases]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Layout":
        return cls(tuple(data["names"]), tuple(tuple(s) for s in data["shapes"]),
                   tuple(getattr(torch, d) for d in data["dtypes"]),
                   tuple((a, b) for a, b in data.get("aliases", ())))  # states saved before aliases: none
