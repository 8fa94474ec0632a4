"""What a bench does after each run: post-hoc sweeps (one training run answers a sweep of averager settings) and
linear paths between the run's saved checkpoints (``lmc``, claim (e)).

A bench's ``posthoc`` key names sweeps, each the words of a ``suite average`` command (``averager=phema
phema.sigma_rel=0.02,0.05,0.1,0.2`` reconstructs EMAs of those lengths from the averages phema stored;
``averager=lawa lawa.k=2,5,10 lawa.nu=10,20`` replays the saved trajectory). After a cell's run, each sweep is
averaged into ``<cell>/posthoc/<sweep>/`` and scored on the run's held-out batches, the raw checkpoint of the same
step beside it (``suite eval``), so a sweep's gains over raw are paired like the online averagers'. A sweep that
finished is skipped when the bench runs again; one averaged but not scored is scored.

``lmc: [[0.1, 0.2], [0.5, 0.6]]`` scores the straight path between the run's saved weights at those fractions of
its steps (``suite analyze lmc``, 3 points: the ends and the midpoint) into ``<cell>/lmc/<a>-<b>/``: is the
average of two checkpoints better than the checkpoints, early and later in training?
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lawa_suite.config import ConfigError, ResolvedConfig, parse_overrides
from lawa_suite.errors import SuiteError
from lawa_suite.rundir import LMC_DIR, SWEEPS_DIR

__all__ = ["Sweep", "parse_sweeps", "check_sweeps", "run_sweeps", "parse_lmc", "check_lmc",
           "run_lmc"]



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
    from lawa_suite.evaluation import evaluate_posthoc
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


# -- linear paths between a run's saved checkpoints -----------------------------------------------------------
def parse_lmc(value: Any) -> list[tuple[float, float]]:
    """``[[a, b], ...]``: pairs of fractions of the run, 0 < a < b <= 1."""
    if value in (None, ""):
        return []
    allowed = "a list of pairs of fractions of the run, earlier first (e.g. [[0.1, 0.2], [0.5, 0.6]])"
    if not isinstance(value, list) or not all(isinstance(p, list) and len(p) == 2 for p in value):
        raise ConfigError(f"lmc: expected {allowed}, got {value!r}")
    pairs = []
    for a, b in value:
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)) or not 0 < a < b <= 1:
            raise ConfigError(f"lmc: expected {allowed}, got [{a}, {b}]")
        pairs.append((float(a), float(b)))
    return pairs


def _lmc_steps(pair: tuple[float, float], steps: int) -> tuple[int, int]:
    return round(pair[0] * steps), round(pair[1] * steps)


def check_lmc(pairs: list[tuple[float, float]], cfg: ResolvedConfig) -> None:
    """Every fraction must fall on a step the run saves (``trajectory.every``), checked before any training."""
    every, steps = cfg.run.trajectory.every, cfg.run.steps
    for pair in pairs:
        if not every or any(s % every for s in _lmc_steps(pair, steps)):
            raise ConfigError(f"lmc: [{pair[0]:g}, {pair[1]:g}] of {steps} steps needs the raw weights at steps "
                              f"{', '.join(map(str, _lmc_steps(pair, steps)))}; set trajectory.every to a divisor "
                              f"of them (now {every})")


def run_lmc(cell_out: Path, pairs: list[tuple[float, float]], log: Callable[[str], None]) -> list[str]:
    """The path between the saved weights of each pair, scored at its ends and midpoint; returns the failures."""
    from lawa_suite.evaluation import Evaluation, eval_config, lmc, write_lmc
    from lawa_suite.posthoc import read_checkpoint

    todo = [p for p in pairs if not (cell_out / LMC_DIR / f"{p[0]:g}-{p[1]:g}" / "lmc.json").is_file()]
    if not todo:
        return []
    failures = []
    try:
        evaluation = Evaluation(eval_config(cell_out))
        for pair in todo:
            early, late = _lmc_steps(pair, evaluation.cfg.run.steps)
            files = [cell_out / "trajectory" / f"step-{s:08d}.safetensors" for s in (late, early)]
            result = lmc(evaluation, read_checkpoint(files[0]), read_checkpoint(files[1]), points=3)
            write_lmc(cell_out / LMC_DIR / f"{pair[0]:g}-{pair[1]:g}", result, evaluation.metrics,
                      (files[0].name, files[1].name), force=True)
            log(f"  lmc {pair[0]:g}-{pair[1]:g}: barrier " + ", ".join(f"{m} {v:.4f}" for m, v in
                                                                      result["barrier"].items()))
    except SuiteError as exc:
        failures.append(f"lmc: {exc}")
        log(f"  lmc: FAILED: {exc}")
    return failures
