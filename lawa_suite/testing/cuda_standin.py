"""A CUDA stand-in for machines without a GPU: the suite's CUDA code paths, run on the CPU, in CI.

``with cuda_standin() as device:`` makes this process look like one with a CUDA GPU. ``torch.cuda.is_available()``
is true; a tensor created on or moved to ``"cuda"`` is a ``StandInTensor``: it reports ``cuda:0`` (``is_cuda``,
``.device``) while its data lives in an ordinary host tensor, on which every operation runs. It refuses what CUDA
refuses, so a code path that would crash on a GPU crashes here:

- an operation mixing it with a host tensor (``Expected all tensors to be on the same device``), except where CUDA
  allows it: a 0-dim host tensor as a scalar operand of a pointwise op, copies (``copy_``, ``to``, ``_foreach_copy_``),
  and host index tensors; ``torch.cat``/``torch.stack`` take no host tensor at all, 0-dim or not;
- a foreach op pairing, at some position of its lists, a device tensor with a host one (CUDA's foreach kernels
  fall back to per-tensor ops, which then refuse);
- a collective (``torch.distributed``) on a host tensor while a process group is up: on GPUs accelerate starts an
  ``nccl`` group, which takes device tensors only (collectives on stand-in tensors run on their host data);
- ``.numpy()`` of a device tensor.

It counts what would make the host wait for the device (``device.reads``: ``.item()``, ``bool()``, ``.tolist()``,
a blocking copy to host memory; ``device.uploads``: blocking copies from pageable host memory; ``device.waits``:
``torch.cuda.synchronize`` and ``Event.synchronize``), what ``torch.cuda.set_sync_debug_mode`` would flag. A
non-blocking copy into pinned memory (``torch.empty(..., pin_memory=True)``, ``Tensor.pin_memory()``) is not a
read; the host may read such a buffer only after waiting for an event recorded after the copy or synchronizing
(``device.check_waited(buffers)`` asserts that, as code that waits would have), and it is held as "in flight"
until then.

Several processes (torchrun, accelerate launch): each process's one device is its own GPU, ``cuda:<LOCAL_RANK>`` of
``LOCAL_WORLD_SIZE`` (one process alone: ``cuda:0``). A process group asked for with ``nccl`` is a ``gloo`` group: gloo
runs every collective on the stand-in tensors' host data, those of the Python API (``all_reduce``...) and the C++
ones of DDP's reducer (c10d ops, dispatched to the stand-in), so DDP trains as on GPUs. CUDA's rule differs here:
NCCL writes its results into device memory, while gloo hands a C++ collective's result back through its future as
the host tensor it ran on; the stand-in remembers those host tensors and counts a copy out of one as a device copy
(not an upload). FSDP2 does not run on the stand-in: its DTensors take their device from the C++ side of a shard,
which for a stand-in tensor is the meta device.

What it cannot copy, and so does not claim: the device runs everything at once, in program order, on one stream.
Stream and event ordering between streams (DDP's overlap of all-reduce and backward), kernel timing, memory limits,
atomics' nondeterminism, TF32 and cuDNN numerics, NCCL itself, and compiled (inductor/triton) code are not modelled;
``torch.compile`` is refused. A process has one device: a tensor made on another index lands on it too. bf16
autocast runs through PyTorch's CUDA autocast rules (the stand-in tensor carries the CUDA dispatch keys); fp16
``GradScaler`` is not supported.

Public, like ``torch.testing``: plugins can run their averagers' CUDA paths through it. It changes process-wide
state (``torch.cuda``'s functions, ``torch.Generator``, ``torch.distributed``'s collectives and
``init_process_group``) only inside the
``with`` block, and puts all of it back on exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["StandInTensor", "StandInDevice", "cuda_standin", "standin_tensors", "DEVICE"]

# A process that torchrun or accelerate launch started is one of LOCAL_WORLD_SIZE on its node, and its GPU is the
# LOCAL_RANK-th, as on a GPU node; one process alone has cuda:0
_LOCAL_RANK = int(os.environ.get("LOCAL_RANK", "0") or 0)
DEVICE = torch.device("cuda", _LOCAL_RANK)
_DEVICE_COUNT = max(_LOCAL_RANK + 1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
_active: StandInDevice | None = None  # one per process: what it patches is process-wide

# ops that may take a host tensor beside a device one: copies between them, and host index tensors
_CROSS_DEVICE = {"aten::copy_", "aten::_to_copy", "aten::_foreach_copy_", "aten::index", "aten::index_put_",
                 "aten::_index_put_impl_", "aten::lift_fresh", "aten::_local_scalar_dense"}
# ops that take no host tensor at all, not even a 0-dim one
_NO_SCALARS = {"aten::cat", "aten::stack"}
class StandInTensor(torch.Tensor):
    """A tensor that reports ``cuda:0`` and keeps its data in ``host`` (a CPU tensor of the same shape, strides
    and dtype). Made only while ``cuda_standin`` is active."""

    host: Tensor

    @staticmethod
    def __new__(cls, host: Tensor, requires_grad: bool = False) -> StandInTensor:
        wrapper = torch.Tensor._make_wrapper_subclass(
            cls, host.shape, strides=host.stride(), storage_offset=host.storage_offset(), dtype=host.dtype,
            device="meta", requires_grad=requires_grad)
        wrapper.host = host
        return wrapper

    # PyTorch's C++ side sees a meta tensor (autograd records the current stream of a tensor's device, which for
    # a real "cuda" device starts the CUDA runtime); Python code sees cuda:0
    @property
    def device(self) -> torch.device:
        return DEVICE

    @property
    def is_cuda(self) -> bool:
        return True

    @property
    def is_meta(self) -> bool:
        return False

    def get_device(self) -> int:
        return _LOCAL_RANK

    def __repr__(self) -> str:  # noqa: D105 - the host tensor's text, on its stand-in device
        return f"StandInTensor({self.host!r}, device='{DEVICE}')"

    # what tells two tensors apart in memory (aliases of tied weights) is the host data's
    def untyped_storage(self) -> torch.UntypedStorage:
        return self.host.untyped_storage()

    def data_ptr(self) -> int:
        return self.host.data_ptr()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        device = _active
        if device is None:
            raise RuntimeError(f"{func}: a stand-in CUDA tensor was used after cuda_standin() ended")
        return device.dispatch(func, args, kwargs or {})


@dataclasses.dataclass
class StandInDevice:
    """The active stand-in: its counters, its pinned buffers, its rules. Yielded by ``cuda_standin``."""
    reads: int = 0      # blocking device-to-host transfers (.item(), .tolist(), .cpu(), copy_ into pageable memory)
    uploads: int = 0    # blocking host-to-device copies (non_blocking=False: torch then synchronizes the stream)
    # non-blocking uploads from pageable memory: the driver stages them through a host copy at the call (no device
    # synchronization, but the host does the copy); from pinned memory they are queued and cost the host nothing
    pageable_uploads: int = 0
    waits: int = 0      # torch.cuda.synchronize(), Event.synchronize(), Stream.synchronize()
    collectives: int = 0
    explicit_meta: bool = False  # the Python call under way asked for the meta device itself
    # pinned host buffers by storage address (a weak reference: a freed buffer's address may come back unpinned)
    _pinned: dict[int, weakref.ref] = dataclasses.field(default_factory=dict, repr=False)
    # pinned buffers a queued copy writes to, and the sync count then; held until the host waits (so their
    # addresses are not reused): any synchronisation after the copy was queued means it has landed
    _in_flight: dict[int, tuple[Tensor, int]] = dataclasses.field(default_factory=dict, repr=False)
    # host data of stand-in tensors that a C++ collective (DDP's gradient buckets) ran on, by storage address: gloo
    # hands that data back through the collective's future, and copies out of it are device-to-device copies
    _collective_hosts: dict[int, weakref.ref] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def syncs(self) -> int:
        """Everything ``torch.cuda.set_sync_debug_mode`` would flag."""
        return self.reads + self.uploads + self.waits

    # -- pinned memory --
    def pin(self, t: Tensor) -> Tensor:
        self._pinned[t.untyped_storage().data_ptr()] = weakref.ref(t)
        return t

    def is_pinned(self, t: Tensor) -> bool:
        if isinstance(t, StandInTensor) or not t.numel():
            return False
        owner = self._pinned.get(t.untyped_storage().data_ptr())
        alive = owner() if owner is not None else None
        return alive is not None and alive.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()

    def on_device(self, t: Tensor) -> bool:
        """Whether host tensor ``t`` is a collective's result: a stand-in tensor's data, handed back by gloo."""
        if not t.numel():
            return False
        owner = self._collective_hosts.get(t.untyped_storage().data_ptr())
        alive = owner() if owner is not None else None
        return alive is not None and alive.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()

    def queue_into(self, t: Tensor) -> None:
        """A non-blocking device-to-host copy into ``t`` was queued."""
        self._in_flight[t.untyped_storage().data_ptr()] = (t, self.syncs)

    def drain(self) -> None:
        """The host waited for the device: every queued copy is done."""
        self._in_flight.clear()

    def check_waited(self, tensors: list[Tensor]) -> None:
        """Refuse a host read of pinned buffers that a queued copy may still be writing."""
        self._in_flight = {ptr: (t, at) for ptr, (t, at) in self._in_flight.items() if at == self.syncs}
        for t in tensors:
            if not isinstance(t, StandInTensor) and t.numel() and t.untyped_storage().data_ptr() in self._in_flight:
                raise RuntimeError("a pinned host buffer was read before the device-to-host copy into it was waited "
                                   "for (record an event after the copy and synchronize it first)")

    # -- operations on stand-in tensors --
    def dispatch(self, func, args: tuple, kwargs: dict) -> Any:
        name = func._schema.name
        self._check_devices(name, args, kwargs)
        if name == "aten::_local_scalar_dense":
            self.reads += 1
        if name == "aten::_to_copy":
            return self._to_copy(args[0], kwargs)
        if name in ("aten::copy_", "aten::_foreach_copy_"):
            self._count_copies(args, kwargs)
        hosts: dict[int, StandInTensor] = {}

        def unwrap(value):
            if isinstance(value, StandInTensor):
                hosts[id(value.host)] = value
                return value.host
            # cuda, or meta from a stand-in tensor's own options in C++ (new_empty_strided in AccumulateGrad)
            if isinstance(value, torch.device) and (value.type == "cuda" or (value.type == "meta"
                                                                              and not self.explicit_meta)):
                return torch.device("cpu")
            return value

        host_args, host_kwargs = tree_map(unwrap, args), tree_map(unwrap, kwargs)
        if any(isinstance(t, Tensor) and t.is_meta for t in tree_flatten((host_args, host_kwargs))[0]):
            raise NotImplementedError(f"{name}: an operand without data reached the CUDA stand-in (a C++ composite "
                                      f"made it with the stand-in's meta options); the stand-in cannot run this op")
        if name.startswith("c10d::"):
            self.collectives += 1
            for t in hosts.values():
                self._collective_hosts[t.host.untyped_storage().data_ptr()] = weakref.ref(t.host)
        out = func(*host_args, **host_kwargs)
        if name in ("aten::_local_scalar_dense", "aten::is_pinned"):
            return out

        def wrap(value):
            if isinstance(value, Tensor) and not isinstance(value, StandInTensor):
                same = hosts.get(id(value))  # in-place ops return their input itself
                return same if same is not None else StandInTensor(value)
            return value

        if name.startswith("aten::_foreach_") and isinstance(out, (list, tuple)):  # output i: input i's device
            first = next(a for a in args if isinstance(a, (list, tuple)))
            return [wrap(o) if isinstance(t, StandInTensor) else o for o, t in zip(out, first)]
        return tree_map(wrap, out)

    def _to_copy(self, source: StandInTensor, kwargs: dict) -> Tensor:
        target = kwargs.pop("device", None)
        non_blocking = kwargs.pop("non_blocking", False)
        kwargs.pop("pin_memory", None)
        host = torch.ops.aten._to_copy.default(source.host, **kwargs)
        if target is not None and torch.device(target).type == "cpu":
            if non_blocking:  # torch returns pinned memory for a non-blocking copy to the host
                self.queue_into(self.pin(host))
            else:
                self.reads += 1
            return host
        return StandInTensor(host)

    def _count_copies(self, args: tuple, kwargs: dict) -> None:
        dsts, srcs = args[0], args[1]
        pairs = zip(dsts, srcs) if isinstance(dsts, (list, tuple)) else [(dsts, srcs)]
        non_blocking = kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
        for dst, src in pairs:
            down = isinstance(src, StandInTensor) and not isinstance(dst, StandInTensor)
            up = isinstance(dst, StandInTensor) and not isinstance(src, StandInTensor) and not self.on_device(src)
            if down and non_blocking and self.is_pinned(dst):
                self.queue_into(dst)
            elif down:
                self.reads += 1
            elif up:  # (an upload is ordered after the copies queued before it: no wait needed)
                self._count_upload(src, non_blocking)

    def _count_upload(self, source: Tensor, non_blocking: bool) -> None:
        if not non_blocking:
            self.uploads += 1
        elif not self.is_pinned(source):
            self.pageable_uploads += 1

    def _check_devices(self, name: str, args: tuple, kwargs: dict) -> None:
        if name in _CROSS_DEVICE:
            return
        if name.startswith("aten::_foreach_"):  # position by position across the lists
            lists = [a for a in (*args, *kwargs.values()) if isinstance(a, (list, tuple)) and a
                     and isinstance(a[0], Tensor)]
            singles = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
            for group in zip(*lists):
                self._same_device(name, [*group, *singles])
            return
        self._same_device(name, [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)])

    @staticmethod
    def _same_device(name: str, tensors: list[Tensor]) -> None:
        if not any(isinstance(t, StandInTensor) for t in tensors):
            return
        strict = name in _NO_SCALARS
        host = [t for t in tensors if not isinstance(t, StandInTensor) and (strict or t.dim() > 0)]
        if host:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"{DEVICE} and cpu! ({name}, through the CUDA stand-in)")


# CUDA autocast's op lists (aten/src/ATen/autocast_mode.cpp), for the functions the suite's models call
_F = torch.nn.functional
_AUTOCAST_LOW = {_F.linear, torch.matmul, Tensor.matmul, Tensor.__matmul__, Tensor.__rmatmul__, torch.mm, Tensor.mm,
                 torch.bmm, Tensor.bmm, torch.addmm, Tensor.addmm, torch.baddbmm, Tensor.baddbmm, torch.addbmm,
                 torch.mv, torch.einsum, _F.conv1d, _F.conv2d, _F.conv3d, _F.conv_transpose1d, _F.conv_transpose2d,
                 _F.scaled_dot_product_attention, torch.addmv}
_AUTOCAST_FP32 = {_F.softmax, torch.softmax, Tensor.softmax, _F.log_softmax, torch.log_softmax, Tensor.log_softmax,
                  _F.layer_norm, _F.group_norm, _F.cross_entropy, _F.nll_loss, _F.mse_loss, _F.l1_loss,
                  _F.smooth_l1_loss, _F.huber_loss, _F.binary_cross_entropy_with_logits, _F.kl_div, _F.softplus,
                  torch.exp, Tensor.exp, torch.log, Tensor.log, torch.pow, Tensor.pow, torch.rsqrt, Tensor.rsqrt,
                  torch.logsumexp, torch.cumsum, Tensor.cumsum, _F.interpolate, torch.norm, torch.linalg.vector_norm}

# what reads no tensor data (metadata, views), so may touch a buffer a queued copy still writes
_NOT_READS = {Tensor.is_pinned, Tensor.untyped_storage, Tensor.data_ptr, Tensor.numel, Tensor.dim, Tensor.size,
              Tensor.stride, Tensor.storage_offset, Tensor.element_size, Tensor.is_contiguous, Tensor.is_floating_point,
              Tensor.__len__, Tensor.nelement, Tensor.detach, Tensor.view, Tensor.reshape, Tensor.__hash__}


class _Factories(TorchDispatchMode):
    """Tensors PyTorch's C++ code makes from a stand-in tensor's options (the autograd engine's gradient buffers,
    composites' masks) would be meta tensors, without data: they are made as stand-in tensors instead. Every other
    op passes through untouched (a meta tensor the Python code asked for stays one)."""

    def __init__(self, device: StandInDevice) -> None:
        super().__init__()
        self.device = device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "meta" and not self.device.explicit_meta:
            operands = [t for t in tree_flatten(args)[0] if isinstance(t, Tensor)]
            if not operands:
                return StandInTensor(func(*args, **{**kwargs, "device": torch.device("cpu")}))
            # a C++ copy of a host tensor to a stand-in tensor's device (DDP's parameter-shape check)
            if func is torch.ops.aten._to_copy.default and not isinstance(operands[0], StandInTensor):
                self.device._count_upload(operands[0], bool(kwargs.get("non_blocking", False)))
                return StandInTensor(func(*args, **{**kwargs, "device": torch.device("cpu")}))
        return func(*args, **kwargs)


class _Functions(TorchFunctionMode):
    """What must be caught before PyTorch's C++ argument handling, which would start the real CUDA runtime:
    factories and ``Tensor.to``/``.cuda``/``.cpu`` naming a CUDA device, pinned allocation, ``is_pinned``."""

    def __init__(self, device: StandInDevice) -> None:
        super().__init__()
        self.device = device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        cast = _autocast_dtype(func)
        if cast is not None and any(isinstance(t, StandInTensor) for t in tree_flatten((args, kwargs))[0]):
            args, kwargs = tree_map(lambda v: _cast_float(v, cast), (args, kwargs))
        if func in (Tensor.to, Tensor.cuda, Tensor.cpu):
            moved = self._move(func, args, kwargs)
            if moved is not NotImplemented:
                return moved
        if self.device._in_flight and func not in _NOT_READS and getattr(func, "__name__", "") != "__get__":
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
            if not any(isinstance(t, StandInTensor) for t in tensors):  # a host op: it reads its operands now
                self.device.check_waited(tensors)
        if func is torch.nn.functional.scaled_dot_product_attention and isinstance(args[0], StandInTensor):
            return _attention(*args, **kwargs)
        if func is Tensor.is_pinned:
            return self.device.is_pinned(args[0])
        if func is Tensor.pin_memory:
            return self.device.pin(args[0].clone())
        if func is Tensor.tolist and isinstance(args[0], StandInTensor):
            self.device.reads += 1
            return args[0].host.tolist()
        if func is Tensor.numpy and isinstance(args[0], StandInTensor):
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                            "to host memory first.")
        pinned = bool(kwargs.pop("pin_memory", False))
        device = kwargs.get("device")
        if device is not None and not isinstance(device, int) and torch.device(device).type == "meta":
            self.device.explicit_meta = True  # (module.to_empty and meta-device probes: their meta stays meta)
            try:
                return func(*args, **kwargs)
            finally:
                self.device.explicit_meta = False
        on_device = _is_cuda(device)
        if on_device and any(isinstance(t, StandInTensor) for t in tree_flatten(args)[0]):
            kwargs.pop("device")  # (torch.as_tensor of a device tensor: it is there already)
            on_device = False
        if on_device:
            kwargs["device"] = "cpu"
        out = func(*args, **kwargs)
        if on_device:
            out = tree_map(lambda t: StandInTensor(t) if type(t) is Tensor else t, out)
        elif pinned:
            out = tree_map(lambda t: self.device.pin(t) if isinstance(t, Tensor) else t, out)
        return out

    def _move(self, func, args: tuple, kwargs: dict) -> Any:
        """``Tensor.to``/``.cuda``/``.cpu`` where the source or the target is the stand-in device, else
        NotImplemented. Between stand-in tensors through ``aten._to_copy``, so autograd records it."""
        source, kwargs = args[0], dict(kwargs)
        copy, memory_format = bool(kwargs.pop("copy", False)), None
        if func is Tensor.cuda:
            target, dtype, non_blocking = DEVICE, None, bool(kwargs.get("non_blocking", False))
        elif func is Tensor.cpu:
            target, dtype, non_blocking = torch.device("cpu"), None, False
        elif func is Tensor.to:
            target, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args[1:], **kwargs)
        else:
            return NotImplemented
        on_device = isinstance(source, StandInTensor)
        to_device = _is_cuda(target) or (target is None and on_device)
        if not (on_device or to_device):
            return NotImplemented
        dtype = dtype or source.dtype
        layout = {} if memory_format is None else {"memory_format": memory_format}
        if on_device and to_device:
            if dtype == source.dtype and not copy and memory_format in (None, torch.preserve_format):
                return source
            return torch.ops.aten._to_copy.default(source, dtype=dtype, **layout)
        if on_device:
            return torch.ops.aten._to_copy.default(source, dtype=dtype, device=torch.device("cpu"),
                                                   non_blocking=non_blocking, **layout)
        self.device._count_upload(source, non_blocking)
        host = torch.ops.aten._to_copy.default(source.detach(), dtype=dtype, **layout)
        return StandInTensor(host, requires_grad=source.requires_grad)


def _attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
               is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Tensor:
    """``scaled_dot_product_attention`` in plain ops: PyTorch's own math fallback builds its causal mask in C++ with
    the query's options, which for a stand-in tensor are the meta device's (no data)."""
    scale = scale if scale is not None else query.size(-1) ** -0.5
    if enable_gqa and key.size(-3) != query.size(-3):
        repeat = query.size(-3) // key.size(-3)
        key, value = key.repeat_interleave(repeat, dim=-3), value.repeat_interleave(repeat, dim=-3)
    scores = (query @ key.transpose(-2, -1)) * scale
    if is_causal:
        # (made on the host and wrapped: inside the function mode's handler a factory would reach CUDA itself)
        keep = StandInTensor(torch.ones(query.size(-2), key.size(-2), dtype=torch.bool).tril())
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    weights = torch.softmax(scores, dim=-1)
    if dropout_p:
        weights = torch.nn.functional.dropout(weights, dropout_p)
    return weights @ value


def _autocast_dtype(func: Callable) -> torch.dtype | None:
    """The dtype CUDA autocast runs ``func`` in, or None. The stand-in casts before the call, above autograd, as
    autocast does (its dispatch key comes before autograd's): a stand-in tensor's C++ side is a meta tensor, which
    CUDA autocast does not see."""
    if not torch.is_autocast_enabled("cuda"):
        return None
    if func in _AUTOCAST_LOW:
        return torch.get_autocast_dtype("cuda")
    return torch.float32 if func in _AUTOCAST_FP32 else None


def _cast_float(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != torch.float64:
        return value.to(dtype)
    return value


def _is_cuda(device: Any) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True  # a bare index means a CUDA device
    return torch.device(device).type == "cuda"


# -- torch.cuda, torch.Generator and collectives, while the stand-in is active ---------------------------------
class _Event:
    """``torch.cuda.Event``. The stand-in's device finishes work at once, but the host cannot know that before it
    has waited for something: ``query()`` is true once any synchronisation came after ``record()`` (a blocking read
    drains the stream up to it), as on a GPU whose queue is busy."""

    def __init__(self, enable_timing: bool = False, **_: Any) -> None:
        self.recorded_at: int | None = None

    def record(self, stream: Any = None) -> None:
        self.recorded_at = _require_active().syncs

    def synchronize(self) -> None:
        device = _require_active()
        device.waits += 1
        device.drain()

    def query(self) -> bool:
        return self.recorded_at is None or _require_active().syncs > self.recorded_at

    def wait(self, stream: Any = None) -> None:  # a device-side wait: the host goes on
        pass

    def elapsed_time(self, other: _Event) -> float:
        return 0.0


class _Stream:
    device = DEVICE

    def __init__(self, device: Any = None, priority: int = 0, **_: Any) -> None:
        pass

    def wait_stream(self, other: _Stream) -> None:
        pass

    def wait_event(self, event: _Event) -> None:
        pass

    def record_event(self, event: _Event | None = None) -> _Event:
        event = event or _Event()
        event.record(self)
        return event

    def synchronize(self) -> None:
        _Event().synchronize()

    def query(self) -> bool:
        return True

    def is_capturing(self) -> bool:
        return False

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def _require_active() -> StandInDevice:
    if _active is None:
        raise RuntimeError("the CUDA stand-in is not active")
    return _active


def _synchronize(device: Any = None) -> None:
    _Event().synchronize()


def _cuda_functions() -> dict[str, Any]:
    default = _Stream()
    rng = [torch.zeros(16, dtype=torch.uint8)]
    return {
        "is_available": lambda: True, "device_count": lambda: _DEVICE_COUNT,
        "current_device": lambda: _LOCAL_RANK,
        "set_device": lambda device: None, "_lazy_init": lambda: None, "is_initialized": lambda: True,
        "synchronize": _synchronize, "Event": _Event, "Stream": _Stream,
        "current_stream": lambda device=None: default, "default_stream": lambda device=None: default,
        "stream": lambda s=None: contextlib.nullcontext(), "set_sync_debug_mode": lambda mode: None,
        "get_rng_state_all": lambda: [r.clone() for r in rng], "set_rng_state_all": lambda states: None,
        "get_rng_state": lambda device="cuda": rng[0].clone(), "set_rng_state": lambda state, device="cuda": None,
        "manual_seed_all": lambda seed: None, "manual_seed": lambda seed: None,
        "is_bf16_supported": lambda including_emulation=True: True,
        "get_device_capability": lambda device=None: (9, 0), "get_device_name": lambda device=None: "CUDA stand-in",
        "memory_allocated": lambda device=None: 0, "max_memory_allocated": lambda device=None: 0,
        "reset_peak_memory_stats": lambda device=None: None, "empty_cache": lambda: None,
        "is_current_stream_capturing": lambda: False,
    }


def _accelerator_functions() -> dict[str, Any]:
    default = _Stream()
    return {
        "is_available": lambda: True, "device_count": lambda: _DEVICE_COUNT,
        "current_device_index": lambda: _LOCAL_RANK,
        "current_accelerator": lambda check_available=False: DEVICE, "set_device_index": lambda device: None,
        "current_stream": lambda device=None: default, "synchronize": _synchronize,
    }


class _CudaGenerator(torch._C.Generator):
    """A CUDA generator: a CPU generator that reports ``cuda:0`` (so code that draws "where the generator
    lives" draws on the device; the draws themselves come from the CPU's generator)."""

    @property
    def device(self) -> torch.device:
        return DEVICE


class _GeneratorType(type(torch._C.Generator)):
    """``torch.Generator`` while the stand-in is active: ``torch.Generator(device="cuda")`` makes a
    ``_CudaGenerator``, and every generator is still an instance of it."""

    def __call__(cls, device: Any = "cpu") -> torch.Generator:
        return _CudaGenerator("cpu") if _is_cuda(device) else torch._C.Generator(device)

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, torch._C.Generator)


class _Generator(torch._C.Generator, metaclass=_GeneratorType):
    pass


def _host_of(value: Any) -> Any:
    return value.host if isinstance(value, StandInTensor) else value


def _guard_collective(original: Callable) -> Callable:
    def collective(*args: Any, **kwargs: Any) -> Any:
        device = _require_active()
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        if any(not isinstance(t, StandInTensor) for t in tensors):
            raise RuntimeError(f"{original.__name__}: a host tensor handed to a collective; the nccl process group "
                               f"accelerate starts on GPUs takes CUDA tensors only (through the CUDA stand-in)")
        device.collectives += 1
        return original(*tree_map(_host_of, args), **tree_map(_host_of, kwargs))
    return collective


def _gloo_for_nccl(original: Callable) -> Callable:
    """``init_process_group``: a group asked for on CUDA (``nccl``, what accelerate asks for when a GPU is there) is
    a gloo group, which runs the collectives on the stand-in tensors' host data."""
    def init_process_group(*args: Any, backend: str | None = None, **kwargs: Any) -> Any:
        if args:
            backend, args = args[0], args[1:]
        if backend is None or "nccl" in str(backend):
            backend = "gloo"
        return original(backend, *args, **kwargs)
    return init_process_group


_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
                "reduce", "gather", "scatter", "all_to_all_single")


def _forget_accelerate_state() -> None:
    state = sys.modules.get("accelerate.state")
    if state is not None and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        state.AcceleratorState._reset_state(reset_partial_state=True)


@contextlib.contextmanager
def cuda_standin() -> Iterator[StandInDevice]:
    """Run the enclosed code as on a machine with one CUDA GPU (see the module docstring); yields the device's
    counters. Not re-entrant; every patch is undone on exit."""
    global _active
    if _active is not None:
        raise RuntimeError("cuda_standin() is already active")
    device = StandInDevice()
    patched: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, value: Any) -> None:
        patched.append((owner, name, getattr(owner, name, None)))
        setattr(owner, name, value)

    for name, value in _cuda_functions().items():
        patch(torch.cuda, name, value)
    for name, value in _accelerator_functions().items():
        patch(torch.accelerator, name, value)
    patch(torch, "Generator", _Generator)
    if torch.distributed.is_available():
        for name in _COLLECTIVES:
            patch(torch.distributed, name, _guard_collective(getattr(torch.distributed, name)))
        patch(torch.distributed, "init_process_group", _gloo_for_nccl(torch.distributed.init_process_group))
    _forget_accelerate_state()  # accelerate keeps the device it found in a process-wide singleton
    # module.to("cuda") swaps each parameter in place, as it does for real CUDA tensors (it can not set .data of a
    # host parameter to a stand-in tensor, so it would make new parameters and untie tied weights)
    swapped = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    _active = device
    try:
        with _Functions(device), _Factories(device):
            yield device
    finally:
        _active = None
        for owner, name, value in reversed(patched):
            setattr(owner, name, value)
        torch.__future__.set_swap_module_params_on_conversion(swapped)
        _forget_accelerate_state()


def standin_tensors(tensors: Any) -> Any:
    """``tensors`` (any nesting) with every CPU tensor replaced by a stand-in CUDA copy."""
    _require_active()
    return tree_map(lambda t: t.to(DEVICE) if isinstance(t, Tensor) else t, tensors)

