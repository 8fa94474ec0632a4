"""``suite bench``: a matrix of runs (tasks x learning rates x seeds, every averager watching each run).

One training run per (task, lr, seed) cell feeds all the averagers, so raw and averaged weights are always
scored on the same trajectory and the same held-out batches. A run evaluates at least ``MIN_EVALS`` (20) times
unless the bench sets ``eval.every``: early, mid and late each need several evaluations.

Locally the cells run one after another in this process; every cell runs with ``resume=auto`` and a periodic
checkpoint, so a bench that is killed and started again skips the cells that finished (their final checkpoint is
there) and continues the interrupted one from its newest checkpoint. ``emit=accelerate`` / ``emit=slurm``
write the same cells as cluster jobs instead.

A bench file (YAML; every key optional except ``tasks``; the command line's ``key=value`` words override it)::

    out: runs/bench/cpu-reference     # one folder per cell below it: <out>/<task>/lr<lr>-seed<seed>
    tasks: cifar,gpt2,ddpm            # a comma list, or a mapping task -> its own settings (below)
    averager: lawa,ema,swa,swa_early  # the averagers of every run
    variants:                         # named instances: a registered averager again, under a new name
      swa_early: {of: swa, start: 0.25}
    lrs: 0.1,0.01                     # the learning rates (a task may have its own)
    seeds: 0,1
    threads: 1                        # torch threads per run (0: torch's default)
    set: {progress: false}            # key=value settings of every run (any `suite run` key)
    slurm: {gpus: 8, time: "72:00:00"}  # for emit=slurm
    posthoc:                          # sweeps after each run (``sweeps.py``): suite average words, scored
      ema_length: averager=phema phema.sigma_rel=0.03,0.05,0.1,0.2

    tasks:                            # the mapping form: per-task settings
      gpt2: {lrs: "1e-2,1e-3", preset: cpu, data: text, data.path: ../shared/data/tinyshakespeare.txt}
      gpt2-constant: {task: gpt2, schedule: constant}   # the task again, labelled: cells in <out>/gpt2-constant/

Relative paths (``out``, ``data.path``) are relative to the working directory, as with ``suite run``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from lawa_suite.config import ConfigError, ResolvedConfig, parse_overrides, resolve, split_list
from lawa_suite.files import first_line, made_by, write_text_atomic
from lawa_suite.rundir import holds_run, is_run_folder
from lawa_suite.bench.sweeps import Sweep, check_lmc, check_sweeps, parse_lmc, parse_sweeps

__all__ = ["Bench", "Cell", "load_bench", "cells", "cell_config", "check_out", "validate", "write_spec", "BENCH_FILE"]

BENCH_FILE = "bench.yaml"          # the resolved bench spec, written into ``out`` (what `suite report` finds)
TOP_KEYS = {"out", "tasks", "averager", "variants", "lrs", "seeds", "threads", "set", "slurm", "accelerate",
            "posthoc", "lmc"}
TASK_KEYS = {"lrs", "seeds"}       # per-task axes; every other per-task key is a `suite run` setting
AXIS_ALIASES = {"task": "tasks", "lr": "lrs", "seed": "seeds", "averagers": "averager"}


@dataclass
class SlurmConfig:
    gpus: int = 8                  # GPUs per cell (one node; accelerate launch starts one process per GPU)
    cpus_per_gpu: int = 8
    time: str = "72:00:00"
    partition: str = ""            # empty: the cluster's default
    setup: str = ""                # shell lines run before the launch (module load, source .venv/bin/activate)


@dataclass
class TaskSpec:
    name: str                      # the entry's name: the task, or a label for a second setting of one (task: below)
    lrs: list[float] = field(default_factory=list)   # empty: the bench's lrs (or the preset's lr)
    seeds: list[int] = field(default_factory=list)   # empty: the bench's seeds
    settings: dict[str, str] = field(default_factory=dict)  # `suite run` key -> value for this task
    task: str = ""                 # the registered task, when the entry's name is a label (gpt2-constant: {task: gpt2})

    @property
    def registered(self) -> str:
        return self.task or self.name


@dataclass
class Bench:
    out: str = "runs/bench"
    tasks: list[TaskSpec] = field(default_factory=list)
    averager: list[str] = field(default_factory=lambda: ["lawa", "ema", "swa"])
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"of": averager, key: value}
    lrs: list[float] = field(default_factory=list)   # empty: each task's preset lr
    seeds: list[int] = field(default_factory=lambda: [0])
    threads: int = 0               # torch threads per run; 0 = torch's default
    settings: dict[str, str] = field(default_factory=dict)  # `suite run` settings of every cell
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    accelerate: str = ""           # extra `accelerate launch` arguments, e.g. "--mixed_precision bf16"
    whole: list[TaskSpec] = field(default_factory=list)  # the file's tasks when tasks= picked some: bench.yaml's
    posthoc: list[Sweep] = field(default_factory=list)  # post-hoc sweeps after each run
    lmc: list[tuple[float, float]] = field(default_factory=list)  # linear paths between saved weights, each run

    def as_dict(self) -> dict[str, Any]:
        return {"out": self.out, "averager": ",".join(self.averager), "variants": self.variants,
                "lrs": ",".join(f"{lr:g}" for lr in self.lrs), "seeds": ",".join(map(str, self.seeds)),
                "threads": self.threads, "set": self.settings, "slurm": dataclasses.asdict(self.slurm),
                "accelerate": self.accelerate, "posthoc": {w.name: " ".join(w.words) for w in self.posthoc},
                "lmc": [list(p) for p in self.lmc],
                "tasks": {t.name: {**({"task": t.task} if t.task else {}),
                                   **({"lrs": ",".join(f"{lr:g}" for lr in t.lrs)} if t.lrs else {}),
                                   **({"seeds": ",".join(map(str, t.seeds))} if t.seeds else {}), **t.settings}
                          for t in self.whole or self.tasks}}


@dataclass(frozen=True)
class Cell:
    """One training run of the matrix."""
    index: int
    task: str
    lr: float
    seed: int
    out: Path
    overrides: tuple[str, ...]     # the full `suite run` command line of the cell

    @property
    def label(self) -> str:
        return f"{self.task} lr={self.lr:g} seed={self.seed}"


# -- parsing -------------------------------------------------------------------------------------------------
def _as_list(key: str, value: Any, kind: Callable[[str], Any], allowed: str) -> list[Any]:
    items = value if isinstance(value, list) else split_list(str(value))
    try:
        parsed = [kind(str(v).strip()) for v in items if str(v).strip()]
    except ValueError:
        raise ConfigError(f"{key}: expected {allowed}, got {value!r}") from None
    if not parsed:
        raise ConfigError(f"{key}: expected {allowed}, got an empty list")
    if len(set(parsed)) != len(parsed):
        raise ConfigError(f"{key}: expected distinct values, got {value!r}")
    return parsed


def _lrs(key: str, value: Any) -> list[float]:
    lrs = _as_list(key, value, float, "a comma list of numbers > 0 (e.g. 0.1,0.01)")
    if any(lr <= 0 for lr in lrs):
        raise ConfigError(f"{key}: expected a comma list of numbers > 0, got {value!r}")
    return lrs


def _seeds(key: str, value: Any) -> list[int]:
    return _as_list(key, value, int, "a comma list of integers (e.g. 0,1)")


def _settings(key: str, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping of suite run settings (e.g. {{steps: 600}}), got {value!r}")
    return {str(k): _scalar(v) for k, v in value.items()}


def _scalar(value: Any) -> str:
    """A YAML value as the command-line word `suite run` would read back to the same value."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):  # [32,64] reads back as a list (ddpm.channels); averager=[a,b] too
        return "[" + ",".join(_scalar(v) for v in value) + "]"
    return "" if value is None else str(value)


def _task_specs(value: Any) -> list[TaskSpec]:
    if value is None:
        raise ConfigError("tasks: missing; expected a comma list of tasks (e.g. tasks=cifar,gpt2) or a mapping "
                          "task -> settings")
    if not isinstance(value, dict):
        return [TaskSpec(name) for name in _as_list("tasks", value, str, "a comma list of task names")]
    specs = []
    for name, body in value.items():
        if not isinstance(body, (dict, type(None))):  # checked before dict(): dict(5) would be a TypeError
            raise ConfigError(f"tasks.{name}: expected a mapping of settings, got {body!r}")
        body = dict(body or {})
        spec = TaskSpec(str(name))
        if "lrs" in body:
            spec.lrs = _lrs(f"tasks.{name}.lrs", body.pop("lrs"))
        if "seeds" in body:
            spec.seeds = _seeds(f"tasks.{name}.seeds", body.pop("seeds"))
        if "task" in body:  # a second setting of a task under its own label (its own cell folders)
            spec.task = str(body.pop("task"))
        spec.settings = _settings(f"tasks.{name}", body)
        specs.append(spec)
    return specs


def _variants(value: Any) -> dict[str, dict[str, Any]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"variants: expected a mapping name -> {{of: <averager>, <key>: <value>}}, got {value!r}")
    out = {}
    for name, body in value.items():
        if not isinstance(body, dict) or "of" not in body:
            raise ConfigError(f"variants.{name}: expected {{of: <averager>, <key>: <value>...}}, got {body!r}")
        out[str(name)] = dict(body)
    return out


def _select(tasks: dict[str, Any], value: str) -> dict[str, Any]:
    wanted = _as_list("tasks", value, str, "a comma list of task names")
    missing = [t for t in wanted if t not in tasks]
    if missing:
        raise ConfigError(f"tasks: the bench file has no task {missing[0]!r}; it has {', '.join(tasks)}")
    return {t: tasks[t] for t in wanted}


def load_bench(path: Path | None, overrides: list[str]) -> Bench:
    """A bench from a YAML file (optional) and command-line ``key=value`` words (which win).

    Bench keys are ``out tasks averager variants lrs seeds threads``; any other word is a `suite run` setting for
    every cell (``steps=100``). Errors are ``ConfigError`` with one line naming the key and what is allowed.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"bench file: {path} not found")
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"bench file: {path} is not valid YAML ({first_line(exc)})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"bench file: {path} must hold a mapping of bench keys ({', '.join(sorted(TOP_KEYS))})")
        unknown = sorted(set(raw) - TOP_KEYS)
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown bench key; allowed: {', '.join(sorted(TOP_KEYS))} "
                              f"(run settings go under set:)")
    run_settings = _settings("set", raw.get("set"))
    seen: dict[str, str] = {}
    whole: Any = None
    for key, value in parse_overrides(overrides).items():
        given, key = key, AXIS_ALIASES.get(key, key)
        if key in seen:
            raise ConfigError(f"{key}: given twice (as {seen[key]}= and {given}=)")
        seen[key] = given
        if key == "tasks" and isinstance(raw.get("tasks"), dict):
            whole = raw["tasks"]
            raw["tasks"] = _select(raw["tasks"], value)  # run a subset of the file's tasks, with their settings
        elif key in TOP_KEYS - {"set", "variants", "slurm", "posthoc", "lmc"}:
            raw[key] = value
        else:
            run_settings[key] = value
    bench = Bench(settings=run_settings)
    if whole is not None:  # bench.yaml describes the whole bench, whichever part of it this process runs
        bench.whole = _task_specs(whole)
    bench.out = str(raw.get("out", bench.out))
    bench.tasks = _task_specs(raw.get("tasks"))
    if "averager" in raw:
        bench.averager = [] if str(raw["averager"]).strip() in ("", "none") else _as_list(
            "averager", raw["averager"], str, "a comma list of averager names")
    bench.variants = _variants(raw.get("variants"))
    bench.lrs = _lrs("lrs", raw["lrs"]) if raw.get("lrs") not in (None, "") else []
    bench.seeds = _seeds("seeds", raw["seeds"]) if raw.get("seeds") not in (None, "") else bench.seeds
    try:
        bench.threads = int(raw.get("threads", 0))
    except (TypeError, ValueError):
        raise ConfigError(f"threads: expected an integer >= 0, got {raw.get('threads')!r}") from None
    if bench.threads < 0:
        raise ConfigError(f"threads: expected an integer >= 0, got {bench.threads}")
    bench.accelerate = str(raw.get("accelerate", "") or "")
    bench.posthoc = parse_sweeps(raw.get("posthoc"))
    bench.lmc = parse_lmc(raw.get("lmc"))
    slurm = raw.get("slurm") or {}
    fields = {f.name for f in dataclasses.fields(SlurmConfig)}
    if not isinstance(slurm, dict) or set(slurm) - fields:
        raise ConfigError(f"slurm: expected a mapping with keys {', '.join(sorted(fields))}, got {slurm!r}")
    bench.slurm = SlurmConfig(**slurm)
    for key in ("task", "lr", "seed", "out", "resume", "averager"):
        if key in bench.settings or any(key in t.settings for t in bench.tasks):
            raise ConfigError(f"{key}: set by the bench itself (use the bench keys tasks, lrs, seeds, out, "
                              f"averager), not as a run setting")
    return bench


# -- averager variants ------------------------------------------------------------------------------------------
def _variant_settings(variants: dict[str, dict[str, Any]], used: list[str]) -> dict[str, str]:
    """A variant is a named instance (``config.averager_bases``): its body becomes the run settings
    ``<name>.of=<averager>`` and ``<name>.<key>=<value>``, so each cell's config.yaml is self-contained."""
    return {f"{name}.{k}": _scalar(v) for name, body in variants.items() if name in used for k, v in body.items()}


# -- the matrix ---------------------------------------------------------------------------------------------------
def _preset_lr(task: str, averager: list[str], settings: dict[str, str]) -> float:
    words = [f"task={task}", f"averager={','.join(averager)}", *(f"{k}={v}" for k, v in settings.items())]
    return resolve(words).run.lr


MIN_EVALS = 20  # evaluations a bench run makes at least, unless eval.every is set: phases and crossings need them


def _eval_every(task: str, averager: list[str], settings: dict[str, str]) -> dict[str, str]:
    """``eval.every`` giving at least ``MIN_EVALS`` evaluations a run, where the bench leaves it to the preset."""
    if "eval.every" in settings:
        return {}
    words = [f"task={task}", f"averager={','.join(averager)}", *(f"{k}={v}" for k, v in settings.items())]
    run = resolve(words).run
    return {"eval.every": str(max(1, run.steps // MIN_EVALS))} if run.steps // run.eval.every < MIN_EVALS else {}


def cells(bench: Bench) -> list[Cell]:
    """Every (task, lr, seed) cell, in file order; each with its full `suite run` command line."""
    found = []
    for spec in bench.tasks:
        settings = {**bench.settings, **spec.settings, **_variant_settings(bench.variants, bench.averager)}
        settings.update(_eval_every(spec.registered, bench.averager, settings))
        lrs = spec.lrs or bench.lrs or [_preset_lr(spec.registered, bench.averager, settings)]
        for lr in lrs:
            for seed in spec.seeds or bench.seeds:
                out = Path(bench.out) / spec.name / f"lr{lr:g}-seed{seed}"
                words = [f"task={spec.registered}", f"averager={','.join(bench.averager)}", f"lr={lr!r}",
                         f"seed={seed}", f"out={out}", "resume=auto", *(f"{k}={v}" for k, v in settings.items())]
                found.append(Cell(len(found), spec.registered, lr, seed, out, tuple(words)))
    return found


def cell_config(cell: Cell) -> ResolvedConfig:
    """The cell's resolved run config; it checkpoints every evaluation (the default) unless the bench says
    otherwise, so a killed bench loses at most one evaluation period of its interrupted cell."""
    return resolve(list(cell.overrides))


def check_out(bench: Bench) -> None:
    """A bench's ``out`` holds its cells, each a run: it may not be a run, lie inside one, or hold one unless it is a
    bench's folder already (its ``bench.yaml``: benches resume there), nor be another command's output. One line
    (exit 2) before anything is written; the bench would otherwise write its spec and cells into the run and point
    ``suite report`` at it, which rewrites the run's own report."""
    out = Path(bench.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out: {out} is a file; out= names the bench's folder")
    real = out.resolve()
    for folder in (real, *real.parents):
        if is_run_folder(folder):
            where = "is the run folder" if folder == real else f"lies inside the run {folder}"
            raise ConfigError(f"out: {out} {where}; a bench writes its cells (runs of their own) into a folder of its "
                              f"own: choose another out=")
    if not out.is_dir() or (out / BENCH_FILE).is_file():  # new, or a bench's folder: its runs are its cells
        return
    if (owner := made_by(out)) is not None:
        raise ConfigError(f"out: {out} was written by {owner}; a bench writes into a folder of its own: choose "
                          f"another out=")
    if (run := holds_run(out)) is not None:
        raise ConfigError(f"out: {out} holds a run ({run}) and is not a bench's folder (no {BENCH_FILE}); a bench "
                          f"writes its cells into a folder of its own: choose another out=")


def validate(bench: Bench) -> list[tuple[Cell, ResolvedConfig]]:
    """Check ``out`` (``check_out``) and resolve every cell before any work, so a typo in the last task stops the
    bench at once (exit 2)."""
    check_out(bench)
    planned = [(cell, cell_config(cell)) for cell in cells(bench)]
    for _, cfg in planned:
        check_sweeps(bench.posthoc, cfg)
        check_lmc(bench.lmc, cfg)
    return planned


def write_spec(bench: Bench) -> Path:
    out = Path(bench.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / BENCH_FILE
    write_text_atomic(path, yaml.safe_dump(bench.as_dict(), sort_keys=False))
    return path
