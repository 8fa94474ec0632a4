"""Typed run configuration: dataclasses with visible defaults, task presets, ``key=value`` overrides.

Resolution order (later wins): the dataclass defaults below, the task's preset, the command line.
Every component owns its keys (torchtitan style): run keys live in ``RunConfig``; a task's keys in its
``Config`` under its name (``cifar.width``; a bare ``width`` reaches it too); an averager's keys in its
``Config`` under its name (``lawa.k``). Values are parsed by OmegaConf against those dataclasses. Any bad
key, type or value raises ``ConfigError`` whose message is one line naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import time
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any

from omegaconf import OmegaConf

from lawa_suite import registry
from lawa_suite.errors import ConfigError, RegistryError
from lawa_suite.overrides import build_section, parse_overrides, parse_value, split_list

__all__ = ["ConfigError", "accumulation", "RunConfig", "DataConfig", "EvalConfig", "CheckpointConfig",
           "TrajectoryConfig", "ScheduleFreeConfig", "SCHEDULE_FREE", "ResolvedConfig", "resolve", "require",
           "choice", "default_cache_dir", "build_section", "parse_value", "split_list", "parse_overrides", "dotted",
           "averager_bases", "check_trackers", "settle_schedule_free"]



def require(ok: bool, key: str, allowed: str, value: Any) -> None:
    """Raise ``ConfigError("<key>: expected <allowed>, got <value>")`` unless ``ok``. For ``__post_init__``."""
    if not ok:
        raise ConfigError(f"{key}: expected {allowed}, got {value!r}")


def choice(default: str, *choices: str, **metadata: Any) -> Any:
    """A string field that accepts only ``choices`` (checked at resolution, listed in the error)."""
    return field(default=default, metadata={"choices": choices, **metadata})


def default_cache_dir() -> str:
    """Where downloads and prepared data go: $LAWA_SUITE_CACHE, else ~/.cache/lawa-suite."""
    return os.environ.get("LAWA_SUITE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lawa-suite")


# -- run keys every task understands ----------------------------------------------------------------
@dataclass
class DataConfig:
    source: str = ""      # `data=`; empty means the task's default (its first data source)
    path: str = ""        # `data.path=`: a local file or folder for sources that read one
    cache: str = ""       # downloads and prepared data; empty means default_cache_dir()


@dataclass
class EvalConfig:
    every: int = 100      # evaluate raw and every ready averager each `every` optimizer steps (and at the end)
    batches: int = 0      # at most this many held-out batches per evaluation; 0 = all the task provides
    bn_batches: int = 8   # training batches used to recompute BatchNorm statistics of averaged weights

    def __post_init__(self) -> None:
        require(self.every >= 1, "eval.every", "an integer >= 1", self.every)
        require(self.batches >= 0, "eval.batches", "an integer >= 0 (0 = all)", self.batches)
        require(self.bn_batches >= 1, "eval.bn_batches", "an integer >= 1", self.bn_batches)


@dataclass
class CheckpointConfig:
    # save resumable state each `every` steps and at the end; 0 = only at the end; unset = every evaluation, so a
    # crash or Ctrl-C loses at most one evaluation period of work
    every: int | None = None
    keep: int = 2         # committed checkpoints kept (oldest deleted only after a new one is committed)

    def __post_init__(self) -> None:
        require(self.every is None or self.every >= 0, "checkpoint.every",
                "an integer >= 0 (0 = only at the end; unset = every evaluation)", self.every)
        require(self.keep >= 1, "checkpoint.keep", "an integer >= 1", self.keep)


@dataclass
class TrajectoryConfig:
    every: int = 0        # save raw weights for post-hoc averaging each `every` steps; 0 = off

    def __post_init__(self) -> None:
        require(self.every >= 0, "trajectory.every", "an integer >= 0 (0 = off)", self.every)


#: The value of a task's ``optimizer`` key that selects schedule-free training (``lawa_suite.tasks.schedule_free``).
SCHEDULE_FREE = "schedulefree"


@dataclass
class ScheduleFreeConfig:
    # Schedule-free's own averaging weights (Defazio et al. 2024): step t enters the eval sequence x with weight
    # t^r * lr_max^weight_lr_power (lr_max: the largest learning rate so far, so warm-up steps count less). Its
    # warm-up is the run's `warmup` (the loop's; the optimizer's own warmup_steps stays 0, so exactly one applies).
    r: float = 0.0                # 0: every step after the warm-up weighs the same (the paper's default)
    weight_lr_power: float = 2.0  # the paper's default; 0 ignores the learning rate

    def __post_init__(self) -> None:
        require(isinstance(self.r, (int, float)) and 0.0 <= self.r < float("inf"), "schedulefree.r",
                "a number >= 0", self.r)
        require(isinstance(self.weight_lr_power, (int, float)) and 0.0 <= self.weight_lr_power < float("inf"),
                "schedulefree.weight_lr_power", "a number >= 0", self.weight_lr_power)


@dataclass
class RunConfig:
    task: str = "cifar"
    preset: str = ""                          # empty means the task's default preset
    averager: list[str] = field(default_factory=lambda: ["lawa", "ema", "swa"])
    seed: int = 0
    out: str = ""                             # empty means runs/<task>-<preset>-<time>
    steps: int = 1000                         # optimizer steps
    lr: float = 1e-3                          # peak learning rate
    batch_size: int = 128                     # examples per optimizer step, over all processes
    grad_accum: int = 1                       # micro-batches per optimizer step
    schedule: str = choice("cosine", "cosine", "constant", "linear", "wsd")  # wsd: warm-up, stable, decay
    warmup: int = 0                           # linear warm-up steps
    min_lr: float = 0.0                       # final learning rate as a fraction of `lr` (cosine, linear, wsd)
    decay_fraction: float = 0.2               # wsd: the decay takes this last fraction of the steps
    decay_shape: str = choice("linear", "linear", "1-sqrt")  # wsd: the decay's shape (1-sqrt: Hägele et al. 2024)
    grad_clip: float = 0.0                    # clip the gradient norm to this; 0 = no clipping
    mixed_precision: str = choice("no", "no", "bf16", "fp16")
    compile: bool = False                     # torch.compile the model in place (inductor); names and files unchanged
    tf32: bool = True                         # on CUDA: TF32 matmuls/convolutions, cuDNN autotuning (false: exact fp32)
    deterministic: bool = False               # on CUDA: deterministic kernels, so a resumed run repeats bit for bit
    # several processes: "ddp" replicates the model; "fsdp" shards it (FSDP2) and every averager keeps its rank's shard
    distributed: str = choice("ddp", "ddp", "fsdp")
    resume: str = ""                          # "" (fresh run), "auto" (newest valid checkpoint) or a path
    reset_averagers: bool = False             # resume from a checkpoint without averager state, on purpose
    max_bad_steps: int = 10                   # consecutive non-finite steps before the run stops
    log_every: int = 10                       # write the training loss to metrics.jsonl each `log_every` steps
    trackers: list[str] = field(default_factory=list)  # accelerate trackers, e.g. tensorboard
    progress: bool = True                     # show a progress bar
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    trajectory: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    schedulefree: ScheduleFreeConfig = field(default_factory=ScheduleFreeConfig)  # used with optimizer=schedulefree

    def __post_init__(self) -> None:
        require(self.steps >= 1, "steps", "an integer >= 1", self.steps)
        require(self.lr > 0, "lr", "a number > 0", self.lr)
        require(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
        require(self.grad_accum >= 1, "grad_accum", "an integer >= 1", self.grad_accum)
        require(self.batch_size % self.grad_accum == 0, "grad_accum",
                f"a divisor of batch_size={self.batch_size}", self.grad_accum)
        require(0 <= self.warmup < self.steps, "warmup", f"an integer in [0, steps={self.steps})", self.warmup)
        require(0.0 <= self.min_lr <= 1.0, "min_lr", "a fraction in [0, 1]", self.min_lr)
        require(0.0 < self.decay_fraction <= 1.0, "decay_fraction", "a fraction in (0, 1]", self.decay_fraction)
        require(self.grad_clip >= 0, "grad_clip", "a number >= 0 (0 = off)", self.grad_clip)
        require(self.log_every >= 1, "log_every", "an integer >= 1", self.log_every)
        require(self.max_bad_steps >= 1, "max_bad_steps", "an integer >= 1", self.max_bad_steps)
        require(len(set(self.averager)) == len(self.averager), "averager", "distinct names", self.averager)
        require(self.distributed != "fsdp" or not self.compile, "compile",
                "false with distributed=fsdp (not supported yet)", self.compile)

    @property
    def micro_batch(self) -> int:
        """Examples per micro-batch over all processes."""
        return self.batch_size // self.grad_accum


def accumulation(batch_size: int, grad_accum: int, world: int) -> tuple[int, int]:
    """``(micro-batches per optimizer step, examples per micro-batch over all processes)`` for ``world`` processes.
    ``grad_accum`` is what one process needs for ``batch_size``; ``world`` processes each take a micro-batch of the
    same size and accumulate ``world`` times fewer (nanoGPT's rule), so a preset's global batch and its per-GPU
    micro-batch stay as tuned on 1, 4 or 8 GPUs. Where ``world`` does not divide ``grad_accum``, one micro-batch a
    step, split over the processes."""
    if grad_accum % world == 0:
        return grad_accum // world, batch_size // grad_accum * world
    if batch_size % world:
        raise ConfigError(f"batch_size: {batch_size} examples cannot be split over {world} processes; expected a "
                          f"multiple of {world}")
    return 1, batch_size


@dataclass
class ResolvedConfig:
    """The fully resolved configuration of one run: what config.yaml holds."""
    run: RunConfig
    task: Any                                 # the task's Config
    averagers: dict[str, Any]                 # averager name -> its Config
    averager_of: dict[str, str] = field(default_factory=dict)  # a named instance -> the registered averager it runs

    def registered(self, name: str) -> str:
        """The registered averager that the selected averager ``name`` runs (itself, or an instance's ``of``)."""
        return self.averager_of.get(name, name)

    def build_averagers(self) -> dict[str, Any]:
        """A fresh averager per selected name, named as selected (an instance reports its own name)."""
        built = {}
        for name, cfg in self.averagers.items():
            averager = registry.averagers.create(self.registered(name), **dataclasses.asdict(cfg))
            averager.name = name
            built[name] = averager
        return built

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self.run)
        out[self.run.task] = dataclasses.asdict(self.task)
        for name, cfg in self.averagers.items():
            of = {"of": self.averager_of[name]} if name in self.averager_of else {}
            out[name] = {**of, **dataclasses.asdict(cfg)}
        return out

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.create(self.as_dict()), sort_keys=False)


# -- resolution -------------------------------------------------------------------------------------
def _keys_of(schema: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(f.type) or (isinstance(f.default_factory, type) and  # type: ignore[misc]
                                                dataclasses.is_dataclass(f.default_factory)):
            keys += _keys_of(f.default_factory, f"{prefix}{f.name}.")  # type: ignore[arg-type]
        else:
            keys.append(prefix + f.name)
    return keys


def _lookup(registry_name: str, name: str, key: str) -> Any:
    try:
        return getattr(registry, registry_name).get(name)
    except RegistryError as exc:  # unknown name or a plugin that cannot be used: already one line
        raise ConfigError(f"{key}: {exc}") from None


def resolve(overrides: list[str] | dict[str, Any], base: dict[str, Any] | None = None) -> ResolvedConfig:
    """Resolve defaults + task preset + ``base`` + overrides into a validated ``ResolvedConfig``.

    ``overrides`` are command-line strings (parsed the way YAML would read them); ``base`` holds dotted values that
    are already typed, such as a saved ``config.yaml``, and is taken as is (its '' stays '', its 'no' stays 'no').
    """
    pairs = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides)
    typed = dict(base or {})
    defaults = RunConfig()
    task_name = str(pairs.get("task", typed.get("task", defaults.task)))
    task_cls = _lookup("tasks", task_name, "task")
    preset = str(pairs.get("preset", "") or typed.get("preset") or task_cls.default_preset)
    if preset not in task_cls.presets:
        raise ConfigError(f"preset: task '{task_name}' has no preset {preset!r}; "
                          f"known: {', '.join(task_cls.presets)}")
    values: dict[str, Any] = {k: v for k, v in task_cls.presets[preset].items()}
    values.update(typed)
    values.update({"task": task_name, "preset": preset})
    for key, raw in pairs.items():
        values[key] = parse_value(key, raw)
    averager_names = values.get("averager", defaults.averager)
    if isinstance(averager_names, str):
        averager_names = split_list(averager_names)
    bases = averager_bases(averager_names, values)
    averager_cls = {name: _lookup("averagers", base, "averager") for name, base in bases.items()}

    run_keys = set(_keys_of(RunConfig))
    task_keys = set(_keys_of(task_cls.Config))
    sections: dict[str, dict[str, Any]] = {"": {}, task_name: {}, **{n: {} for n in averager_cls}}
    unused_averagers = set(registry.averagers.names()) - set(averager_cls)
    for key, value in values.items():
        head, _, rest = key.partition(".")
        if key not in pairs and key not in typed and head in unused_averagers:
            continue  # a preset's setting for an averager this run does not use
        if head in averager_cls and rest == "of":
            continue  # consumed by averager_bases
        if key in run_keys:
            sections[""][key] = value
        elif head == task_name and rest in task_keys:
            sections[task_name][rest] = value
        elif key in task_keys and key not in run_keys:
            sections[task_name][key] = value
        elif head in averager_cls and rest in _keys_of(averager_cls[head].Config):
            sections[head][rest] = value
        else:
            raise ConfigError(_unknown_key_message(key, run_keys, task_name, task_keys, averager_cls))
    run = build_section("", RunConfig, sections[""])
    if not run.out:
        run.out = os.path.join("runs", f"{task_name}-{preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    if run.data.source and run.data.source not in task_cls.data_sources:
        raise ConfigError(f"data: task '{task_name}' reads {', '.join(task_cls.data_sources)}; got {run.data.source!r}")
    run.data.source = run.data.source or task_cls.data_sources[0]
    if run.checkpoint.every is None:
        run.checkpoint.every = run.eval.every
    check_trackers(run.trackers)
    if not run.data.cache:
        run.data.cache = default_cache_dir()
    task_cfg = build_section(task_name, task_cls.Config, sections[task_name])
    settle_schedule_free(run, task_cfg, task_name, command_line=set(pairs), saved=set(typed))
    averagers = {name: build_section(name, cls.Config, sections[name]) for name, cls in averager_cls.items()}
    instances = {name: base for name, base in bases.items() if base != name}
    return ResolvedConfig(run, task_cfg, averagers, instances)


def settle_schedule_free(run: RunConfig, task_cfg: Any, task_name: str, command_line: set[str],
                         saved: set[str]) -> None:
    """Schedule-free replaces the learning-rate decay with its own averaging: with ``optimizer=schedulefree`` a
    preset's or the default's schedule gives way to ``constant`` (plus ``warmup``), and a ``schedule`` that was
    asked for (command line or saved config) is refused. Without it, a ``schedulefree.*`` key on the command line
    would change nothing, so it is refused too (a saved config holds every key: those are not counted)."""
    if getattr(task_cfg, "optimizer", None) != SCHEDULE_FREE:
        stray = sorted(k for k in command_line if k.startswith("schedulefree."))
        if stray and not hasattr(task_cfg, "optimizer"):
            raise ConfigError(f"{stray[0]}: task '{task_name}' has no optimizer key, so no schedule-free optimizer; "
                              f"drop the key")
        if stray:
            raise ConfigError(f"{stray[0]}: only used with optimizer={SCHEDULE_FREE} ({task_name}.optimizer is "
                              f"{task_cfg.optimizer}); set optimizer={SCHEDULE_FREE} or drop the key")
        return
    if run.schedule == "constant":
        return
    if "schedule" in command_line | saved:
        raise ConfigError(f"schedule: optimizer={SCHEDULE_FREE} replaces the learning-rate decay with its own "
                          f"averaging; expected constant (a warm-up is warmup=N), got {run.schedule!r}")
    run.schedule = "constant"


def check_trackers(names: list[str]) -> None:
    """Every tracker is one accelerate knows and is installed: otherwise accelerate would warn and log nothing,
    or fail with a traceback after the model is built."""
    if not names:
        return
    import accelerate.tracking
    import accelerate.utils

    known = list(accelerate.tracking.LOGGER_TYPE_TO_CLASS)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"trackers: unknown tracker {name!r}; known: {', '.join(known)}{hint}")
        available = getattr(accelerate.utils, f"is_{name}_available", None)
        if available is not None and not available():
            raise ConfigError(f"trackers: {name} is not installed; pip install {name.replace('_', '-')} (or drop it "
                              f"from trackers=)")


def averager_bases(names: list[str], values: Mapping[str, Any]) -> dict[str, str]:
    """Each selected averager name -> the registered averager it runs: the name itself, or for a named instance
    the averager its ``<name>.of`` key gives (``averager=swa,swa_early swa_early.of=swa swa_early.start=0.25``).

    An instance is a second configuration of a registered averager under its own name, for ``suite run``,
    ``suite average``, resume and export alike: the name keys its settings, metrics, state and output folder.
    """
    known = set(registry.averagers.names())
    bases = {}
    for name in names:
        of = values.get(f"{name}.of")
        if of in (None, ""):
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=1)
                hint = "" if close else f"; a new name for a second instance needs {name}.of=<averager>"
                raise ConfigError(f"averager: {registry.averagers.unknown_message(name)}{hint}")
            bases[name] = name
            continue
        of = str(of)
        if name in known and of != name:
            raise ConfigError(f"{name}.of: '{name}' is a registered averager itself; give the instance of '{of}' "
                              f"another name")
        if of not in known:
            raise ConfigError(f"{name}.of: {registry.averagers.unknown_message(of)}")
        bases[name] = of
    return bases


def dotted(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: a nested config as the dotted keys the command line uses."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(dotted(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _unknown_key_message(key: str, run_keys: set[str], task: str, task_keys: set[str],
                         averagers: dict[str, Any]) -> str:
    head, _, rest = key.partition(".")
    if (head in registry.averagers.names() or rest == "of") and head not in averagers:
        return (f"{key}: averager '{head}' is not selected (averager={','.join(averagers) or '(none)'}); "
                f"add it to averager= or drop the key")
    known = sorted(run_keys | {f"{task}.{k}" for k in task_keys} |
                   {f"{n}.{f}" for n, cls in averagers.items() for f in _keys_of(cls.Config)})
    close = difflib.get_close_matches(key, known + sorted(task_keys), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
    return f"{key}: unknown key for task '{task}'{hint}"
