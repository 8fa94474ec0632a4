"""The memory a run needs per rank, worked out before anything real is built: what ``suite run --dry-run`` prints
after the resolved config.

Nothing here allocates the model. It is built under PyTorch's ``FakeTensorMode`` on a fake CUDA device: meta tensors
(shapes and dtypes, no data) that report ``cuda``, so the run's real CUDA autocast rules apply to them (autocast
ignores plain meta tensors) and the optimizer picks its CUDA code path (fused AdamW, step counters on the device).
From that model the plan reads

- parameters, gradients and optimizer state (the optimizer is built by the task and stepped once on fake
  gradients, so whatever it keeps is counted, not guessed), replicated per rank under ``distributed=ddp`` and
  sharded over the ranks under ``distributed=fsdp`` (FSDP2 splits dim 0: rank 0 holds ``ceil(rows / world)``);
- each averager's state and where it lives, from what its code keeps (``averagers/*.py``): EMA, SWA and the power
  EMA's tracks are float32 accumulators on the device, BEMA three of them (EMA, theta_0, newest), LAWA a float32 window
  sum on the device and ``k + 1`` snapshots (``k`` in the window, one spare being recycled) in the model's dtype in
  pinned host memory (or files with ``lawa.store=disk``, plus the one host copy being written), wma ``k`` snapshots
  on the host; staging buffers where a copy must change dtype or device before device arithmetic (LAWA uploads its
  leaving host snapshot into one), and on CUDA LAWA's and wma's copy of the weights staged on the device for the
  copy to the host off the training stream (``_window.DeviceToHost``);
- the activations of one micro-batch: the bytes of the tensors one forward saves for backward
  (``saved_tensors_hooks``, parameters left out), under the run's mixed precision, from inputs shaped by the task's
  config (no data is read);
- the checkpoint and trajectory bytes of one save.

Against the device's memory (``gpu_memory=``, GiB; an H100's 80 by default, of which ``RESERVED_GIB`` is kept for
the CUDA context and libraries) each setup gets a FITS / DOES NOT FIT line, and one that does not fit the
``grad_accum`` that would, if any does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["GIB", "DEFAULT_GPU_MEMORY_GIB", "RESERVED_GIB", "DEFAULT_PROCESSES", "Setup", "Row", "Plan",
           "ModelFacts", "Activations", "model_facts", "averager_parts", "measure_activations", "saved_bytes",
           "example_loss", "memory_plan", "plan_text", "parse_processes", "parse_gpu_memory"]

GIB = 2 ** 30
DEFAULT_GPU_MEMORY_GIB = 80.0   # an H100 (SXM or PCIe, 80 GB of HBM)
# Not for tensors: the CUDA context (~0.5 GiB), cuBLAS/cuDNN workspaces, NCCL buffers, allocator slack. An estimate:
# what a lent H100 reports free is "about 78 GiB".
RESERVED_GIB = 2.0
DEFAULT_PROCESSES = (1, 8)      # one GPU, and one 8-GPU machine


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
        return self.local_numel(world) * _itemsize(dtype or self.dtype)


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


def _itemsize(dtype: torch.dtype) -> int:
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
            parts.append(Part(f"staging of the weights for the host copy ({_dtype_name(facts.dtype)})", device, model))
        if disk:
            parts.append(Part(f"{k} snapshots ({_dtype_name(facts.dtype)}, files)", "disk", k * model))
            # the newest snapshot's host copy, held until the background thread has written it
            parts.append(Part("1 snapshot on its way to disk (transient)", "pinned" if on_cuda else "host", model,
                              _pinned(floats, world, 1) if on_cuda else 0))
        elif on_cuda:
            parts.append(Part(f"{count} snapshots ({_dtype_name(facts.dtype)}, pinned)", "pinned", count * model,
                              _pinned(floats, world, count)))
        else:
            parts.append(Part(f"{count} snapshots ({_dtype_name(facts.dtype)})", "host", count * model))
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


def _dtype_name(dtype: torch.dtype) -> str:
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


# -- the plan --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    processes: int
    distributed: str  # "ddp" or "fsdp" (one process: the model trains whole either way)

    @property
    def sharded(self) -> bool:
        return self.distributed == "fsdp" and self.processes > 1

    @property
    def title(self) -> str:
        return "1 process" if self.processes == 1 else f"{self.processes} x {self.distributed}"


@dataclass
class Row:
    label: str
    where: str                      # "device", "host" or "file"
    values: list[int]               # bytes per setup
    in_total: bool = True           # False: shown for what it is, counted by another row (pinned bytes as allocated)


@dataclass
class Plan:
    title: list[str]
    setups: list[Setup]
    rows: list[Row]
    totals: list[int | None]        # device bytes per rank; None where the micro-batch does not split
    host: list[int]                 # host bytes per rank
    usable: int
    verdicts: list[str]
    notes: list[str] = field(default_factory=list)

    def fits(self, setup: Setup) -> bool:
        total = self.totals[self.setups.index(setup)]
        return total is not None and total <= self.usable


def parse_processes(text: str) -> tuple[int, ...]:
    from lawa_suite.errors import ConfigError

    try:
        values = tuple(int(v) for v in str(text).replace(" ", "").split(",") if v)
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"processes: expected process counts >= 1 separated by commas (processes=1,8), got {text!r}")
    return tuple(dict.fromkeys(values))


def parse_gpu_memory(text: str) -> float:
    from lawa_suite.errors import ConfigError

    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > RESERVED_GIB):
        raise ConfigError(f"gpu_memory: expected the device's memory in GiB, more than the {RESERVED_GIB:g} GiB "
                          f"kept for the CUDA context (gpu_memory=80 for an H100), got {text!r}")
    return value


def memory_plan(cfg: Any, processes: tuple[int, ...] = DEFAULT_PROCESSES,
                gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB) -> Plan:
    """The plan of ``cfg`` (a ``ResolvedConfig``) for each process count: 1 process, then ddp and fsdp for more."""
    from lawa_suite import registry

    rc = cfg.run
    task = registry.tasks.get(rc.task)(cfg.task, rc)
    facts, model, mode = model_facts(task, rc.lr)
    setups = [Setup(n, d) for n in sorted(set(processes)) for d in (("ddp",) if n == 1 else ("ddp", "fsdp"))]
    micro = {s: _per_rank(rc.batch_size, rc.grad_accum, s.processes) for s in setups}
    cache: dict[int, Activations | None] = {}

    def activations(batch: int) -> Activations | None:
        if batch not in cache:
            with fake_device("cuda", mode):
                cache[batch] = measure_activations(task, model, batch, rc.mixed_precision)
        return cache[batch]

    rows: list[Row] = []

    def add(label: str, where: str, value: Callable[[Setup], int], in_total: bool = True) -> None:
        row = Row(label, where, [value(s) for s in setups], in_total)
        if any(row.values):
            rows.append(row)

    params, dtype = facts.parameters, _dtype_name(facts.dtype)
    trainable = [e for e, _ in facts.optimizer]
    add(f"parameters ({dtype})", "device", lambda s: sum(e.local_bytes(_world(s)) for e in params))
    add("gradients", "device", lambda s: sum(e.local_bytes(_world(s)) for e in trainable))
    # accelerate's DDP (gradient_as_bucket_view=False) reduces through flat buckets beside the gradients
    add("ddp gradient buckets (a second copy)", "device",
        lambda s: sum(e.local_bytes(1) for e in trainable) if s.distributed == "ddp" and s.processes > 1 else 0)
    # FSDP2 without gradient sync (every micro-batch but the last) accumulates whole, unsharded gradients
    add("fsdp unsharded gradients (grad_accum > 1)", "device",
        lambda s: sum(e.local_bytes(1) for e in trainable) if s.sharded and _steps(rc, s.processes) > 1 else 0)
    add("fsdp gathered: root + 3 blocks (estimate)", "device", lambda s: _in_flight(facts) if s.sharded else 0)
    add(f"optimizer: {facts.optimizer_name}", "device", lambda s: _optimizer_bytes(facts, s, on_device=True))
    unknown = []
    for name, config in cfg.averagers.items():
        base = cfg.registered(name)
        parts = averager_parts(base, config, facts)
        if parts is None:
            unknown.append(name)
            continue
        for i, part in enumerate(parts):
            def local(s: Setup, i: int = i) -> Part:
                return averager_parts(base, config, facts, _world(s))[i]  # type: ignore[index]
            if part.where == "pinned":
                add(f"{name}: {part.label}", "host", lambda s, local=local: local(s).bytes, in_total=False)
                add(f"{name}:   as allocated (power-of-two blocks)", "host", lambda s, local=local: local(s).allocated)
            else:
                add(f"{name}: {part.label}", "file" if part.where == "disk" else part.where,
                    lambda s, local=local: local(s).bytes)
    add("evaluation swap buffer (raw weights)", "device",
        lambda s: sum(e.local_bytes(_world(s)) for e in facts.state if e.alias_of is None))
    measured = {s: activations(micro[s]) if micro[s] else None for s in setups}
    add("activations of one micro-batch", "device", lambda s: measured[s].saved if measured[s] else 0)
    add("working memory (2 x its largest tensor)", "device", lambda s: 2 * measured[s].largest if measured[s] else 0)
    save = [_checkpoint_bytes(cfg, facts, s) for s in setups]
    # the writer copies every tensor to host memory first: rank 0 all of it with ddp, each rank its shards with fsdp
    rows.append(Row("copy of a checkpoint being written (ddp: rank 0)", "host", save))
    rows.append(Row("a checkpoint, this rank's part", "file", save))
    trajectory = sum(e.local_bytes(1) for e in facts.state)  # whole weights, tied names each (rank 0 writes)
    rows.append(Row("a trajectory file" + ("" if rc.trajectory.every else " (trajectory.every=0: none)"), "file",
                    [trajectory] * len(setups)))

    def total(i: int, where: str) -> int:
        return sum(r.values[i] for r in rows if r.where == where and r.in_total)
    totals = [total(i, "device") if micro[s] else None for i, s in enumerate(setups)]
    host = [total(i, "host") for i in range(len(setups))]
    usable = int((gpu_memory_gib - RESERVED_GIB) * GIB)
    verdicts = [_verdict(s, t, usable, rc, micro[s], facts, activations) for s, t in zip(setups, totals)]
    notes = []
    for n in sorted({s.processes for s in setups if s.processes > 1}):
        # what one machine's host memory holds when all n ranks run on it: every rank's pinned snapshots (replicated
        # with ddp), and one whole checkpoint being written (rank 0's with ddp, all ranks' shards with fsdp)
        machine = [f"{s.distributed} {_size(n * (host[i] - save[i]) + (n if s.sharded else 1) * save[i])}"
                   for i, s in enumerate(setups) if s.processes == n]
        notes.append(f"host memory of one machine running all {n} ranks: {', '.join(machine)}")
    if rc.compile:
        notes.append("compile=true: activations are counted as eager PyTorch saves them; inductor's fused kernels "
                     "usually save fewer")
    if all(v is None for v in measured.values()) and any(micro.values()):
        notes.append(f"activations: not estimated (no example inputs for task '{rc.task}'); the totals leave them out")
    if unknown:
        notes.append(f"averager(s) {', '.join(unknown)}: state not known to the plan (a plugin); not counted")
    return Plan(_title(cfg, facts, gpu_memory_gib, processes), setups, rows, totals, host, usable, verdicts, notes)


def _in_flight(facts: ModelFacts) -> int:
    """FSDP2's unsharded parameters during a step: the root unit (kept gathered between forward and backward), the
    block running and the one prefetched, and a block's unsharded gradients before their reduce-scatter."""
    root, *blocks = facts.units
    return (root + 3 * max(blocks, default=0)) * _itemsize(facts.dtype)


def _world(setup: Setup) -> int:
    return setup.processes if setup.sharded else 1


def _optimizer_bytes(facts: ModelFacts, setup: Setup, on_device: bool) -> int:
    total = 0
    for entry, tensors in facts.optimizer:
        for t in tensors:
            if t.on_device != on_device:
                continue
            like = dataclasses.replace(entry, dtype=t.dtype)
            total += like.local_bytes(_world(setup)) if t.like_parameter else math.prod(t.shape) * _itemsize(t.dtype)
    return total


def _checkpoint_bytes(cfg: Any, facts: ModelFacts, setup: Setup) -> int:
    """This rank's bytes of one checkpoint: everything with ddp (rank 0 writes), its shards with fsdp. The few KB of
    RNG states, counters and data position are left out."""
    world = _world(setup)
    weights = sum(e.local_bytes(world) for e in facts.state)
    optimizer = _optimizer_bytes(facts, setup, True) + _optimizer_bytes(facts, setup, False)
    averagers = 0
    for name, config in cfg.averagers.items():
        averagers += averager_checkpoint_bytes(cfg.registered(name), config, facts, world) or 0
    return weights + optimizer + averagers


def _verdict(setup: Setup, total: int | None, usable: int, rc: Any, micro: int | None, facts: ModelFacts,
             activations: Callable[[int], Activations | None]) -> str:
    """FITS / DOES NOT FIT for one setup; for one that does not, the smallest grad_accum that would fit."""
    head = f"{setup.title}: "
    if micro is None or total is None:
        return (f"{head}DOES NOT SPLIT: batch_size {rc.batch_size} (grad_accum {rc.grad_accum}) over "
                f"{setup.processes} processes")
    shown = f"{_size(total)} of {_size(usable)} usable"
    if total <= usable:
        return f"{head}FITS: {shown} ({_size(usable - total)} free), micro-batch {micro} per rank"
    line = f"{head}DOES NOT FIT: {shown}, micro-batch {micro} per rank"
    fixed = total - _batch_bytes(activations(micro))
    if setup.sharded and _steps(rc, setup.processes) == 1:  # accumulating: FSDP2 keeps whole gradients between
        fixed += sum(e.local_bytes(1) for e, _ in facts.optimizer)  # micro-batches
    one, two = activations(1), activations(2)
    for accum in range(rc.grad_accum + 1, rc.batch_size + 1):
        per_rank = _per_rank(rc.batch_size, accum, setup.processes)
        if per_rank is None or rc.batch_size % accum or per_rank >= micro:
            continue
        if one and two:  # saved bytes grow linearly with the batch (measured: exact to a few KB): skip what cannot fit
            guess = _batch_bytes(one) + (per_rank - 1) * (_batch_bytes(two) - _batch_bytes(one))
            if fixed + guess > usable:
                continue
        need = fixed + _batch_bytes(activations(per_rank))
        if need <= usable:
            return f"{line}; fits with grad_accum={accum} (micro-batch {per_rank} per rank): {_size(need)}"
    return (f"{line}; no grad_accum fits (without activations it needs {_size(fixed)}): it needs activation "
            f"checkpointing (not in the suite yet), more processes, or distributed=fsdp")


def _split(batch_size: int, grad_accum: int, processes: int) -> tuple[int, int] | None:
    """``(micro-batches a step, examples a micro-batch on each rank)`` as the loop splits a batch
    (``config.accumulation``), or None where it does not split."""
    from lawa_suite.config import ConfigError, accumulation

    try:
        steps, micro = accumulation(batch_size, grad_accum, processes)
    except ConfigError:
        return None
    return steps, micro // processes


def _per_rank(batch_size: int, grad_accum: int, processes: int) -> int | None:
    split = _split(batch_size, grad_accum, processes)
    return split[1] if split else None


def _steps(rc: Any, processes: int) -> int:
    """Micro-batches a step on each of ``processes`` (1 where the batch does not split)."""
    split = _split(rc.batch_size, rc.grad_accum, processes)
    return split[0] if split else 1


def _batch_bytes(found: Activations | None) -> int:
    return found.saved + 2 * found.largest if found else 0


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:.2f} MiB"


def _title(cfg: Any, facts: ModelFacts, gpu_memory_gib: float, processes: tuple[int, ...]) -> list[str]:
    rc = cfg.run
    averagers = ", ".join(cfg.averagers) or "none"
    return [f"{rc.task} preset {rc.preset}: {facts.parameter_count:,} parameters ({_dtype_name(facts.dtype)}), "
            f"mixed_precision={rc.mixed_precision}, distributed={rc.distributed} (this config)",
            f"batch_size {rc.batch_size} = grad_accum {rc.grad_accum} x micro-batch {rc.micro_batch} on one process "
            f"(N processes: grad_accum / N micro-batches each, where N divides it); averagers: {averagers}",
            f"device: {gpu_memory_gib:g} GiB (gpu_memory=; default an H100's 80), {RESERVED_GIB:g} GiB of it kept for "
            f"the CUDA context and libraries; processes={','.join(map(str, processes))}"]


def plan_lines(plan: Plan) -> list[str]:
    """The plan as a table (a column per setup, GiB, or MiB for a plan under 1 GiB) and a verdict line per setup."""
    unit, scale = ("GiB", GIB) if max((t or 0 for t in plan.totals), default=0) >= GIB else ("MiB", 2 ** 20)
    width = max([len(r.label) for r in plan.rows] + [24]) + 4

    def cell(v: int | None) -> str:
        return "-" if not v else "<0.01" if v < scale / 200 else f"{v / scale:.2f}"

    def cells(values: list[int | None]) -> str:
        return "".join(f"{cell(v):>13}" for v in values)

    lines = [f"memory plan per rank, {unit}; tensors only, from a fake-device build (nothing was allocated)",
             *plan.title, "", " " * width + "".join(f"{s.title:>13}" for s in plan.setups)]
    for where, name, totals in (("device", "on the device", plan.totals), ("host", "on the host", plan.host),
                                ("file", "on disk", None)):
        picked = [r for r in plan.rows if r.where == where]
        if not picked:
            continue
        lines.append(name)
        # rows that would all read 0.00 (counters, BatchNorm's num_batches_tracked) are summed into one
        small = [r for r in picked if all(v < scale / 200 for v in r.values)]
        lines += [f"  {r.label:<{width - 2}}{cells(r.values)}" for r in picked if r not in small]
        if small:
            summed = [sum(r.values[i] for r in small) for i in range(len(plan.setups))]
            lines.append(f"  {f'{len(small)} smaller items':<{width - 2}}{cells(summed)}")
        if totals is not None:
            lines.append(f"  {'total ' + name:<{width - 2}}{cells(totals)}")
    return [*lines, "", *plan.verdicts, *plan.notes]


def plan_text(cfg: Any, processes: tuple[int, ...] = DEFAULT_PROCESSES,
              gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB) -> str:
    """The plan as YAML comment lines (``# ...``): the dry run's output stays the config that YAML reads."""
    try:
        lines = plan_lines(memory_plan(cfg, processes, gpu_memory_gib))
    except Exception as exc:  # noqa: BLE001 - a plan is advice: a model it cannot build must not stop the dry run
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        lines = [f"memory plan: not available ({type(exc).__name__}: {first})"]
    return "".join(f"# {line}".rstrip() + "\n" for line in lines)
