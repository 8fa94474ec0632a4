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

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


from lawa_suite import registry
from lawa_suite.config import accumulation
from lawa_suite.errors import ConfigError
from lawa_suite.training.memory_facts import (Activations, ModelFacts, Part, averager_checkpoint_bytes, averager_parts,
                                     dtype_name, fake_device, itemsize, measure_activations,
                                     model_facts)

__all__ = ["GIB", "DEFAULT_GPU_MEMORY_GIB", "RESERVED_GIB", "DEFAULT_PROCESSES", "Setup", "Row", "Plan", "memory_plan",
           "plan_text", "parse_processes", "parse_gpu_memory"]

GIB = 2 ** 30
DEFAULT_GPU_MEMORY_GIB = 80.0   # an H100 (SXM or PCIe, 80 GB of HBM)
# Not for tensors: the CUDA context (~0.5 GiB), cuBLAS/cuDNN workspaces, NCCL buffers, allocator slack. An estimate:
# what a lent H100 reports free is "about 78 GiB".
RESERVED_GIB = 2.0
DEFAULT_PROCESSES = (1, 8)      # one GPU, and one 8-GPU machine


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
    try:
        values = tuple(int(v) for v in str(text).replace(" ", "").split(",") if v)
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"processes: expected process counts >= 1 separated by commas (processes=1,8), got {text!r}")
    return tuple(dict.fromkeys(values))


def parse_gpu_memory(text: str) -> float:
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

    params, dtype = facts.parameters, dtype_name(facts.dtype)
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
    return (root + 3 * max(blocks, default=0)) * itemsize(facts.dtype)


def _world(setup: Setup) -> int:
    return setup.processes if setup.sharded else 1


def _optimizer_bytes(facts: ModelFacts, setup: Setup, on_device: bool) -> int:
    total = 0
    for entry, tensors in facts.optimizer:
        for t in tensors:
            if t.on_device != on_device:
                continue
            like = dataclasses.replace(entry, dtype=t.dtype)
            total += like.local_bytes(_world(setup)) if t.like_parameter else math.prod(t.shape) * itemsize(t.dtype)
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
    return [f"{rc.task} preset {rc.preset}: {facts.parameter_count:,} parameters ({dtype_name(facts.dtype)}), "
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
