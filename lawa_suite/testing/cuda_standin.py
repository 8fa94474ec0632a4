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
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from lawa_suite.testing._standin_api import (_COLLECTIVES, _accelerator_functions, _cuda_functions,
                                             _forget_accelerate_state, _Generator, _gloo_for_nccl, _guard_collective)
from lawa_suite.testing._standin_device import (DEVICE, StandInDevice, StandInTensor, _Factories, _Functions, active,
                                                require_active, set_active)

__all__ = ["StandInTensor", "StandInDevice", "cuda_standin", "standin_tensors", "DEVICE"]


@contextlib.contextmanager
def cuda_standin() -> Iterator[StandInDevice]:
    """Run the enclosed code as on a machine with one CUDA GPU (see the module docstring); yields the device's
    counters. Not re-entrant; every patch is undone on exit."""
    if active() is not None:
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
    set_active(device)
    try:
        with _Functions(device), _Factories(device):
            yield device
    finally:
        set_active(None)
        for owner, name, value in reversed(patched):
            setattr(owner, name, value)
        torch.__future__.set_swap_module_params_on_conversion(swapped)
        _forget_accelerate_state()


def standin_tensors(tensors: Any) -> Any:
    """``tensors`` (any nesting) with every CPU tensor replaced by a stand-in CUDA copy."""
    require_active()
    return tree_map(lambda t: t.to(DEVICE) if isinstance(t, Tensor) else t, tensors)

