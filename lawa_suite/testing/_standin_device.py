"""The CUDA stand-in's device: ``StandInTensor`` (reports ``cuda``, computes on host data), ``StandInDevice`` (its
counters, pinned buffers and the rules CUDA enforces), and the dispatch and function modes that route operations
through it. ``cuda_standin.py`` is the entry point and says what the stand-in does and does not model.
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["StandInTensor", "StandInDevice", "DEVICE", "active", "require_active", "set_active"]


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


def require_active() -> StandInDevice:
    if _active is None:
        raise RuntimeError("the CUDA stand-in is not active")
    return _active


def active() -> StandInDevice | None:
    return _active


def set_active(device: StandInDevice | None) -> None:
    """One stand-in per process: what it patches is process-wide."""
    global _active
    _active = device
