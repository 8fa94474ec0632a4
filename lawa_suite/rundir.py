"""The run folder: created once, never overwritten by accident, and its ``metrics.jsonl``.

``out`` holds one run. Starting again there is refused unless resuming it with the same config (the keys that
may change on resume are ``config.RESUMABLE_CHANGES``); a folder holding only the config of a run that stopped
before its first step may be reused. ``metrics.jsonl`` is appended and flushed line by line; on resume the lines
after the checkpoint's step are dropped, since the resumed run computes them again.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from lawa_suite.config import ResolvedConfig, config_differences
from lawa_suite.errors import ConfigError
from lawa_suite.files import write_text_atomic

__all__ = ["MetricsLog", "truncate_metrics", "prepare_run_dir"]


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
        saved = yaml.safe_load(config_file.read_text())
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
