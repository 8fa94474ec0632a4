"""Post-hoc sweeps of a bench: one training run answers a sweep of averager settings.

A bench's ``posthoc`` key names sweeps, each the words of a ``suite average`` command (``averager=phema
phema.sigma_rel=0.02,0.05,0.1,0.2`` reconstructs EMAs of those lengths from the averages phema stored;
``averager=lawa lawa.k=2,5,10 lawa.nu=10,20`` replays the saved trajectory). After a cell's run, each sweep is
averaged into ``<cell>/posthoc/<sweep>/`` and scored on the run's held-out batches, the raw checkpoint of the same
step beside it (``suite eval``), so a sweep's gains over raw are paired like the online averagers'. A sweep that
finished is skipped when the bench runs again; one averaged but not scored is scored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lawa_suite.config import ConfigError, ResolvedConfig, parse_overrides

__all__ = ["SWEEPS_DIR", "Sweep", "parse_sweeps", "check_sweeps", "run_sweeps"]

SWEEPS_DIR = "posthoc"  # in a cell's run folder: one folder per sweep


@dataclass(frozen=True)
class Sweep:
    name: str
    words: tuple[str, ...]   # `suite average` words, without out= and eval=

    def command(self, cell_out: Path) -> Any:
        from lawa_suite.posthoc import parse_command

        return parse_command([*self.words, f"out={cell_out / SWEEPS_DIR / self.name}"])


def parse_sweeps(value: Any) -> list[Sweep]:
    """``posthoc: {name: "averager=... <averager>.<key>=v1,v2 [interval=N]"}`` -> sweeps, each checked whole."""
    if value in (None, ""):
        return []
    if not isinstance(value, dict):
        raise ConfigError(f"posthoc: expected a mapping name -> suite average words (e.g. ema_length: averager=phema "
                          f"phema.sigma_rel=0.05,0.1,0.2), got {value!r}")
    sweeps = []
    for name, words in value.items():
        name = str(name)
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"posthoc.{name}: expected a name of letters, digits, - and _ (it names a folder)")
        if not isinstance(words, str) or not words.strip():
            raise ConfigError(f"posthoc.{name}: expected suite average words such as 'averager=lawa lawa.k=2,5', "
                              f"got {words!r}")
        split = tuple(words.split())
        given = parse_overrides(list(split))
        if taken := sorted({"out", "eval"} & set(given)):
            raise ConfigError(f"posthoc.{name}: {taken[0]}= is set by the bench (the sweep writes "
                              f"<cell>/{SWEEPS_DIR}/{name} and is always scored)")
        sweep = Sweep(name, split)
        try:
            sweep.command(Path("."))
        except ConfigError as exc:
            raise ConfigError(f"posthoc.{name}: {exc}") from None
        sweeps.append(sweep)
    return sweeps


def check_sweeps(sweeps: list[Sweep], cfg: ResolvedConfig) -> None:
    """What the sweeps need from every cell's run, checked before any training: a saved trajectory for averagers that
    replay it; for one reconstructed from stored averages, a run averager of that kind that stores them."""
    for sweep in sweeps:
        for job in sweep.command(Path(".")).jobs:
            if not job.cls.stored_format:
                if not cfg.run.trajectory.every:
                    raise ConfigError(f"posthoc.{sweep.name}: {job.name} replays the saved trajectory; set "
                                      f"trajectory.every (a divisor of steps={cfg.run.steps}) for the runs")
                continue
            storing = [name for name, c in cfg.averagers.items() if cfg.registered(name) == job.averager
                       and getattr(c, "snapshot_every", 0)]
            if not storing:
                raise ConfigError(f"posthoc.{sweep.name}: {job.name} is reconstructed from the averages a run's "
                                  f"{job.averager} stores; add {job.averager} to averager with "
                                  f"{job.averager}.snapshot_every=N")


def run_sweeps(cell_out: Path, sweeps: list[Sweep], log: Callable[[str], None]) -> list[str]:
    """Average and score every sweep of a finished cell; returns the failures (one line each)."""
    from lawa_suite.analysis import evaluate_posthoc
    from lawa_suite.errors import SuiteError
    from lawa_suite.posthoc import average

    failures = []
    for sweep in sweeps:
        out = cell_out / SWEEPS_DIR / sweep.name
        if (out / "metrics.jsonl").is_file():
            log(f"  posthoc {sweep.name}: done before, skipped")
            continue
        command = sweep.command(cell_out)
        try:
            if not (out / "manifest.json").is_file():
                result = average(cell_out, command.jobs, out, command.interval)
                log(f"  posthoc {sweep.name}: {sum(len(v) for v in result.outputs.values())} outputs in "
                    f"{len(result.outputs)} folder(s)")
            evaluate_posthoc(out)
            log(f"  posthoc {sweep.name}: scored ({out / 'report.md'})")
        except SuiteError as exc:
            failures.append(f"posthoc {sweep.name}: {exc}")
            log(f"  posthoc {sweep.name}: FAILED: {exc}")
    return failures
