"""The run folder: created once, never overwritten by accident; its ``config.yaml`` and ``metrics.jsonl``.

``out`` holds one run. Starting again there is refused unless resuming it with the same config (the keys that
may change on resume are ``RESUMABLE_CHANGES``); a folder holding only the config of a run that stopped before
its first step may be reused. A saved ``config.yaml`` resolves again to the config that made the run.
``metrics.jsonl`` is appended and flushed line by line; on resume the lines after the checkpoint's step are
dropped, since the resumed run computes them again.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import yaml

from lawa_suite.config import ResolvedConfig, dotted, resolve
from lawa_suite.errors import ConfigError
from lawa_suite.files import write_text_atomic

__all__ = ["MetricsLog", "truncate_metrics", "prepare_run_dir", "find_run_config", "read_saved", "load_resolved",
           "config_differences", "RESUMABLE_CHANGES"]

# Keys that may change between a run and its resumption (none changes what is computed); any other difference is
# refused.
RESUMABLE_CHANGES = {"resume", "reset_averagers", "progress", "trackers", "out", "data.cache", "checkpoint.every",
                     "checkpoint.keep"}


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


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines logged after ``last_step`` (they belong to the part of the run a resume recomputes)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def prepare_run_dir(cfg: ResolvedConfig, is_main: bool) -> Path:
    """Create ``out``; refuse to overwrite an earlier run unless resuming it with the same config."""
    out = Path(cfg.run.out)
    config_file = out / "config.yaml"
    # A run that stopped before its first step (missing data, a bad tokenizer) left only config.yaml: starting
    # again there loses nothing, so it is allowed and the config is rewritten.
    never_started = out.is_dir() and {p.name for p in out.iterdir()} == {"config.yaml"} and not cfg.run.resume
    if config_file.exists() and not never_started:
        if not cfg.run.resume:
            raise ConfigError(f"out: {out} already holds a run; pass resume=auto to continue it, or another out=")
        saved = read_saved(config_file)
        diffs = config_differences(saved, cfg.as_dict(), cfg.run.reset_averagers)
        if diffs:
            averager_names = set(saved.get("averager", [])) | set(cfg.averagers)
            touches_averagers = any(k == "averager" or k.split(".")[0] in averager_names for k in diffs)
            hint = "; to add, drop or retune averagers on resume pass reset_averagers=true" if touches_averagers else ""
            raise ConfigError(f"resume: the config differs from the saved run's in {', '.join(diffs)}; "
                              f"resume with the same settings or start a new out={hint}")
        if cfg.run.reset_averagers and is_main:  # the run's record follows the averagers it now has
            write_text_atomic(config_file, cfg.to_yaml())
    elif out.exists() and any(out.iterdir()) and not cfg.run.resume and not never_started:
        raise ConfigError(f"out: {out} exists and is not empty; choose another out=")
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not config_file.exists() or never_started:
            write_text_atomic(config_file, cfg.to_yaml())
    return out


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
    saved = yaml.safe_load(file.read_text())
    if not isinstance(saved, dict) or "task" not in saved:
        raise ConfigError(f"config: {file} is not a lawa-suite run config (no 'task' key)")
    return saved


def load_resolved(path: str | os.PathLike[str]) -> ResolvedConfig:
    """Re-resolve a saved ``config.yaml`` (or the run folder holding it) into the config that made the run."""
    file = Path(path)
    file = file / "config.yaml" if file.is_dir() else file
    return resolve({}, base=dotted(read_saved(file)))


def config_differences(saved: dict[str, Any], now: dict[str, Any], reset_averagers: bool = False) -> list[str]:
    """Dotted keys whose values differ between two configs, except ``RESUMABLE_CHANGES``; with
    ``reset_averagers`` the averager list and the averagers' sections may change too."""
    a, b = dotted(saved), dotted(now)
    averager_keys = {"averager"} | {f"{n}." for n in list(saved.get("averager", [])) + list(now.get("averager", []))}
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in RESUMABLE_CHANGES or a.get(key) == b.get(key):
            continue
        if reset_averagers and (key == "averager" or any(key.startswith(p) for p in averager_keys if p.endswith("."))):
            continue
        diffs.append(key)
    return diffs
