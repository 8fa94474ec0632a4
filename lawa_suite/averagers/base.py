"""The averager contract shared by every method (one thin base; methods never subclass each other).

An averager is a function of a weight trajectory: it consumes ``(step, weights)`` pairs one at a time and
hands back averaged weights at any moment. The training loop feeds it after every real optimizer step
(online); ``posthoc`` feeds it saved checkpoints. Averagers are passive: they never touch the model.

Shared rules (README, "Averagers in Python"):
- the first observation fixes the layout (names, shapes, dtypes); a later one that differs is an error;
- float tensors are accumulated in float32 (float64 for float64 models) and handed back in the model's
  dtype; non-float tensors (e.g. BatchNorm's ``num_batches_tracked``) are copied from the newest accepted
  observation, never averaged;
- an observation holding NaN or Inf is refused with a warning and leaves the average untouched;
- names that alias one tensor (GPT-2's tied ``transformer.wte.weight`` / ``lm_head.weight``) are averaged
  once and handed back under every name: averaging both would double the work and the memory for nothing.

A subclass supplies ``Config`` (a dataclass whose fields are its ``<name>.<field>`` keys), ``wants``,
``_update``, ``_averaged_floats``, ``ready`` and ``_extra_state`` / ``_load_extra_state``; optionally
``_average_view`` (read-only averaged tensors, when its accumulators are the average: evaluation copies from them).

Post hoc (``lawa_suite.posthoc``, which names no averager) an averager is replayed over saved checkpoints. The
defaults below count observations (the i-th saved checkpoint is step ``i``), as the LAWA paper's Algorithm 2
applies EMA and SWA to a checkpoint list; an averager that means steps (LAWA's window) overrides
``plan_replay``, and one that keeps copies of observations may re-read them instead (``replay_from``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

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
    """A float64 scalar on the tensors' device: 1 if no tensor holds NaN or Inf, else 0, without a host sync (the
    training loop reads it with the step's loss). One fused max-abs pass (``_foreach_norm`` with ``ord=inf``, which
    propagates NaN): a maximum of finite values is finite, so unlike a sum of squares it cannot overflow."""
    tensors = [t for t in tensors if t.numel()]  # the inf-norm of an empty tensor is undefined (and it holds nothing)
    if not tensors:
        return torch.ones((), dtype=torch.float64)
    norms = torch._foreach_norm(tensors, ord=math.inf)
    return torch.stack([n.double() for n in norms]).isfinite().all().double()


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
    into persistent ``staging`` buffers (filled on first use), so a bf16 model's update into fp32 accumulators
    costs one fused copy instead of a fresh fp32 copy of the weights every step."""
    if len(staging) != len(tensors) or any(b is not None and b.device != r.device for b, r in zip(staging, like)):
        staging[:] = [None if (t.dtype == r.dtype and t.device == r.device) else torch.empty_like(r)
                      for t, r in zip(tensors, like)]
    pairs = [(buffer, t) for buffer, t in zip(staging, tensors) if buffer is not None]
    if pairs:
        torch._foreach_copy_([b for b, _ in pairs], [t for _, t in pairs], non_blocking=non_blocking)
    return [t if buffer is None else buffer for t, buffer in zip(tensors, staging)]


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


@dataclasses.dataclass
class StoredAverage:
    """An average an averager asks the loop to keep in the run folder (``averages/<averager>/<label>.safetensors``),
    for reconstruction after training: its tensors by name in the model's dtypes, and string metadata."""
    label: str
    tensors: dict[str, Tensor]
    metadata: dict[str, str]


@dataclasses.dataclass
class Synthesis:
    """One post-hoc output built from stored averages: ``coefficients[i]`` multiplies the i-th stored average (in
    the order they were given to ``plan_synthesis``); ``notes`` go into the manifest (the reconstruction's error)."""
    step: int
    coefficients: list[float]
    notes: dict[str, Any]


@dataclasses.dataclass
class ReplayTrack:
    """One post-hoc replay of an averager over saved checkpoints: what ``observe`` is told for each saved
    checkpoint (in step order), what ``start_run`` is told, and the saved steps at which an output is written."""
    clocks: list[int]
    total: int
    targets: list[int]


class Averager(ABC):
    """Base of every averager. Construct with keyword arguments: the fields of ``Config``."""

    name: ClassVar[str] = ""
    Config: ClassVar[type]  # a dataclass; its __post_init__ raises ValueError naming the bad field

    #: True if the averaged weights' BatchNorm statistics are stale and should be recalibrated before
    #: scoring (all three built-ins: an average of weights does not come with matching statistics).
    needs_bn_recalibration: ClassVar[bool] = True

    #: True if the weights of the profile sum to 1 (every method here; a plugin that extrapolates may say False).
    is_average: ClassVar[bool] = True

    #: True if each element of the average depends only on the same element of the observations (EMA, SWA
    #: and LAWA are elementwise). Post-hoc averaging then streams a large tensor in slices, each its own
    #: problem, so memory stays at a few slices; an averager that leaves this False sees whole tensors.
    elementwise: ClassVar[bool] = False

    def __init__(self, **kwargs: Any) -> None:
        self.config = self.Config(**kwargs)
        self.layout: Layout | None = None
        self.refused = 0                        # observations refused for NaN/Inf
        self.updates = 0                        # observations that changed the average
        self.last_step: int | None = None       # step of the newest accepted observation
        self._others: list[Tensor] = []         # non-float tensors of the newest accepted observation
        self._staging: list[Tensor | None] = []  # fp32 buffers for a low-precision model's updates (staged_like)

    # -- the contract -------------------------------------------------------------------------------
    def start_run(self, total_steps: int) -> None:
        """Told once, before the first observation, how many steps the run will take (for fractions)."""

    def observe(self, step: int, weights: Weights, checked: bool = False) -> bool:
        """Consume the weights after optimizer step ``step``. Returns True if the average changed.

        ``checked``: the caller has already found every float value finite (the loop checks the weights once for
        all averagers; post-hoc averaging checks the whole trajectory before any arithmetic), so this observation
        skips its own NaN/Inf pass."""
        if not self.wants(step):
            return False
        if self.last_step is not None and step <= self.last_step:  # a repeated step would be counted twice
            raise ValueError(f"{self.name}: observed steps must increase: got step {step} after {self.last_step}")
        tensors = named_tensors(weights)
        if self.layout is None:
            self.layout = Layout.of(tensors)
        elif (problem := self.layout.mismatch(tensors)) is not None:
            raise ValueError(f"{self.name}: observation at step {step}: {problem}")
        floats = [tensors[n] for n in self.layout.float_names]
        if not checked and not all_finite(floats):
            self.refuse(step)
            warnings.warn(f"{self.name}: the weights at step {step} hold NaN or Inf; observation refused "
                          f"({self.refused} so far)", NonFiniteWarning, stacklevel=2)
            return False
        self._update(step, floats)
        self._others = [tensors[n].detach().clone() for n in self.layout.other_names]
        self.last_step = step
        self.updates += 1
        return True

    def refuse(self, step: int) -> None:
        """Count a wanted observation at ``step`` that was refused because it held NaN or Inf (the caller found
        it so): the average is untouched; ``refused`` says how many there were."""
        self.refused += 1

    def average(self) -> dict[str, Tensor] | None:
        """The averaged weights (``name -> tensor`` in the model's dtypes), or None before ready."""
        if not self.ready or self.layout is None:
            return None
        floats = dict(zip(self.layout.float_names, self._averaged_floats()))
        others = dict(zip(self.layout.other_names, self._others))
        out = {name: (floats[name].to(dtype) if name in floats else others[name].clone())
               for name, dtype in zip(self.layout.names, self.layout.dtypes) if name in floats or name in others}
        for alias, source in self.layout.aliases:
            out[alias] = out[source]  # one tensor under both names, as in the model
        return {name: out[name] for name in self.layout.names}

    def load_average_into(self, targets: Mapping[str, Tensor]) -> bool:
        """Copy the averaged weights into ``targets`` (name -> a tensor of the layout's shape, such as the model's
        own; aliases may be left out), casting to the targets' dtypes: fused copies from the averager's own
        tensors, without a new full set of weights (evaluation swaps averages in this way). Bit for bit what
        ``average()`` returns. False, leaving ``targets`` alone, before ready."""
        if not self.ready or self.layout is None:
            return False
        names = self.layout.float_names + self.layout.other_names
        if missing := [n for n in names if n not in targets]:
            raise KeyError(f"{self.name}: load_average_into: no target tensor for {missing[:3]} "
                           f"({len(missing)} of {len(names)} missing)")
        torch._foreach_copy_([targets[n] for n in names], [*self._average_view(), *self._others])
        return True

    def _average_view(self) -> list[Tensor]:
        """The averaged float tensors in layout order, read only: they may be the accumulators themselves.
        ``load_average_into`` copies from them; an averager whose accumulators are its average overrides this."""
        return self._averaged_floats()

    def stored_averages(self, step: int) -> list[StoredAverage]:
        """Averages to keep in the run folder after observing ``step`` (EDM2's snapshots for post-hoc
        reconstruction); none by default. Called on every step after the observations."""
        return []

    @classmethod
    def documented_profile(cls, config: Any, total: int) -> list[float] | None:
        """The weight the average after ``total`` online steps (every step observed) gives each step ``1..total``,
        by the formula the method documents, computed without the update code: the contract tests compare it with
        the profile the class itself produces from a one-hot trajectory (``lawa_suite.profiles``). None: no
        closed form to check against."""
        return None

    # -- post hoc: how a replay over saved checkpoints feeds this averager ------------------------------------
    #: what ``observe`` is told post hoc: "observations" (the i-th saved checkpoint is step i) or "steps"
    posthoc_clock: ClassVar[str] = "observations"

    @classmethod
    def plan_replay(cls, config: Any, steps: list[int],
                    targets: list[int] | None) -> tuple[list[ReplayTrack], list[str]]:
        """The replays that give this averager's outputs over saved checkpoints at ``steps`` (ascending), and the
        problems that stop them (one line each). ``targets``: the saved steps where outputs are wanted, or None
        for the state the online averager would end the run with. The default replays once, counting
        observations; a target where the averager is not ready simply yields no output."""
        count = len(steps)
        wanted = list(targets) if targets is not None else [steps[-1]]
        return [ReplayTrack(list(range(1, count + 1)), count, wanted)], []

    @classmethod
    def span_hint(cls, config: Any) -> str:
        """What the settings mean as a span of observations, said when a post-hoc output turns out to be mostly
        its first input ("" when there is nothing to add)."""
        return ""

    #: the ``format`` metadata of the averages this class stores (``stored_averages``); post hoc, a run folder holding
    #: such files is reconstructed from them (``plan_synthesis``) instead of replayed. "" = stores none.
    stored_format: ClassVar[str] = ""

    @classmethod
    def plan_synthesis(cls, config: Any, stored: list[Mapping[str, str]],
                       targets: list[int]) -> tuple[list[Synthesis], list[str]]:
        """The outputs at saved steps ``targets``, each a linear combination of the stored averages whose metadata
        ``stored`` lists, and the problems (one line each) that stop them. Only for classes with ``stored_format``."""
        raise NotImplementedError(f"{cls.name} stores no averages to reconstruct from")

    def replay_from(self, read: Callable[[int], list[Tensor]]) -> None:
        """Post hoc, before the first observation: ``read(clock)`` gives the float tensors observed at ``clock``
        again (views of the mapped input), so an averager that would keep copies of observations may keep
        clocks instead. The default keeps nothing."""

    def averaged_clocks(self) -> list[int] | None:
        """The clocks of the observations the average is made of when it is a window of them (recorded as an
        output's inputs); None means every accepted observation."""
        return None

    @property
    @abstractmethod
    def ready(self) -> bool:
        """True once ``average()`` has something to return."""

    @abstractmethod
    def wants(self, step: int) -> bool:
        """Whether the observation at ``step`` would be used. Pure: no side effects."""

    @abstractmethod
    def _update(self, step: int, floats: list[Tensor]) -> None:
        """Fold in the float tensors (in layout order, model dtype) of an accepted, finite observation."""

    @abstractmethod
    def _averaged_floats(self) -> list[Tensor]:
        """The averaged float tensors in layout order, in the accumulation dtype (cast by the caller).
        They must be tensors the caller owns (never the accumulators themselves): callers may edit them."""

    @abstractmethod
    def _extra_state(self) -> dict[str, Any]:
        """Method state: tensors and JSON-able values (nested dicts and lists allowed)."""

    @abstractmethod
    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Inverse of ``_extra_state``."""

    # -- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically: config, layout, counters and method state."""
        return {
            "name": self.name,
            "config": dataclasses.asdict(self.config),
            "layout": self.layout.to_json() if self.layout else None,
            "counters": {"refused": self.refused, "updates": self.updates, "last_step": self.last_step},
            "others": list(self._others),
            "state": self._extra_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = self.Config(**state["config"])
        differ = [f.name for f in dataclasses.fields(self.config) if f.metadata.get("affects_average", True)
                  and getattr(saved, f.name) != getattr(self.config, f.name)]
        if differ:  # fields marked affects_average=False (where snapshots are stored) may change
            raise ValueError(f"{self.name}: the saved state was made with {saved}, this averager has {self.config}")
        self.layout = Layout.from_json(state["layout"]) if state["layout"] else None
        counters = state["counters"]
        self.refused, self.updates, self.last_step = counters["refused"], counters["updates"], counters["last_step"]
        self._others = [t.clone() for t in state["others"]]
        self._load_extra_state(state["state"])

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.config).items())
        return f"{type(self).__name__}({fields})"


#: What the training loop, evaluation, checkpoints, export and post-hoc averaging use of an averager class.
CONTRACT = ("Config", "start_run", "wants", "observe", "refuse", "ready", "average", "load_average_into",
            "state_dict", "load_state_dict", "needs_bn_recalibration", "elementwise", "posthoc_clock", "plan_replay",
            "replay_from", "averaged_clocks", "span_hint", "stored_averages", "documented_profile", "is_average",
            "stored_format", "plan_synthesis")


def contract_problem(obj: Any) -> str | None:
    """Why ``obj`` cannot serve as an averager (checked by the registry when it is selected), or None: before any
    work, so a plugin missing a piece fails with one line naming it, never with an AttributeError mid-run.
    Subclassing ``Averager`` provides everything but the method itself."""
    from lawa_suite.registry import class_contract_problem

    return class_contract_problem(obj, "averager", CONTRACT, "lawa_suite.Averager")
