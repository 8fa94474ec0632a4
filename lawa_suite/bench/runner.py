"""Running a bench: each cell a `suite run` in its own folder, one after another, resumable (a finished cell is
skipped, an interrupted one continues from its newest checkpoint), then the post-hoc sweeps and linear paths the
bench asks for after each cell. What a bench is and which cells it has: ``spec.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from lawa_suite.bench.spec import Bench, Cell, validate, write_spec
from lawa_suite.bench.sweeps import run_lmc, run_sweeps
from lawa_suite.config import ConfigError, ResolvedConfig
from lawa_suite.errors import CheckpointError, DataUnavailable, NonFiniteTraining, Preempted
from lawa_suite.rundir import METRICS_FILE, read_metrics
from lawa_suite.threads import torch_threads

__all__ = ["cell_status", "BenchResult", "run_bench", "after_run"]


def cell_status(cell: Cell, cfg: ResolvedConfig) -> str:
    """``done`` (a committed checkpoint at the final step, or the final evaluation recorded: a bench whose results
    were kept without their checkpoints, as a committed reference is), ``partial`` (a run folder to resume) or
    ``new``."""
    from lawa_suite import checkpoints as ckpt

    if not (cell.out / "config.yaml").is_file():
        return "new"
    if not (cell.out / "metrics.jsonl").is_file():
        return "partial"
    saved = ckpt.list_checkpoints(cell.out / "checkpoints")
    if any(c.step >= cfg.run.steps and not ckpt.verify(c.path) for c in saved):
        return "done"
    last = max((r["step"] for r in read_metrics(cell.out / METRICS_FILE) if _raw_evaluation(r)), default=0)
    return "done" if last >= cfg.run.steps else "partial"


def _raw_evaluation(record: dict[str, Any]) -> bool:
    """A ``metrics.jsonl`` record scoring the raw weights (not a training line, not another weights' score)."""
    return (record.get("split") != "train" and record.get("weights", "raw") == "raw"
            and any(isinstance(v, (int, float)) for k, v in record.items() if k not in ("step", "split", "weights")))


@dataclass
class BenchResult:
    done: list[Cell] = field(default_factory=list)       # finished now
    skipped: list[Cell] = field(default_factory=list)    # finished before
    failed: list[tuple[Cell, str]] = field(default_factory=list)


def run_bench(bench: Bench, log: Callable[[str], None] = print, only: int | None = None) -> BenchResult:
    """Run the cells one after another (or only cell ``only``); finished cells are skipped, partial ones resumed.

    A failure in one cell (non-finite training, missing data) is recorded and the next cell runs; a SIGTERM
    (``Preempted``) stops the bench at once, its cell checkpointed, to be continued by running the bench again.
    """
    from lawa_suite.training.loop import train  # lazily: the training stack only when a bench runs

    planned = validate(bench)
    # a cell=N job reads the spec and never rewrites it (many processes, one file); two processes running parts of
    # one bench write the same whole spec, atomically
    if only is None:
        write_spec(bench)
    elif not 0 <= only < len(planned):
        raise ConfigError(f"cell: expected an index in [0, {len(planned) - 1}], got {only}")
    result = BenchResult()
    with torch_threads(bench.threads):  # put back when the bench ends: the caller's process keeps its own count
        for cell, cfg in planned:
            if only is not None and cell.index != only:
                continue
            status = cell_status(cell, cfg)
            if status == "done":
                log(f"[{cell.index + 1}/{len(planned)}] {cell.label}: done before, skipped ({cell.out})")
                result.skipped.append(cell)
                result.failed += [(cell, f) for f in after_run(cell, bench, log)]
                continue
            log(f"[{cell.index + 1}/{len(planned)}] {cell.label}: "
                f"{'resuming' if status == 'partial' else 'starting'} ({cell.out})")
            try:
                train(cfg)
            except Preempted as exc:  # the cell is checkpointed: running the bench again continues it
                raise Preempted(f"{exc}; run the same suite bench again to continue") from None
            except (NonFiniteTraining, DataUnavailable, CheckpointError, ConfigError) as exc:
                log(f"[{cell.index + 1}/{len(planned)}] {cell.label}: FAILED: {exc}")
                result.failed.append((cell, str(exc)))
                continue
            result.done.append(cell)
            result.failed += [(cell, f) for f in after_run(cell, bench, log)]
    return result


def after_run(cell: Cell, bench: Bench, log: Callable[[str], None]) -> list[str]:
    """A finished cell's post-hoc sweeps and linear paths (``sweeps.py``); returns the failures."""
    return run_sweeps(cell.out, bench.posthoc, log) + run_lmc(cell.out, bench.lmc, log)
