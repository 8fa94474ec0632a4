"""The ``suite`` command line: parses, then delegates. Heavy imports happen inside commands so that
``suite --help`` stays fast. Bad input exits with code 2 and one line naming the key and what is allowed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
                  help="lawa-suite: does averaging weights along a training run make the model better, sooner?")

OVERRIDES_HELP = ("key=value overrides, e.g. task=cifar averager=lawa,ema,swa preset=cpu lawa.k=5 lawa.nu=100 "
                  "steps=600 lr=0.1 out=runs/cifar (see `suite list` for tasks, presets and averagers)")


def fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@app.command()
def run(
    overrides: Annotated[Optional[list[str]], typer.Argument(help=OVERRIDES_HELP, show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and exit.")] = False,
) -> None:
    """Train a task while averagers watch; score raw and averaged weights on the same data."""
    from lawa_suite.config import ConfigError, resolve

    try:
        cfg = resolve(list(overrides or []))
    except ConfigError as exc:
        raise fail(str(exc), 2) from None
    if dry_run:
        typer.echo(cfg.to_yaml(), nl=False)
        return
    from lawa_suite.checkpoints import CheckpointError
    from lawa_suite.tasks.base import DataUnavailable
    from lawa_suite.train import EXIT_NONFINITE, EXIT_PREEMPTED, NonFiniteTraining, Preempted, train

    try:
        result = train(cfg)
    except ConfigError as exc:
        raise fail(str(exc), 2) from None
    except (DataUnavailable, CheckpointError) as exc:
        raise fail(str(exc), 1) from None
    except NonFiniteTraining as exc:
        raise fail(str(exc), EXIT_NONFINITE) from None
    except Preempted as exc:
        raise fail(str(exc), EXIT_PREEMPTED) from None
    typer.echo(f"done: {result.step} steps; report: {result.out / 'report.md'}")


@app.command("list")
def list_plugins() -> None:
    """Tasks (with presets and data sources), averagers and evaluators, and where each comes from."""
    from lawa_suite import registry

    for reg in (registry.tasks, registry.averagers, registry.evaluators):
        typer.echo(f"{reg.kind}s:")
        for info in reg.describe():
            origin = info.source + (f" [{info.distribution}]" if info.distribution else "")
            if info.error:
                typer.echo(f"  {info.name:<12} BROKEN  {origin}: {info.error}")
                continue
            extra = ""
            if reg is registry.tasks:
                extra = (f"  presets: {', '.join(info.obj.presets)} (default {info.obj.default_preset});"
                         f" data: {', '.join(info.obj.data_sources)}; evaluator: {info.obj.evaluator}")
            typer.echo(f"  {info.name:<12} {origin}{extra}")


@app.command()
def report(run_dirs: Annotated[list[Path], typer.Argument(help="Run directories holding metrics.jsonl.")]) -> None:
    """(Re)write report.md and curves.png for finished runs."""
    from lawa_suite.report import write_report

    for run_dir in run_dirs:
        if not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "config.yaml").is_file():
            raise fail(f"{run_dir}: not a run directory (expected config.yaml and metrics.jsonl in it)", 2)
        typer.echo(write_report(run_dir))


@app.command()
def verify(paths: Annotated[list[Path], typer.Argument(help="Checkpoint folders, or a run's checkpoints/.")]) -> None:
    """Check checkpoints against their manifests (sizes and sha256); exit 1 if any is invalid."""
    from lawa_suite import checkpoints as ckpt

    bad = 0
    for path in paths:
        is_checkpoint = (path / "manifest.json").exists() or path.name.startswith("step-")
        targets = [path] if is_checkpoint else [c.path for c in ckpt.list_checkpoints(path)]
        if not targets:
            raise fail(f"{path}: no checkpoint found (expected step-NNNNNNNN/ folders with a manifest.json)", 1)
        for target in targets:
            problems = ckpt.verify(target)
            bad += bool(problems)
            typer.echo(f"{target}: " + ("ok" if not problems else "INVALID: " + "; ".join(problems)))
    if bad:
        raise typer.Exit(1)


@app.command()
def export(
    path: Annotated[Path, typer.Argument(help="A run folder, a checkpoint folder, or a .safetensors weights file.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write (must be new or empty).")],
    weights: Annotated[str, typer.Option("--weights", help="raw, or the averager whose average to export.")] = "raw",
    config: Annotated[Optional[Path], typer.Option("--config", help="The run's config.yaml, when PATH lies outside the run.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out.")] = False,
) -> None:
    """Write raw or averaged weights in the task's standard format (a Hugging Face model, a diffusers pipeline)."""
    from lawa_suite.checkpoints import CheckpointError
    from lawa_suite.config import ConfigError
    from lawa_suite.export import export as export_weights
    from lawa_suite.tasks.base import ExportUnsupported

    try:
        typer.echo(export_weights(path, out, weights, config, force))
    except (ConfigError, ExportUnsupported) as exc:
        raise fail(str(exc), 2) from None
    except CheckpointError as exc:
        raise fail(str(exc), 1) from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
