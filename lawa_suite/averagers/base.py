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
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from lawa_suite.registry import class_contract_problem
from lawa_suite.averagers._tensors import (  # noqa: F401 - re-exported: plugins import these from base
    NonFiniteWarning, Weights, named_tensors, local_shard, accumulation_dtype, finite_flag, all_finite, is_count,
    accumulator_copy, cast_like, staged_like, storage_key, find_aliases, follow_devices, Layout)


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


class SnapshotFolder(NamedTuple):
    """A folder an averager keeps files in for a whole run, named by the user: the key that named it (``dir``
    for LAWA's ``<name>.dir``) and the folder. The loop refuses two averagers of a run sharing one, and any with
    ``distributed=fsdp`` (every rank would write its shards into it)."""
    key: str
    path: Path


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
        the profile the class itself produces from a one-hot trajectory (``averagers/weight_profiles.py``). None: no
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
        if settings_that_differ(self.config, state["config"]):
            raise ValueError(f"{self.name}: the saved state was made with {self.Config(**state['config'])}, this "
                             f"averager has {self.config}")
        self.layout = Layout.from_json(state["layout"]) if state["layout"] else None
        counters = state["counters"]
        self.refused, self.updates, self.last_step = counters["refused"], counters["updates"], counters["last_step"]
        self._others = [t.clone() for t in state["others"]]
        self._load_extra_state(state["state"])

    def snapshot_folder(self) -> SnapshotFolder | None:
        """The folder this averager keeps its files in during a run, when the user named one (LAWA's
        ``store=disk dir=...``); None when it keeps none or only a private temporary one (nothing to collide with)."""
        return None

    def close(self) -> None:
        """Finish queued work (copies, files) and end any background thread this averager started; the state is
        kept (``average()`` and ``state_dict()`` still work). The training loop calls it at the end of a run;
        none of the built-in averagers needs it for correctness (their threads end when they are collected)."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.config).items())
        return f"{type(self).__name__}({fields})"


#: What the training loop, evaluation, checkpoints, export and post-hoc averaging use of an averager class.
CONTRACT = ("Config", "start_run", "wants", "observe", "refuse", "ready", "average", "load_average_into",
            "state_dict", "load_state_dict", "needs_bn_recalibration", "elementwise", "posthoc_clock", "plan_replay",
            "replay_from", "averaged_clocks", "span_hint", "stored_averages", "documented_profile", "is_average",
            "stored_format", "plan_synthesis", "snapshot_folder")


def settings_that_differ(config: Any, saved: Mapping[str, Any]) -> list[str]:
    """The settings of the dataclass ``config`` that affect the average and differ from a saved state's ``config``
    (``saved``, its fields by name): a state made so is not this averager's (``Averager.load_state_dict`` refuses it).
    Fields marked ``affects_average=False`` (where snapshots are stored) may change. ``saved`` that are not settings of
    ``config``'s class raise as that class's constructor does (TypeError, ValueError, ConfigError)."""
    made = type(config)(**saved)
    return [f.name for f in dataclasses.fields(config) if f.metadata.get("affects_average", True)
            and getattr(made, f.name) != getattr(config, f.name)]


def contract_problem(obj: Any) -> str | None:
    """Why ``obj`` cannot serve as an averager (checked by the registry when it is selected), or None: before any
    work, so a plugin missing a piece fails with one line naming it, never with an AttributeError mid-run.
    Subclassing ``Averager`` provides everything but the method itself."""
    return class_contract_problem(obj, "averager", CONTRACT, "lawa_suite.Averager")
