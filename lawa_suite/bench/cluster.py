"""The cluster form of a bench (``suite bench emit=accelerate|slurm``): one ``accelerate launch`` line per cell,
and for SLURM an array job with one task per cell. Each command runs one cell of the bench spec through
``suite bench cell=N``, so variants, skipping, resuming and post-hoc sweeps work as they do locally."""

from __future__ import annotations

import shlex
from pathlib import Path

from lawa_suite.bench.spec import Bench, validate, write_spec

__all__ = ["emit"]


def _launch(spec: Path, index: int, bench: Bench) -> str:
    extra = f" {bench.accelerate}" if bench.accelerate else ""
    return (f"accelerate launch --num_processes {bench.slurm.gpus}{extra} -m lawa_suite.cli bench "
            f"{shlex.quote(str(spec))} cell={index}")


def emit(bench: Bench, kind: str) -> list[Path]:
    """Write the cluster form of the bench into ``out``: ``commands.sh`` (one ``accelerate launch`` per cell)
    and, for ``slurm``, ``bench.sbatch`` (an array job, one task per cell). Each command runs one cell of the
    bench spec through `suite bench cell=N`, so variants, skipping and resuming work the same as locally."""
    planned = validate(bench)
    spec = write_spec(bench)
    out = Path(bench.out)
    lines = ["#!/bin/sh", f"# {len(planned)} cells of {spec}; each line is one cell (resume=auto: re-run a line "
             "to continue it). The equivalent suite run words are in the comment above it.", "set -e"]
    for cell, _ in planned:
        lines += [f"# cell {cell.index}: suite run {' '.join(shlex.quote(w) for w in cell.overrides)}",
                  _launch(spec, cell.index, bench)]
    commands = out / "commands.sh"
    commands.write_text("\n".join(lines) + "\n")
    commands.chmod(0o755)
    written = [spec, commands]
    if kind == "slurm":
        written.append(_write_sbatch(bench, spec, len(planned)))
    return written


def _write_sbatch(bench: Bench, spec: Path, count: int) -> Path:
    s = bench.slurm
    lines = ["#!/bin/bash", "#SBATCH --job-name=lawa-bench", f"#SBATCH --array=0-{count - 1}", "#SBATCH --nodes=1",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --gpus-per-node={s.gpus}",
             f"#SBATCH --cpus-per-task={s.gpus * s.cpus_per_gpu}", f"#SBATCH --time={s.time}",
             f"#SBATCH --output={Path(bench.out) / 'slurm-%A_%a.out'}",
             # SIGTERM 5 minutes before the time limit: the loop checkpoints and exits 143; requeue to continue
             "#SBATCH --signal=B:TERM@300", "#SBATCH --requeue"]
    if s.partition:
        lines.append(f"#SBATCH --partition={s.partition}")
    # exec: the batch shell becomes accelerate, so the early SIGTERM reaches the launcher rather than bash
    lines += ["set -e", s.setup, "exec " + _launch(spec, 0, bench).replace("cell=0", "cell=$SLURM_ARRAY_TASK_ID")]
    path = Path(bench.out) / "bench.sbatch"
    path.write_text("\n".join(line for line in lines if line) + "\n")
    return path

