"""What the CUDA stand-in puts in place of ``torch.cuda``, ``torch.accelerator``, ``torch.Generator`` and the
collectives of ``torch.distributed`` while it is active (``cuda_standin.py`` patches them in and back out).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

from lawa_suite.testing._standin_device import (_DEVICE_COUNT, _LOCAL_RANK, DEVICE, StandInTensor, _is_cuda,
                                                require_active)

class _Event:
    """``torch.cuda.Event``. The stand-in's device finishes work at once, but the host cannot know that before it
    has waited for something: ``query()`` is true once any synchronisation came after ``record()`` (a blocking read
    drains the stream up to it), as on a GPU whose queue is busy."""

    def __init__(self, enable_timing: bool = False, **_: Any) -> None:
        self.recorded_at: int | None = None

    def record(self, stream: Any = None) -> None:
        self.recorded_at = require_active().syncs

    def synchronize(self) -> None:
        device = require_active()
        device.waits += 1
        device.drain()

    def query(self) -> bool:
        return self.recorded_at is None or require_active().syncs > self.recorded_at

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
        device = require_active()
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
