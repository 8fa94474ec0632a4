"""What a run's memory is made of, read off a model built on a fake CUDA device (``memory_plan.py`` adds it up per
rank): the model's parameters and optimizer state (``model_facts``), each averager's state and where it lives
(``averager_parts``), and the bytes one micro-batch's forward saves for backward (``measure_activations``).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["Entry", "StateTensor", "ModelFacts", "Part", "Activations", "fake_device", "build_model", "model_facts",
           "averager_parts", "averager_checkpoint_bytes", "saved_bytes", "mixed_precision", "example_loss",
           "measure_activations", "itemsize", "dtype_name"]


# -- what the model is made of ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One tensor of the model's state_dict (or one unique parameter)."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    parameter: bool              # sharded by FSDP2 (buffers are not)
    alias_of: str | None = None  # a later name for the same tensor (GPT-2's tied head): averaged and swapped once

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def local_numel(self, world: int) -> int:
        """Elements on rank 0 (the largest shard) when sharded over ``world`` ranks."""
        if world == 1 or not self.parameter or not self.shape:
            return self.numel
        return -(-self.shape[0] // world) * math.prod(self.shape[1:])

    def local_bytes(self, world: int, dtype: torch.dtype | None = None) -> int:
        return self.local_numel(world) * itemsize(dtype or self.dtype)


@dataclass(frozen=True)
class StateTensor:
    """One tensor of the optimizer's state: of a parameter's shape (sharded with it) or not (a step counter)."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    on_device: bool
    like_parameter: bool


@dataclass
class ModelFacts:
    parameters: list[Entry]          # unique parameters (tied ones once)
    state: list[Entry]               # the state_dict, every name (a checkpoint and a trajectory file hold them all)
    optimizer: list[tuple[Entry, list[StateTensor]]]  # per unique parameter, what the optimizer keeps for it
    optimizer_name: str
    units: list[int]                 # FSDP units' parameter counts, the root's first (sharding.shard_model's)

    @property
    def parameter_count(self) -> int:
        return sum(e.numel for e in self.parameters)

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype (the most common one, by elements)."""
        by: dict[torch.dtype, int] = {}
        for e in self.parameters:
            by[e.dtype] = by.get(e.dtype, 0) + e.numel
        return max(by, key=by.__getitem__) if by else torch.float32

    @property
    def floats(self) -> list[Entry]:
        """What an averager averages: float entries of the state_dict, aliases once (``Layout.float_names``)."""
        return [e for e in self.state if e.dtype.is_floating_point and e.alias_of is None]

    @property
    def others(self) -> list[Entry]:
        """What an averager copies from the newest observation: the non-float entries (``Layout.other_names``)."""
        return [e for e in self.state if not e.dtype.is_floating_point and e.alias_of is None]


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    """``averagers._tensors.accumulation_dtype``: float32, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _storage(t: Tensor) -> int:
    """What makes two tensors one in memory, for fake and meta tensors too (their data pointers are all 0)."""
    return t.untyped_storage()._cdata


def _same_tensor_key(t: Tensor) -> tuple:
    return (_storage(t), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


@contextlib.contextmanager
def fake_device(device: str = "cuda", mode: Any = None) -> Iterator[Any]:
    """Tensors made inside are fake: no memory, ``device`` as they report it (CUDA without a GPU), in ``mode`` (a
    ``FakeTensorMode`` to go on with: its tensors and the new ones may meet) or a new one. Warnings (a fake optimizer
    step's, a library's about a missing GPU) are kept out of the plan's output; RNG is left as it was."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")
        mode = mode or FakeTensorMode(allow_non_fake_inputs=True)
        with mode, torch.device(device):
            yield mode


def build_model(task: Any) -> nn.Module:
    """The task's model, built where the caller's device context says (fake or real). The image classifier needs
    its data's classes and channels: a stand-in gives them from the config (``cifar``: 100 classes for cifar100,
    the class folders of an image folder when it is there, else 10)."""
    if getattr(task, "name", "") == "cifar" and getattr(task, "data", None) is None:
        task.data = SimpleNamespace(num_classes=_cifar_classes(task),
                                    train_images=torch.empty((0, 3, task.config.image_size, task.config.image_size),
                                                             dtype=torch.uint8, device="meta"))
        try:
            return task.build_model()
        finally:
            task.data = None
    return task.build_model()


def _cifar_classes(task: Any) -> int:
    from pathlib import Path

    source = task.run.data.source
    if source == "cifar100":
        return 100
    if source == "imagefolder" and task.run.data.path:
        train = Path(task.run.data.path) / "train"
        if train.is_dir():
            return max(1, sum(1 for p in train.iterdir() if p.is_dir()))
    return 10


def _units(model: nn.Module) -> list[int]:
    """FSDP units as ``sharding.shard_model`` makes them: every element of an ``nn.ModuleList`` (the outermost one
    claims its parameters), then the root with what is left. Parameter counts, the root's first."""
    claimed: set[int] = set()
    units: list[int] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for block in module:
                params = [p for p in block.parameters() if id(p) not in claimed]
                claimed.update(id(p) for p in params)
                if params:
                    units.append(sum(p.numel() for p in params))
    root = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in claimed)
    return [root, *units]


def model_facts(task: Any, lr: float = 1e-3) -> tuple[ModelFacts, nn.Module, Any]:
    """The model's tensors and its optimizer's state, from a build on the fake CUDA device. Returns the facts, the
    fake model and the fake mode (enter it again to run the model)."""
    with fake_device("cuda") as mode:
        model = build_model(task)
        facts = _facts_of(task, model, lr)
    return facts, model, mode


def _facts_of(task: Any, model: nn.Module, lr: float) -> ModelFacts:
    parameter_keys = {_same_tensor_key(p) for p in model.parameters()}
    state: list[Entry] = []
    first: dict[tuple, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        key = _same_tensor_key(t)
        alias = first.get(key) if t.numel() else None
        first.setdefault(key, name)
        state.append(Entry(name, tuple(t.shape), t.dtype, key in parameter_keys, alias))
    unique = list({id(p): p for p in model.parameters()}.values())
    params = [Entry(f"parameter {i}", tuple(p.shape), p.dtype, True) for i, p in enumerate(unique)]
    optimizer = task.build_optimizer(model, lr)
    for p in unique:
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()  # fake: no arithmetic, but the state it keeps, of the shapes, dtypes and devices it keeps it
    kept = []
    for p, entry in zip(unique, params):
        tensors = [StateTensor(tuple(v.shape), v.dtype, v.device.type != "cpu", tuple(v.shape) == tuple(p.shape))
                   for v in optimizer.state.get(p, {}).values() if isinstance(v, Tensor)]
        kept.append((entry, tensors))
    for p in unique:
        p.grad = None
    return ModelFacts(params, state, kept, _optimizer_name(optimizer), _units(model))


def _optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    defaults = optimizer.defaults
    flavour = "fused" if defaults.get("fused") else "foreach" if defaults.get("foreach") is not False else "for-loop"
    if isinstance(optimizer, torch.optim.SGD):
        moments = "1 momentum buffer" if defaults.get("momentum") else "no state"
        return f"SGD ({moments})"
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        moments = "3 moments (amsgrad)" if defaults.get("amsgrad") else "2 moments"
        return f"{type(optimizer).__name__} ({flavour}, {moments})"
    return type(optimizer).__name__


# -- averagers: what each keeps, and where ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    label: str
    where: str        # "device", "host", "pinned" (page-locked host memory) or "disk"
    bytes: int
    allocated: int = 0  # pinned: the bytes the CUDA host allocator takes (each tensor rounded up to a power of two)


def _pinned(entries: list[Entry], world: int, copies: int) -> int:
    """Pinned bytes as allocated: a snapshot is one pinned block per dtype (``_window.pinned_like``), and PyTorch's
    CUDA caching host allocator rounds every block up to a power of two."""
    by_dtype: dict[torch.dtype, int] = {}
    for e in entries:
        by_dtype[e.dtype] = by_dtype.get(e.dtype, 0) + e.local_bytes(world)
    return copies * sum(1 << max(0, (n - 1).bit_length()) for n in by_dtype.values() if n)


def averager_parts(base: str, config: Any, facts: ModelFacts, world: int = 1,
                   on_cuda: bool = True) -> list[Part] | None:
    """What the averager ``base`` (a registered name) keeps per rank, and where: None for one the plan does not know
    (a plugin). ``world``: ranks the model is sharded over (1: whole). ``on_cuda``: the model on a CUDA device
    (LAWA's and wma's host snapshots are then pinned, and device arithmetic needs their uploads staged)."""
    floats, others = facts.floats, facts.others
    acc = sum(e.local_bytes(world, _accumulation(e.dtype)) for e in floats)          # float32 accumulators
    model = sum(e.local_bytes(world) for e in floats)                                 # snapshots in the model's dtype
    cast = sum(e.local_bytes(world, _accumulation(e.dtype)) for e in floats if e.dtype != _accumulation(e.dtype))
    newest = sum(e.local_bytes(world) for e in others)                                # non-float copies (counters)
    device = "device" if on_cuda else "host"
    parts: list[Part] = []
    if base in ("ema", "swa", "phema", "bema"):
        copies = len(config.sigma_rel) if base == "phema" else 3 if base == "bema" else 1
        what = {"ema": "average", "swa": "running mean", "bema": "EMA, theta_0 and newest weights",
                "phema": f"{copies} track(s)"}[base]
        parts.append(Part(f"{what} (float32)", device, copies * acc))
        if cast:  # staged_like: a low-precision model's weights copied to float32 before each update
            parts.append(Part("float32 staging of the weights", device, cast))
    elif base in ("lawa", "wma"):
        k = config.k
        disk = getattr(config, "store", "cpu") == "disk"
        # LAWA: k in the window plus the spare that the leaving snapshot's buffers become (none at k=1: every
        # eviction is a re-sum, which reuses the dropped buffers at once); wma keeps k
        count = k + 1 if base == "lawa" and k >= 2 and not disk else k
        if base == "lawa":
            parts.append(Part("window sum (float32)", device, acc))
            staging = acc if on_cuda else cast  # on CUDA the leaving host snapshot is uploaded into staging buffers
            if staging:
                parts.append(Part("float32 staging of snapshots", device, staging))
        if on_cuda:  # _window.DeviceToHost: the weights staged on the device, copied to the host on a side stream
            parts.append(Part(f"staging of the weights for the host copy ({dtype_name(facts.dtype)})", device, model))
        if disk:
            parts.append(Part(f"{k} snapshots ({dtype_name(facts.dtype)}, files)", "disk", k * model))
            # the newest snapshot's host copy, held until the background thread has written it
            parts.append(Part("1 snapshot on its way to disk (transient)", "pinned" if on_cuda else "host", model,
                              _pinned(floats, world, 1) if on_cuda else 0))
        elif on_cuda:
            parts.append(Part(f"{count} snapshots ({dtype_name(facts.dtype)}, pinned)", "pinned", count * model,
                              _pinned(floats, world, count)))
        else:
            parts.append(Part(f"{count} snapshots ({dtype_name(facts.dtype)})", "host", count * model))
    else:
        return None
    if newest:
        parts.append(Part("non-float tensors of the newest weights", device, newest))
    return parts


def averager_checkpoint_bytes(base: str, config: Any, facts: ModelFacts, world: int = 1) -> int | None:
    """Bytes of the averager's tensors in a checkpoint (its ``state_dict``): accumulators, snapshots, newest
    non-float tensors; staging and LAWA's spare are not saved."""
    floats, others = facts.floats, facts.others
    acc = sum(e.local_bytes(world, _accumulation(e.dtype)) for e in floats)
    model = sum(e.local_bytes(world) for e in floats)
    newest = sum(e.local_bytes(world) for e in others)
    if base in ("ema", "swa"):
        return acc + newest
    if base == "bema":
        return 3 * acc + newest
    if base == "phema":
        return len(config.sigma_rel) * acc + newest
    if base == "lawa":
        return config.k * model + acc + newest
    if base == "wma":
        return config.k * model + newest
    return None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- activations ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Activations:
    saved: int     # bytes of the tensors one forward saves for backward, parameters left out
    largest: int   # bytes of the largest tensor the forward makes (it and its gradient live together in backward)


def saved_bytes(forward: Callable[[], Any], exclude: set[int] = frozenset()) -> Activations:
    """Run ``forward`` and add up the storages of the tensors autograd saves for backward (each storage once: a view
    and its base are one allocation), leaving out storages in ``exclude`` (the parameters: counted apart)."""
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        key = _storage(t)
        if key not in exclude:
            saved[key] = t.untyped_storage().nbytes()
        return t

    largest = _Largest()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), largest:
        forward()
    return Activations(sum(saved.values()), largest.bytes)


class _Largest(TorchDispatchMode):
    """Notes the largest tensor any op makes."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self.bytes = max(self.bytes, t.numel() * t.element_size())
        return out


class _FusedAttention(TorchFunctionMode):
    """SDPA as an H100 runs it in training: flash attention for half types without a mask, else the memory-efficient
    kernel. Both save q, k, v, the output and the log-sum-exp; on fake CUDA tensors PyTorch has no hardware to choose
    by and would take the math path, which saves the whole attention matrix."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            fused = _fused_attention(*args, **kwargs)
            if fused is not None:
                return fused
        return func(*args, **kwargs)


def _fused_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                     dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                     enable_gqa: bool = False) -> Tensor | None:
    if enable_gqa or query.device.type != "cuda" or query.size(-1) % 8 or query.size(-1) > 256:
        return None
    if torch.is_autocast_enabled("cuda"):  # SDPA is on autocast's lower-precision list
        low = torch.get_autocast_dtype("cuda")
        query, key, value = (t.to(low) if t.is_floating_point() and t.dtype != torch.float64 else t
                             for t in (query, key, value))
    if attn_mask is None and query.dtype in (torch.float16, torch.bfloat16):
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False,
                                                                  scale=scale)[0]
    return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, attn_mask, True, dropout_p,
                                                                  is_causal, scale=scale)[0]


@contextlib.contextmanager
def mixed_precision(precision: str, device: str) -> Iterator[None]:
    """``torch.autocast`` as accelerate enters it for ``mixed_precision=bf16|fp16``, set directly: the context manager
    turns itself off on a machine without CUDA, and the fake CUDA tensors need CUDA's rules."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        yield
        return
    enabled, previous = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
    torch.set_autocast_enabled(device, True)
    torch.set_autocast_dtype(device, dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled(device, enabled)
        torch.set_autocast_dtype(device, previous)


def example_loss(task: Any, model: nn.Module, batch: int) -> Tensor | None:
    """One training loss of ``batch`` examples on inputs shaped by the task's config (zeros: no data is read), as the
    task's own ``loss`` computes it. None for a task this plan has no inputs for."""
    name = getattr(task, "name", "")
    device = next(model.parameters()).device
    if name == "gpt2":
        tokens = torch.zeros((batch, task.config.seq_len + 1), dtype=torch.long, device=device)
        return task.loss(model, {"tokens": tokens}, 0)
    if name == "ddpm":  # DdpmTask.loss past its noise draws (which save nothing for backward)
        size = task.config.image_size
        noised = torch.zeros((batch, 3, size, size), device=device)
        steps = torch.zeros((batch,), dtype=torch.long, device=device)
        return F.mse_loss(model(noised, steps).sample.float(), torch.zeros_like(noised))
    if name == "cifar":  # CifarTask.loss past its augmentation (done on uint8 images, nothing saved)
        size = task.config.image_size
        images = torch.zeros((batch, 3, size, size), device=device)
        if task.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits = model(images)
        return F.cross_entropy(logits.float(), torch.zeros((batch,), dtype=torch.long, device=device),
                               label_smoothing=task.config.label_smoothing)
    return None


def measure_activations(task: Any, model: nn.Module, batch: int, precision: str) -> Activations | None:
    """Saved-for-backward bytes of one micro-batch of ``batch`` examples through ``model`` (fake or real), in train
    mode, under ``precision`` (the run's ``mixed_precision``). None when the task has no example inputs here."""
    device = next(model.parameters()).device.type
    exclude = {_storage(t) for t in model.state_dict(keep_vars=True).values()}
    model.train()
    outcome: list[Tensor | None] = []
    with mixed_precision(precision, device), _FusedAttention():
        found = saved_bytes(lambda: outcome.append(example_loss(task, model, batch)), exclude)
    return found if outcome and outcome[0] is not None else None
