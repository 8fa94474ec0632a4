"""The run folder: created once, never overwritten by accident; its ``config.yaml`` and ``metrics.jsonl``.

``out`` holds one run. Starting again there is refused unless resuming it with the same config (the keys that
may change on resume are ``RESUMABLE_CHANGES``; a key the saved config lacks because the suite gained it later counts
as the value it was added with, ``ADDED_KEYS``); a folder holding only the config of a run that stopped before
its first step may be reused. A saved ``config.yaml`` resolves again to the config that made the run.
``metrics.jsonl`` is appended and flushed line by line, and ``metrics-meta.json`` beside it, written as the run starts,
says what its metrics mean (``write_metrics_meta``: which way is better, the headline, notes), so a report reads a
plugin evaluator's metrics from the folder alone; on resume the lines after the checkpoint's step are
dropped, since the resumed run computes them again. A process killed mid-write may leave its last line cut
short: readers skip that line with a warning (``read_metrics``); anything else that is not the suite's records is
a one-line error naming the file and the line. Resuming needs the suite's own ``config.yaml`` in ``out``: a
folder without one is refused before anything is written.

One process writes a run folder at a time: the main process of a run holds its lock (``run_lock.lock_run``) from
``prepare_run_dir`` until the run ends (``MetricsLog.close``) or the process exits.

What marks a run (``holds_run``): a ``config.yaml`` in a folder that no other command marked as its output
(``files.OUTPUT_MARK``). Commands that write a folder (``suite average``, ``suite export``, ``suite eval``,
``suite analyze lmc``) go through ``claim_out``: an ``out=`` that is, holds or lies in one of their inputs is
refused, and ``--force`` replaces only a folder the same command made before and that holds no run.

What a killed process left in a run folder (the temporary file of an atomic write it never renamed into place) is
removed when a run starts or resumes there (``prepare_run_dir``) and whenever the suite writes a file there
atomically (a report), once that process is gone (``files.remove_dead_leftovers``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from lawa_suite.config import ResolvedConfig, dotted, resolve
from lawa_suite.errors import ConfigError, DamagedFile, SuiteError, warn
from lawa_suite.files import OUTPUT_MARK, inside, made_by, remove_dead_leftovers, write_text_atomic
from lawa_suite.run_lock import lock_file, lock_run, refuse_if_locked, unlock_run

__all__ = ["MetricsLog", "read_metrics", "truncate_metrics", "prepare_run_dir", "lock_run", "unlock_run",
           "lock_file", "holds_run", "is_run_folder", "claim_out", "find_run_config", "read_saved", "load_resolved",
           "config_differences", "dotted", "RESUMABLE_CHANGES", "ADDED_KEYS", "with_added_keys", "CONFIG_FILE",
           "METRICS_FILE", "METRICS_META_FILE", "write_metrics_meta", "read_metrics_meta", "SWEEPS_DIR", "LMC_DIR"]

# What a run folder holds, by name: the trainer, the bench's post-hoc sweeps and the reports all name them from here.
CONFIG_FILE = "config.yaml"      # the fully resolved config, written before training starts
METRICS_FILE = "metrics.jsonl"   # one JSON record a line
METRICS_META_FILE = "metrics-meta.json"  # what those records' metrics mean (``write_metrics_meta``)
SWEEPS_DIR = "posthoc"           # a bench cell's post-hoc sweeps: one folder per sweep (``sweeps.run_sweeps``)
LMC_DIR = "lmc"                  # a bench cell's linear paths: one folder per pair of fractions (``sweeps.run_lmc``)

# Keys that may change between a run and its resumption (none changes what is computed); any other difference is
# refused.
RESUMABLE_CHANGES = {"resume", "reset_averagers", "progress", "trackers", "out", "data.cache", "checkpoint.every",
                     "checkpoint.keep"}

# Keys the suite gained after runs were made with it: dotted key -> (the task whose runs have it, None for every run;
# the value a run made before the key existed computed with; when the key was added). A saved config lacking one
# holds that value, for resuming it (``config_differences``) and for reports grouping runs of two versions as one
# experiment (``report.meaning``).
ADDED_KEYS: dict[str, tuple[str | None, Any, str]] = {
    "distributed": (None, "ddp", "2026-12-02"),
    "cifar.model": ("cifar", "preact_resnet18", "2026-12-02"),
    "cifar.patch_size": ("cifar", 0, "2026-12-02"),
    "compile": (None, False, "2026-12-05"),
    "tf32": (None, False, "2026-12-07"),          # before the key, a CUDA run kept PyTorch's defaults: tf32=false
    "deterministic": (None, False, "2026-12-07"),
    "schedulefree.r": (None, 0.0, "2026-12-07"),              # used only by optimizer=schedulefree, added with it
    "schedulefree.weight_lr_power": (None, 2.0, "2026-12-07"),
    "gpt2.optimizer": ("gpt2", "adamw", "2026-12-07"),
    "ddpm.optimizer": ("ddpm", "adamw", "2026-12-07"),
    "ddpm.fid.final_samples": ("ddpm", 0, "2026-12-07"),     # one sample count at every evaluation before
    "ddpm.fid.final_at": ("ddpm", [1.0], "2026-12-07"),
}


def with_added_keys(task: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """A saved config's dotted keys, with every ``ADDED_KEYS`` entry of its task it lacks at the value it had."""
    added = {key: value for key, (of, value, _) in ADDED_KEYS.items() if of in (None, task)}
    return {**added, **config}


class MetricsLog:
    """``metrics.jsonl``: one JSON object a line, flushed as it goes; non-finite numbers become null."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.file = open(path, "a", encoding="utf-8") if enabled else None

    def write(self, record: dict[str, Any]) -> None:
        if self.file is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            unlock_run(self.path.parent)  # the run has ended: its folder is free for the next process



def _metrics_lines(path: Path, warn: Callable[[str], None]) -> list[tuple[str, dict[str, Any]]]:
    """``(line, record)`` for each record of ``metrics.jsonl`` (see ``read_metrics``)."""
    raw = Path(path).read_bytes().split(b"\n")
    numbered = [(n, line) for n, line in enumerate(raw, 1) if line.strip()]
    found = []
    for n, line in numbered:
        try:
            text = line.decode("utf-8")
            record = json.loads(text)
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError both
            if n == numbered[-1][0]:  # a process killed mid-write: the lines before it are whole
                warn(f"{path} line {n} is cut short (a run killed mid-write?); read the {len(found)} record(s) "
                     f"before it")
                break
            raise DamagedFile(f"{path} line {n} is not JSON ({exc.__class__.__name__}) and more lines follow it, so "
                              f"it is damage, not a cut-short last line; only the last line may be cut short") from None
        step = record.get("step") if isinstance(record, dict) else None
        if not (isinstance(step, int) and not isinstance(step, bool)
                and all(isinstance(record.get(k, ""), str) for k in ("weights", "split"))):
            raise ConfigError(f"{path} line {n} is not a lawa-suite metrics record (expected a JSON object with an "
                              f"integer step, as suite run writes); point at a run folder the suite wrote")
        found.append((text, record))
    return found


def read_metrics(path: Path, warn: Callable[[str], None] = warn) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``. A last line that is not JSON (a process killed mid-write) is skipped
    and ``warn``-ed about; a line before the last that is not JSON is a ``DamagedFile`` (exit 1); a JSON line that
    is not the suite's record (an object with an integer ``step``) is a ``ConfigError`` (exit 2: the folder is
    not a suite run). Each names the file and the line."""
    return [record for _, record in _metrics_lines(path, warn)]


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines logged after ``last_step`` (they belong to the part of the run a resume recomputes), and a last
    line a kill cut short."""
    if not path.exists():
        return
    kept = [line for line, record in _metrics_lines(path, warn) if record["step"] <= last_step]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


METRICS_META_FORMAT = "lawa-suite-metrics-meta/1"


def write_metrics_meta(out: Path, evaluator: str, metrics: Mapping[str, str], notes: Mapping[str, str]) -> None:
    """Record in run folder ``out`` what the metrics of its ``metrics.jsonl`` mean, as the run starts: its
    evaluator's name, ``metric -> "max"|"min"`` (which way is better; the first is the headline) and the sentences
    for metrics whose name alone could mislead. A file of its own, not part of ``config.yaml`` (the user's settings,
    which resume compares) nor a line of ``metrics.jsonl`` (whose every line is a record with a step, as readers
    and other tools expect); rewritten on resume, by the evaluator that writes the records from then on."""
    record = {"format": METRICS_META_FORMAT, "evaluator": evaluator, "metrics": dict(metrics), "notes": dict(notes)}
    write_text_atomic(Path(out) / METRICS_META_FILE, json.dumps(record, indent=1, ensure_ascii=False) + "\n")


def read_metrics_meta(out: Path) -> dict[str, Any] | None:
    """``{"evaluator", "metrics", "notes"}`` as ``write_metrics_meta`` recorded them in run folder ``out``, or None
    for a run made before runs recorded them (a report then falls back on its own table). A file that is not such a
    record is a one-line error naming it."""
    path = Path(out) / METRICS_META_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError both
        raise DamagedFile(f"{path} is not JSON ({exc.__class__.__name__}); suite run writes it whole, so it was "
                          f"damaged since; delete it to read the run with the report's own table") from None
    record = record if isinstance(record, dict) else {}
    metrics, notes = record.get("metrics"), record.get("notes", {})
    if not (record.get("format") == METRICS_META_FORMAT and isinstance(metrics, dict) and metrics
            and all(isinstance(k, str) and v in ("max", "min") for k, v in metrics.items())
            and isinstance(notes, dict) and all(isinstance(v, str) for v in notes.values())):
        raise ConfigError(f"{path} is not a lawa-suite metrics record (expected format {METRICS_META_FORMAT}, "
                          f"metrics mapping each metric to 'max' or 'min', notes to sentences)")
    return {"evaluator": record.get("evaluator", ""), "metrics": metrics, "notes": notes}


def prepare_run_dir(cfg: ResolvedConfig, is_main: bool) -> Path:
    """Check ``out`` (refuse to overwrite an earlier run unless resuming it with the same config); for the main
    process, lock it (``lock_run``), then create it and write ``config.yaml``. Every process calls it with
    ``is_main=False`` first (checks only), then the main process alone with ``is_main=True``, so a run of many
    processes locks its folder once."""
    out = Path(cfg.run.out)
    if not is_main:
        _check_run_dir(cfg, out, False)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    taken = lock_run(out)
    try:  # the checks again, under the lock: another process may have written out= since
        _check_run_dir(cfg, out, True)
        out.mkdir(parents=True, exist_ok=True)
        remove_dead_leftovers(out)  # atomic writes (metrics.jsonl, report.md, ...) a killed process never finished
        if not (out / "config.yaml").exists() or _never_started(cfg, out):
            write_text_atomic(out / "config.yaml", cfg.to_yaml())
    except BaseException:
        if taken:
            unlock_run(out)
        raise
    return out


def _never_started(cfg: ResolvedConfig, out: Path) -> bool:
    # A run that stopped before its first step (missing data, a bad tokenizer) left only config.yaml (and what its
    # metrics mean): starting again there loses nothing, so it is allowed and the config is rewritten.
    names = {p.name for p in out.iterdir()} if out.is_dir() else set()
    return CONFIG_FILE in names and names <= {CONFIG_FILE, METRICS_META_FILE} and not cfg.run.resume


def _is_lock_file(entry: Path) -> bool:
    """Whether ``entry`` is the lock file of a folder beside it (``files.lock_beside``: ``.<name>.lock``), such as
    ``lawa.dir=out/snapshots``'s, taken before the run writes anything: not a file of the run's, nor the user's."""
    return entry.name.startswith(".") and entry.name.endswith(".lock") and entry.is_file()


def _holds_files(out: Path) -> bool:
    """Whether ``out`` holds anything but lock files of folders inside it."""
    return any(not _is_lock_file(entry) for entry in out.iterdir())


def _refuse_a_config_among_other_files(out: Path) -> None:
    """A folder holding a run's ``config.yaml`` but none of its records (``metrics.jsonl``, ``checkpoints/``) has
    nothing to resume; with other files beside it (a user's report.md next to a copied config), a resume starting from
    step 0 would write over them: refused, naming them."""
    if (out / METRICS_FILE).exists() or (out / "checkpoints").exists():
        return
    own = {CONFIG_FILE, METRICS_META_FILE}
    others = sorted(e.name for e in out.iterdir() if e.name not in own and not _is_lock_file(e))
    if others:
        raise ConfigError(f"resume: {out} holds a config.yaml but no run records ({METRICS_FILE}, checkpoints/), "
                          f"beside {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}: it is not a run to "
                          f"continue, and starting one there would write over those; choose another out=")


def _check_run_dir(cfg: ResolvedConfig, out: Path, is_main: bool) -> None:
    refuse_if_locked(out)  # first: a run in progress is named as such, not as "a folder that holds a run"
    config_file = out / "config.yaml"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out: {out} is a file; out= names the run's folder")
    if made_by(out) is not None:  # scores hold a config.yaml and a metrics.jsonl too, but are not a run
        raise ConfigError(f"out: {out} was written by {made_by(out)}, not by suite run; choose another out=")
    never_started = _never_started(cfg, out)
    if config_file.exists() and not never_started:
        if not cfg.run.resume:
            raise ConfigError(f"out: {out} already holds a run; pass resume=auto to continue it, or another out=")
        saved = read_saved(config_file)
        _refuse_a_config_among_other_files(out)
        if (out / "metrics.jsonl").is_file():  # a foreign or damaged log stops the resume before it writes
            read_metrics(out / "metrics.jsonl", warn=lambda message: None)
        diffs = config_differences(saved, cfg.as_dict(), cfg.run.reset_averagers)
        if diffs:
            averager_names = set(saved.get("averager", [])) | set(cfg.averagers)
            touches_averagers = any(k == "averager" or k.split(".")[0] in averager_names for k in diffs)
            hint = "; to add, drop or retune averagers on resume pass reset_averagers=true" if touches_averagers else ""
            raise ConfigError(f"resume: the config differs from the saved run's in {', '.join(diffs)}; "
                              f"resume with the same settings or start a new out={hint}")
        if cfg.run.reset_averagers and is_main:  # the run's record follows the averagers it now has
            write_text_atomic(config_file, cfg.to_yaml())
    elif out.is_dir() and _holds_files(out) and not never_started:
        if cfg.run.resume:  # resume continues only what the suite made: another folder's files are not a run
            raise ConfigError(f"resume: {out} holds no config.yaml, so it is not a run of the suite; resume "
                              f"continues a folder suite run made (config.yaml, metrics.jsonl, checkpoints/); "
                              f"choose another out=")
        raise ConfigError(f"out: {out} exists and is not empty; choose another out=")


# -- folders other commands write ----------------------------------------------------------------------------
def holds_run(folder: Path) -> Path | None:
    """The first run in ``folder`` or below it (a ``config.yaml`` whose folder no command marked as its output:
    even a foreign one is kept, since it may be someone's run), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    for config in sorted(folder.rglob("config.yaml")):
        if config.is_file() and made_by(config.parent) is None:
            return config.parent
    return None


def is_run_folder(folder: Path) -> bool:
    """Whether ``suite run`` wrote ``folder``: a ``config.yaml`` of the suite (a mapping with a ``task``; no other
    command's output) beside its metrics, checkpoints or trajectory. (Stricter than ``holds_run``, which keeps any
    ``config.yaml`` below a folder safe: this one tells whether a folder *above* a new one is a run, where a project's
    own ``config.yaml`` and ``checkpoints/`` are common.)"""
    folder = Path(folder)
    if made_by(folder) is not None or not any((folder / name).exists()
                                              for name in (METRICS_FILE, "checkpoints", "trajectory")):
        return False
    try:
        read_saved(folder / CONFIG_FILE)
    except ConfigError:
        return False
    return True


def claim_out(out: Path, command: str, inputs: Iterable[Path], force: bool,
              error: type[SuiteError] = ConfigError, made: Callable[[Path], bool] | None = None) -> None:
    """The rule for every command that writes a folder ``out``: never an ``out`` that is, holds or lies in one of
    ``inputs``; a non-empty ``out`` only with ``force``, and then only one that ``command`` made before (its
    ``files.OUTPUT_MARK`` says so, or ``made``: a command whose older outputs carry no mark knows them by their own
    files) and that holds no run. Refusals are one line, as ``error`` (its exit code)."""
    out = Path(out)
    real = out.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if inside(real, source):
            raise error(f"out: {out} is or lies in the input {given}; inputs are never written, choose a folder "
                        f"outside it")
        if inside(source, real):
            raise error(f"out: {out} holds the input {given}; it would be replaced, choose a folder outside it")
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not force:
        raise error(f"out: {out} already exists and is not empty; choose another folder or pass --force to replace "
                    f"a folder {command} made")
    owner = made_by(out) if out.is_dir() else None
    if owner != command and not (owner is None and made is not None and out.is_dir() and made(out)):
        what = f"{owner} made it" if owner else f"no {OUTPUT_MARK} says {command} made it"
        raise error(f"out: {out} was not made by {command} ({what}); --force replaces only a folder {command} made "
                    f"before; choose another out=")
    run = holds_run(out)
    if run is not None:
        raise error(f"out: {out} holds a run ({run / 'config.yaml'}); --force never replaces a run, choose another "
                    f"out=")


# -- saved configs ---------------------------------------------------------------------------------------------
def find_run_config(path: Path) -> Path:
    """The ``config.yaml`` of the run that ``path`` lies in (the nearest one at or above it)."""
    path = Path(path)
    for folder in [path, *path.parents] if path.is_dir() else list(path.parents):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    raise ConfigError(f"config: no config.yaml in {path} or any folder above it; pass config=<run>/config.yaml")


def read_saved(file: Path) -> dict[str, Any]:
    """A saved ``config.yaml`` as the nested dict it holds; a file that is not a run config is a ConfigError."""
    if not file.is_file():
        raise ConfigError(f"config: {file} not found (expected a run folder holding config.yaml)")
    try:  # safe_load: a Python tag (!!python/object/apply:...) is an error here, never code that runs
        saved = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config: {file} is not a lawa-suite run config ({_yaml_problem(exc)}); the suite reads "
                          f"plain YAML, no Python tags") from None
    if not isinstance(saved, dict) or "task" not in saved:
        raise ConfigError(f"config: {file} is not a lawa-suite run config (no 'task' key)")
    return saved


def _yaml_problem(exc: Exception) -> str:
    """One line for a YAML error: its problem and line (the library's message spans several lines)."""
    problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem}, line {mark.line + 1}" if mark is not None else problem


def load_resolved(path: str | os.PathLike[str]) -> ResolvedConfig:
    """Re-resolve a saved ``config.yaml`` (or the run folder holding it) into the config that made the run."""
    file = Path(path)
    file = file / "config.yaml" if file.is_dir() else file
    return resolve({}, base=dotted(read_saved(file)))


def config_differences(saved: dict[str, Any], now: dict[str, Any], reset_averagers: bool = False) -> list[str]:
    """Dotted keys whose values differ between a saved config and a new one, except ``RESUMABLE_CHANGES``; a key the
    saved config lacks because the suite gained it later is the value it was added with (``ADDED_KEYS``). With
    ``reset_averagers`` the averager list and the averagers' sections may change too."""
    a, b = with_added_keys(saved.get("task", ""), dotted(saved)), dotted(now)
    averager_keys = {"averager"} | {f"{n}." for n in list(saved.get("averager", [])) + list(now.get("averager", []))}
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in RESUMABLE_CHANGES or a.get(key) == b.get(key):
            continue
        if reset_averagers and (key == "averager" or any(key.startswith(p) for p in averager_keys if p.endswith("."))):
            continue
        diffs.append(key)
    return diffs
