"""The ``suite`` command line: parses, then delegates. Heavy imports happen inside commands so that
``suite --help`` stays fast. Every error a user can cause is a ``SuiteError`` carrying its exit code
(``errors.py``); ``user_errors`` turns it into ``error: <message>`` and that code, in one place.

One spelling rule for every command: a setting, anything with a value, is a ``key=value`` word (``out=DIR``,
``config=FILE``, ``weights=lawa``, ``cell=3``); a ``--flag`` is a switch and takes no value (``--force``,
``--dry-run``, ``--allow-torch-load``). ``--name value`` is answered with the word to write instead."""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from lawa_suite.errors import EXIT_INTERRUPTED, ConfigError, SuiteError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
                  help="lawa-suite: does averaging weights along a training run make the model better, sooner?")

OVERRIDES_HELP = ("key=value overrides, e.g. task=cifar averager=lawa,ema,swa preset=cpu lawa.k=5 lawa.nu=100 "
                  "steps=600 lr=0.1 out=runs/cifar (see `suite list` for tasks, presets and averagers)")


WORDS = {"ignore_unknown_options": True}  # a stray --name reaches the words, which say how to spell it
SETTING = re.compile(r"^[A-Za-z_][\w.]*=")    # a key=value word (a path holding "=" is written ./name=...)


def words_of(words: Optional[list[str]], switches: str = "") -> list[str]:
    """A command's ``key=value`` words; ``--name`` (a value given the other way) is an error naming the word."""
    for word in words or []:
        if word.startswith("--"):
            name = word[2:].partition("=")[0]
            here = f"here: {switches}" if switches else "this command has none"
            raise ConfigError(f"{word}: not a switch of this command; settings are key=value words ({name}=...), "
                              f"and --flags are switches without a value ({here})")
    return list(words or [])


def take(words: list[str], *keys: str) -> tuple[dict[str, str], list[str]]:
    """``(the words of keys, the other words)``: a command's own settings out of words that go on elsewhere."""
    from lawa_suite.config import parse_overrides

    mine = [w for w in words if w.partition("=")[0].strip() in keys]
    return parse_overrides(mine), [w for w in words if w not in mine]


def fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def not_utf8(values: Any) -> str | None:
    """The first word or path among ``values`` (and the lists in it) that is not UTF-8, as an error message: the
    shell hands such bytes over as surrogate escapes, which the suite cannot write into config.yaml, manifests
    and reports."""
    for value in values:
        if isinstance(value, (list, tuple)):
            found = not_utf8(value)
            if found:
                return found
            continue
        if not isinstance(value, (str, Path)):
            continue
        text = str(value)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            key, _, rest = text.partition("=")
            name, value = (key, rest) if SETTING.match(text) else ("path", text)
            bad = next(c for c in value if "\ud800" <= c <= "\udfff")
            try:  # the bytes as given (the shell's surrogate escapes undone)
                shown = ascii(value.encode("utf-8", "surrogateescape"))[1:]
            except UnicodeEncodeError:
                shown = ascii(value)
            byte = f" (byte 0x{ord(bad) - 0xdc00:02x})" if "\udc80" <= bad <= "\udcff" else ""
            return (f"{name}: {shown} is not UTF-8{byte}; name files and folders in UTF-8 (the suite writes them "
                    f"into config.yaml, manifests and reports)")
    return None


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command; a ``SuiteError`` exits with its code and message, an ``OSError`` with 1 and the file and
    reason, Ctrl-C outside training (which saves and stops by itself) with 130. Anything else is a bug, and its
    traceback is what a report needs. A word or path that is not UTF-8 exits 2 before the command starts."""
    @functools.wraps(command)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        wrong = not_utf8([*args, *kwargs.values()])
        if wrong:
            raise fail(wrong, 2)
        try:
            return command(*args, **kwargs)
        except SuiteError as exc:
            raise fail(str(exc), exc.exit_code) from None
        except OSError as exc:
            raise fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "), 1) from None
        except KeyboardInterrupt:
            raise fail("interrupted (Ctrl-C) before training started or outside it; nothing half-written was "
                       "left behind", EXIT_INTERRUPTED) from None
    return guarded


@app.command(context_settings=WORDS)
@user_errors
def run(
    overrides: Annotated[Optional[list[str]], typer.Argument(
        help=OVERRIDES_HELP + "; config=FILE: a saved config.yaml (or the run folder holding it) to run again, "
                              "the other words on top", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help=(
        "Print the resolved config and, as # comment lines after it, the memory plan per rank: parameters, "
        "gradients, optimizer, averagers, activations of one micro-batch, checkpoint bytes, and whether it fits "
        "the GPU, for 1 process and for ddp and fsdp over more (processes=1,8 by default, and WORLD_SIZE when set; "
        "gpu_memory=GiB of the device, 80 by default: an H100); then exit."))] = False,
) -> None:
    """Train a task while averagers watch; score raw and averaged weights on the same data."""
    from lawa_suite.config import dotted, parse_overrides, resolve
    from lawa_suite.rundir import read_saved, with_added_keys

    own, words = take(words_of(overrides, "--dry-run"), "config", "processes", "gpu_memory")
    plan_words = [key for key in ("processes", "gpu_memory") if key in own]
    if plan_words and not dry_run:
        raise ConfigError(f"{plan_words[0]}: a setting of the --dry-run memory plan; a run takes its processes from "
                          f"its launcher (torchrun, accelerate launch) and its memory from the GPU")
    base = None
    given = parse_overrides(words)
    task = str(given.get("task", "")).strip()
    if "config" in own:
        config = Path(own["config"])
        base = dotted(read_saved(config / "config.yaml" if config.is_dir() else config))
        if task and task != str(base.get("task", "")):  # its task's keys would be "unknown keys" of another task
            raise ConfigError(f"task: config={own['config']} is a run of task {base.get('task')}, whose settings do "
                              f"not carry over to task {task}; drop task= or start without config=")
    elif given.get("resume") and given.get("out") and (Path(given["out"]) / "config.yaml").is_file():
        # resuming a run: its saved config is the base (keys the suite gained since at the values the run had), and
        # the words on top are checked against it
        saved = dotted(read_saved(Path(given["out"]) / "config.yaml"))
        if task and task != str(saved.get("task", "")):
            raise ConfigError(f"task: the run at {given['out']} is task {saved.get('task')}; resume it without task= "
                              f"(or task={saved.get('task')}), or choose another out= for a {task} run")
        base = with_added_keys(str(saved.get("task", "")), saved)
    cfg = resolve(words, base=base)
    if dry_run:
        from lawa_suite.training import memory_plan

        typer.echo(cfg.to_yaml(), nl=False)
        # A plan for the machine it is meant for, not the one it is typed on: one GPU and one 8-GPU machine unless
        # processes= says otherwise, and the world this command was launched into, if any
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        processes = (memory_plan.parse_processes(own["processes"]) if "processes" in own
                     else tuple(dict.fromkeys([*memory_plan.DEFAULT_PROCESSES, world])))
        memory = memory_plan.parse_gpu_memory(own["gpu_memory"]) if "gpu_memory" in own \
            else memory_plan.DEFAULT_GPU_MEMORY_GIB
        typer.echo(memory_plan.plan_text(cfg, processes, memory), nl=False)
        return
    first_process = int(os.environ.get("RANK", "0") or 0) == 0  # torchrun and accelerate launch set it per process
    # `suite run` alone starts minutes of work: say which, and how to see it; so does a resume of a folder that holds
    # no run (out= mistyped, say), which starts the same default job there
    what = "suite run with no settings" if not overrides else _default_run_on_resume(given, base, own)
    if first_process and what:
        rc = cfg.run
        typer.echo(f"{what}: task={rc.task} preset={rc.preset or 'default'}, {rc.steps} steps, "
                   f"averager={','.join(rc.averager) or 'none'}, out={rc.out} (`suite run --dry-run` shows every "
                   f"setting; Ctrl-C stops it with a checkpoint)", err=True)
    from lawa_suite.training.loop import train

    result = train(cfg)
    if first_process:  # one line for the run, not one per process
        typer.echo(f"done: {result.step} steps; report: {result.out / 'report.md'}")


def _default_run_on_resume(given: dict[str, str], base: Any, own: dict[str, str]) -> str:
    """What to say when ``resume=`` (with ``out=`` at most) finds no run to resume and so starts the default run; ''
    for any other command line (its words say what it runs, or the folder's own refusal follows)."""
    if base is not None or own or not given.get("resume") or not set(given) <= {"out", "resume"}:
        return ""
    if not given.get("out"):
        return "suite run: resume= without out= has no run to resume, so a new run with the default settings starts"
    out = Path(given["out"])
    if out.is_dir() and any(out.iterdir()):  # not a run, yet not empty: the run folder's check refuses it
        return ""
    return f"suite run: {out} holds no run yet (nothing to resume), so a new run with the default settings starts there"


@app.command("list")
@user_errors
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


@app.command(context_settings=WORDS)
@user_errors
def report(
    words: Annotated[list[str], typer.Argument(
        help="One run directory (its own report.md), or several run directories or a bench directory (one "
             "cross-run report); out=DIR: where the cross-run report goes (default: the bench directory, or the "
             "run directories' common parent); title=TEXT: its title.", show_default=False)],
) -> None:
    """(Re)write report.md and curves.png for one run, or a cross-run report (report.md, report.html, a PNG per
    task: seed-mean curves with bands, steps to target, the high-vs-low learning-rate gap, the LAWA claims)."""
    import os

    from lawa_suite.report import find_runs, is_run_dir, write_bench_report, write_report
    from lawa_suite.rundir import read_saved

    words = words_of(words)
    settings = [w for w in words if SETTING.match(w)]
    own, unknown = take(settings, "out", "title")
    if unknown:
        raise ConfigError(f"{unknown[0].partition('=')[0]}: not a key of suite report (out, title)")
    out, title = (Path(own["out"]) if own.get("out") else None), own.get("title", "")
    paths = [Path(w) for w in words if not SETTING.match(w)]
    if not paths:
        raise ConfigError("paths: expected one or more run directories or a bench directory")
    for path in paths:
        if not path.exists():
            raise ConfigError(f"{path}: does not exist (expected a run directory or a folder holding run directories)")
        if not path.is_dir() or not find_runs([path]):
            raise fail(f"{path}: not a run directory (expected config.yaml and metrics.jsonl in it) nor a folder "
                       f"holding run directories", 2)
    if len(paths) == 1 and is_run_dir(paths[0]) and out is None:
        typer.echo(write_report(paths[0]))
        return
    for run_dir in find_runs(paths):  # every config read plainly first: one line for a foreign or hostile one
        read_saved(run_dir / "config.yaml")
    if out is not None and is_run_dir(out):
        raise ConfigError(f"out: {out} is a run folder and its report.md is the run's own; choose another out= for "
                          f"the cross-run report")
    target = out or (paths[0] if len(paths) == 1 else Path(os.path.commonpath([p.resolve() for p in paths])))
    typer.echo(write_bench_report(list(paths), target, title))
    typer.echo(target / "report.html")


BENCH_HELP = ("[BENCH.yaml] then key=value: the axes tasks=cifar,gpt2 averager=lawa,ema,swa lrs=0.1,0.01 seeds=0,1, "
              "out=DIR, threads=N, and any suite run setting for every cell (steps=600); emit=accelerate|slurm writes "
              "cluster jobs instead of running (commands.sh, and bench.sbatch for slurm); cell=N runs only that cell "
              "(0-based; what the emitted commands and the SLURM array use)")


@app.command(context_settings=WORDS)
@user_errors
def bench(
    words: Annotated[Optional[list[str]], typer.Argument(help=BENCH_HELP, show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the cells and their status, then stop.")] = False,
) -> None:
    """Run a matrix of runs (tasks x learning rates x seeds; every averager watches each run), skipping finished
    cells and resuming interrupted ones; or write it out as accelerate / SLURM jobs.

    Example: suite bench benchmarks/cpu-reference.yaml, or suite bench tasks=gpt2 lrs=1e-2,1e-3 seeds=0,1 preset=tiny
    """
    from lawa_suite.bench import cell_status, load_bench, run_bench, validate
    from lawa_suite.bench.cluster import emit as emit_jobs

    words = words_of(words, "--dry-run")
    spec_file = Path(words.pop(0)) if words and "=" not in words[0] else None
    own, words = take(words, "emit", "cell")
    emit = own.get("emit")
    if emit not in (None, "accelerate", "slurm"):
        raise ConfigError(f"emit: expected accelerate or slurm, got {emit!r}")
    cell = own.get("cell")
    if cell is not None and not cell.strip().isdigit():
        raise ConfigError(f"cell: expected a cell index (an integer >= 0), got {cell!r}")
    cell = None if cell is None else int(cell)
    plan = load_bench(spec_file, words)
    if dry_run:
        for c, cfg in validate(plan):
            typer.echo(f"{c.index:>3} {cell_status(c, cfg):<8} {c.label:<32} {c.out}")
        return
    if emit:
        for path in emit_jobs(plan, emit):
            typer.echo(f"wrote {path}")
        return
    result = run_bench(plan, log=lambda m: typer.echo(m, err=True), only=cell)
    typer.echo(f"bench {plan.out}: {len(result.done)} cell(s) run, {len(result.skipped)} finished before, "
               f"{len(result.failed)} failed")
    if result.failed:
        raise typer.Exit(1)
    if cell is None:
        typer.echo(f"report: suite report {plan.out}")


@app.command()
@user_errors
def verify(paths: Annotated[list[Path], typer.Argument(
        help="Checkpoint folders, a run's checkpoints/, or a run folder.")]) -> None:
    """Check checkpoints against their manifests (sizes and sha256); exit 1 if any is invalid."""
    from lawa_suite import checkpoints as ckpt

    bad = 0
    for path in paths:
        if not path.exists():  # exit 2 as for every command: a path that does not exist is a wrong argument
            raise ConfigError(f"{path}: does not exist (expected a checkpoint folder, a run's checkpoints/ or a run "
                              f"folder)")
        is_checkpoint = (path / "manifest.json").exists() or path.name.startswith("step-")
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path  # a run folder
        targets = [path] if is_checkpoint else [c.path for c in ckpt.list_checkpoints(folder)]
        if not targets:
            raise fail(f"{path}: no checkpoint found (expected step-NNNNNNNN/ folders with a manifest.json)", 1)
        for target in targets:
            problems = ckpt.verify(target)
            bad += bool(problems)
            typer.echo(f"{target}: " + ("ok" if not problems else "INVALID: " + "; ".join(problems)))
    if bad:
        raise typer.Exit(1)


EXPORT_HELP = ("out=DIR: the folder to write (new or empty); weights=raw (default) or the averager whose average to "
               "export; config=FILE: the run's config.yaml, when PATH lies outside the run")


@app.command(context_settings=WORDS)
@user_errors
def export(
    path: Annotated[Path, typer.Argument(help="A run folder, a checkpoint folder, or a .safetensors weights file.")],
    words: Annotated[Optional[list[str]], typer.Argument(help=EXPORT_HELP, show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an out folder that suite export wrote.")] = False,
) -> None:
    """Write raw or averaged weights in the task's standard format (a Hugging Face model, a diffusers pipeline).

    Example: suite export runs/gpt2 out=hf-lawa weights=lawa
    """
    from lawa_suite.config import parse_overrides
    from lawa_suite.export import export as export_weights

    pairs = parse_overrides(words_of(words, "--force"))
    out, weights, config = pairs.pop("out", ""), pairs.pop("weights", "raw"), pairs.pop("config", "")
    if pairs:
        raise ConfigError(f"{sorted(pairs)[0]}: not a key of suite export (out, weights, config)")
    if not out:
        raise ConfigError("out: expected the folder to write (for example out=hf-lawa)")
    typer.echo(export_weights(path, Path(out), weights or "raw", Path(config) if config else None, force))


AVERAGE_HELP = ("averager=NAME[,NAME...] <averager>.<key>=V[,V...] (a grid: every combination) [interval=N] out=DIR "
                "[key=K: the mapping holding the weights in torch checkpoints, when they hold several] "
                "[prefix=P: strip P. from every name] [eval=true and task/run keys such as task=, preset=, data.path=, "
                "eval.batches=]")
TORCH_LOAD_HELP = ("Also read torch checkpoints (.pt, .pth, .bin, .ckpt, .pth.tar: nanoGPT, timm, Lightning and the "
                   "like), with torch.load(weights_only=True).")


@app.command(context_settings=WORDS)
@user_errors
def average(
    source: Annotated[Path, typer.Argument(help="A trajectory: a run folder, its trajectory/ or checkpoints/, or a "
                                                "folder of step-N.safetensors files, step-N/ model folders, or "
                                                "(with --allow-torch-load) torch checkpoints named by step.")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help=AVERAGE_HELP, show_default=False)] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace an out folder that suite average wrote (atomically).")] = False,
    allow_torch_load: Annotated[bool, typer.Option("--allow-torch-load", help=TORCH_LOAD_HELP)] = False,
    hash_inputs: Annotated[bool, typer.Option("--hash-inputs", help=(
        "Read every input in full for its sha256 (for the manifest) and check it against the sha256 recorded when "
        "the suite wrote it. Without it the manifest takes a recorded sha256 whose file still has the recorded "
        "size and mtime, and size and mtime alone for other inputs."))] = False,
) -> None:
    """Replay saved checkpoints through averagers (post hoc), in constant memory; optionally score the results.

    Example: suite average runs/cifar/trajectory averager=lawa lawa.k=5 lawa.nu=100 interval=300 out=runs/cifar-lawa
    """
    from lawa_suite.posthoc import average as average_trajectory, parse_command

    command = parse_command(words_of(overrides, "--force, --allow-torch-load, --hash-inputs"))
    if command.evaluate:  # a bad task or run key stops the command before the averaging, not after it
        from lawa_suite.evaluation import eval_config

        eval_config(source, command.eval_overrides)
    result = average_trajectory(source, command.jobs, command.out, command.interval, force, allow_torch_load,
                                log=lambda message: typer.echo(message, err=True), at=command.at,
                                hash_inputs=hash_inputs)
    for folder, steps in result.outputs.items():
        typer.echo(f"{folder}: {len(steps)} derived checkpoint(s) at step(s) {', '.join(map(str, steps))}")
    typer.echo(f"wrote {result.out}")
    if command.evaluate:
        _evaluate(result.out, command.eval_overrides, allow_torch_load, command.at)


def _evaluate(out: Path, overrides: list[str], allow_torch_load: bool, at: Any = None) -> None:
    from lawa_suite.evaluation import evaluate_posthoc

    report_path = evaluate_posthoc(out, overrides, allow_torch_load, log=lambda m: typer.echo(m, err=True), at=at)
    typer.echo(f"report: {report_path}")


@app.command("eval", context_settings=WORDS)
@user_errors
def evaluate(
    path: Annotated[Path, typer.Argument(help="A folder written by suite average, or a folder of checkpoints (a run's "
                                              "trajectory, Hugging Face checkpoint-N/ folders).")],
    overrides: Annotated[Optional[list[str]], typer.Argument(
        help="task and run keys (task=, preset=, data.path=, eval.batches=...; default: the source run's "
             "config.yaml); for Hugging Face causal-LM folders: data.path=, eval.batches=, seq_len=, batch_size=, "
             "tokenizer=auto|gpt2|bytes, mixed_precision=; key=, prefix=: how to read the raw torch checkpoints "
             "(default: as the averaging did); out=DIR: where a folder of checkpoints is scored to",
        show_default=False)] = None,
    allow_torch_load: Annotated[bool, typer.Option("--allow-torch-load",
                                                   help="The raw checkpoints are torch files.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an out folder that suite eval wrote.")] = False,
) -> None:
    """Score every derived checkpoint of a suite average output against the raw checkpoint of its step, or every
    checkpoint of a folder.

    Example: suite eval ~/pythia data.path=corpus.txt out=runs/pythia-raw
    """
    from lawa_suite.evaluation import evaluate as evaluate_folder
    from lawa_suite.posthoc import weights_at

    own, words = take(words_of(overrides, "--allow-torch-load, --force"), "key", "prefix", "out")
    out = own.pop("out", None)
    report_path = evaluate_folder(path, words, allow_torch_load, log=lambda m: typer.echo(m, err=True),
                                  at=weights_at(own) if own else None, out=out or None, force=force)
    typer.echo(f"report: {report_path}")


analyze_app = typer.Typer(no_args_is_help=True, help="Trajectory analysis: linear paths between checkpoints.")
app.add_typer(analyze_app, name="analyze")


PROFILE_HELP = ("averager=lawa,ema,phema (names or named instances), steps=N (default 1000), out=FILE.png (default "
                "profiles.png), and <averager>.<key>=v1,v2 (each value its own panel)")


@app.command(context_settings=WORDS)
@user_errors
def profile(
    overrides: Annotated[Optional[list[str]], typer.Argument(help=PROFILE_HELP, show_default=False)] = None,
) -> None:
    """Draw the weight each averager gives every step of a run (its profile), read off the averager class itself."""
    from lawa_suite.config import parse_overrides, split_list
    from lawa_suite.posthoc import parse_jobs
    from lawa_suite.averagers.weight_profiles import MAX_STEPS, draw, profile as profile_of

    pairs = parse_overrides(words_of(overrides))
    names = split_list(pairs.pop("averager", "lawa,ema,swa"))
    out = Path(pairs.pop("out", "") or "profiles.png")
    raw_steps = pairs.pop("steps", "1000")
    if not raw_steps.strip().isdigit() or not 1 <= int(raw_steps) <= MAX_STEPS:
        raise ConfigError(f"steps: expected an integer in 1..{MAX_STEPS}, got {raw_steps}")
    if out.suffix.lower() != ".png":
        raise ConfigError(f"out: expected a .png file, got {str(out)!r}")
    steps = int(raw_steps)
    drawn = []
    for job in parse_jobs(names, pairs):
        found = profile_of(job.cls, job.config, steps, label=job.folder)
        if found is None:
            typer.echo(f"{job.folder}: not ready after {steps} steps; nothing to draw", err=True)
            continue
        typer.echo(found.summary())
        drawn.append(found)
    if not drawn:
        raise ConfigError(f"steps: no averager is ready after {steps} steps; give more steps")
    typer.echo(f"wrote {draw(drawn, out, f'averager profiles over a run of {steps} steps')}")


LMC_HELP = ("points=N (default 6: alpha 0, 0.2, ..., 1), out=DIR, key=, prefix= (as for suite average), and task/run "
            "keys (default: A's run config.yaml)")


@analyze_app.command("lmc", context_settings=WORDS)
@user_errors
def analyze_lmc(
    a: Annotated[Path, typer.Argument(help="Checkpoint A: a .safetensors file or a checkpoint/model folder.")],
    b: Annotated[Path, typer.Argument(help="Checkpoint B.")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help=LMC_HELP, show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Write into an out folder an earlier suite analyze lmc "
                                                        "wrote.")] = False,
    allow_torch_load: Annotated[bool, typer.Option("--allow-torch-load", help=TORCH_LOAD_HELP)] = False,
) -> None:
    """Scores along alpha*A + (1-alpha)*B (is there a barrier?) and how often A and B predict differently."""
    from lawa_suite.evaluation import Evaluation, check_out, default_out, eval_config, lmc, lmc_lines, write_lmc
    from lawa_suite.config import parse_overrides
    from lawa_suite.posthoc import read_checkpoint, weights_at

    pairs = parse_overrides(words_of(overrides, "--force, --allow-torch-load"))
    at = weights_at(pairs)
    out = pairs.pop("out", "") or default_out("lmc")
    raw_points = pairs.pop("points", "6")
    if not raw_points.strip().isdigit() or int(raw_points) < 2:
        raise ConfigError(f"points: expected an integer >= 2, got {raw_points!r}")
    cfg = eval_config(a, [f"{k}={v}" for k, v in pairs.items()])
    check_out(out, force, inputs=[a, b])  # before the work, which may take long
    said: list[str] = []
    weights_a, weights_b = (read_checkpoint(p, allow_torch_load, at, log=said.append) for p in (a, b))
    from lawa_suite.export import holds_schedule_free_state

    for path in (a, b):  # its weights are the training sequence y; suite eval and export score x, the eval sequence
        if holds_schedule_free_state(path if path.is_dir() else path.parent):
            said.append(f"{path}: a schedule-free run's checkpoint; the path runs through its training sequence y "
                        f"(the weights the averagers saw), not its eval sequence x")
    for line in dict.fromkeys(said):
        typer.echo(line, err=True)
    evaluation = Evaluation(cfg)
    result = lmc(evaluation, weights_a, weights_b, int(raw_points))
    path = write_lmc(out, result, evaluation.metrics, (str(a), str(b)), force)
    for line in lmc_lines(result, evaluation.metrics):
        typer.echo(line)
    typer.echo(f"wrote {path} and {path.with_suffix('.png').name}")


def main() -> None:
    """The ``suite`` command. Launched as one of several processes (torchrun, accelerate launch), the process ends
    once the command is done without the interpreter's finalization (``end_process``)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        app()
        return
    try:
        app()
        code: int | str | None = 0
    except SystemExit as exc:
        code = exc.code
    end_process(code)


def end_process(code: int | str | None) -> None:
    """Exit now, as ``sys.exit(code)`` would but without tearing the interpreter down: exit handlers run, output is
    flushed, then ``os._exit``. In a process of a distributed run, C++ threads (gloo's, PyTorch's) may still release
    Python objects while the interpreter is being finalized, which takes the GIL there and aborts the process now and
    then ("terminate called without an active exception", SIGABRT; pytorch/pytorch#190489) after its work is done:
    torchrun then reports the run failed and kills the other processes. Ending the process group first makes it
    rarer (``train.Run.release_process_group``), not impossible."""
    import atexit

    if isinstance(code, str):  # (what sys.exit does with a message)
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    main()
