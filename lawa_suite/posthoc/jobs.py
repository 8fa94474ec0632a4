"""What to compute: ``suite average``'s words sorted into averager jobs (a grid: every combination of the values
given per key), the output folder, ``interval`` and ``eval``. Values are parsed and checked by each averager's
own ``Config`` through ``config.build_section``, so errors read exactly like ``suite run``'s."""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lawa_suite import registry
from lawa_suite.averagers.base import Averager
from lawa_suite.config import averager_bases, build_section, parse_overrides, parse_value, require, split_list
from lawa_suite.errors import ConfigError
from lawa_suite.posthoc.checks import most_common
from lawa_suite.posthoc.peers import WeightsAt, weights_at

__all__ = ["Job", "parse_jobs", "Command", "parse_command"]


@dataclass(frozen=True)
class Job:
    """One averager with one setting of its keys (a grid point); its outputs go to ``out/<folder>``."""
    name: str                     # as the command names it: a registered averager or a named instance
    averager: str                 # the registered averager it runs (``name`` itself unless an instance)
    config: dict[str, Any]        # every field of its Config (what the manifest records)
    folder: str                   # e.g. lawa-k5-nu1000

    @property
    def cls(self) -> type[Averager]:
        return registry.averagers.get(self.averager)


def _name_part(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "_".join(_name_part(v) for v in value)
    text = repr(value) if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9._]+", "_", text)


def parse_jobs(averagers: Sequence[str], keys: Mapping[str, str]) -> list[Job]:
    """Every combination of the comma-separated values given per key (``lawa.k=2,5 lawa.nu=100,200``), per averager.

    A named instance runs a registered averager under its own name (``swa_early.of=swa swa_early.start=0.25``).
    The folder names each key given, in the Config's field order: ``lawa-k5-nu200``.
    """
    if not averagers:
        raise ConfigError("averager: expected at least one averager name (for example averager=lawa)")
    if len(set(averagers)) != len(averagers):
        raise ConfigError(f"averager: expected distinct names, got {','.join(averagers)}")
    bases = averager_bases(list(averagers), keys)
    classes: dict[str, type[Averager]] = {}
    for name, base in bases.items():
        try:
            classes[name] = registry.averagers.get(base)
        except Exception as exc:  # noqa: BLE001 - unknown name or broken plugin: already one line
            raise ConfigError(f"averager: {exc}") from None
    for key in keys:
        head = key.partition(".")[0]
        if head not in classes:
            raise ConfigError(f"{key}: averager '{head}' is not selected (averager={','.join(averagers)})")
    jobs = []
    for name, cls in classes.items():
        jobs += _grid(name, bases[name], cls, {k.partition(".")[2]: v for k, v in keys.items()
                                                if k.partition(".")[0] == name and k.partition(".")[2] != "of"})
    folders = [j.folder for j in jobs]
    if len(set(folders)) != len(folders):
        raise ConfigError(f"averager keys: two grid points share the folder name {most_common(folders)}; "
                          f"give distinct values")
    return jobs


def _grid(name: str, base: str, cls: type[Averager], given: dict[str, str]) -> list[Job]:
    """The jobs of one averager: every combination of its comma-separated values."""
    fields = dataclasses.fields(cls.Config)
    names = [f.name for f in fields]
    for field_name in given:
        if field_name not in names:
            raise ConfigError(f"{name}.{field_name}: unknown key for averager '{name}'; known: {', '.join(names)}")
    ordered = [f for f in names if f in given]
    choices = []
    for f in ordered:
        values = [v.strip() for v in given[f].split(",")]
        if any(not v for v in values):
            raise ConfigError(f"{name}.{f}: expected a value or a comma list of values, got {given[f]!r}")
        choices.append([parse_value(f"{name}.{f}", v) for v in values])
    # a key marked affects_average=False (where snapshots are kept) does not change the average: no folder name
    shown = [f.name for f in fields if f.name in given and f.metadata.get("affects_average", True)]
    jobs = []
    for combo in itertools.product(*choices):
        config = dataclasses.asdict(build_section(name, cls.Config, dict(zip(ordered, combo))))
        folder = "-".join([name] + [f"{f}{_name_part(config[f])}" for f in shown])
        jobs.append(Job(name, base, config, folder))
    return jobs


@dataclass
class Command:
    """``suite average``'s ``key=value`` words, sorted into what they configure."""
    jobs: list[Job]
    out: Path
    interval: int | None
    evaluate: bool
    eval_overrides: list[str]      # task and run keys for eval=true (task=, preset=, data.path=, eval.batches=...)
    at: WeightsAt = WeightsAt()    # key= and prefix=: where the weights lie in other tools' torch checkpoints


@dataclass
class _Settings:
    """The command's own keys, parsed as a config section (the same parser and messages as ``suite run``)."""
    interval: int | None = None    # a derived checkpoint at every saved step divisible by it; None = the end state
    eval: bool = False             # score every output and the raw checkpoint of its step

    def __post_init__(self) -> None:
        require(self.interval is None or self.interval >= 1, "interval",
                "an integer >= 1 (a derived checkpoint at every saved step divisible by it)", self.interval)


def parse_command(words: Sequence[str]) -> Command:
    """Split ``averager=... <averager>.<key>=v1,v2 interval=N out=DIR eval=true key=K prefix=P <task/run keys>``;
    one-line ConfigError for anything malformed (a task or run key without eval=true included)."""
    pairs = parse_overrides(list(words))
    at = weights_at(pairs)
    names = split_list(pairs.pop("averager", ""))
    if not names:
        raise ConfigError("averager: expected one or more averager names (for example averager=lawa or "
                          "averager=lawa,ema,swa)")
    out = pairs.pop("out", "")
    if not out:
        raise ConfigError("out: expected the folder to write (for example out=runs/cifar-lawa)")
    own = {k: parse_value(k, pairs.pop(k)) for k in ("interval", "eval") if k in pairs}
    settings = build_section("", _Settings, own)
    known = set(registry.averagers.names()) | set(names)
    averager_keys = {k: v for k, v in pairs.items() if "." in k and k.partition(".")[0] in known}
    rest = {k: v for k, v in pairs.items() if k not in averager_keys}
    if rest and not settings.eval:
        key = sorted(rest)[0]
        raise ConfigError(f"{key}: not a key of suite average (averager, <averager>.<key>, interval, out, eval, key, "
                          f"prefix); task and run keys apply only with eval=true")
    jobs = parse_jobs(names, averager_keys)
    return Command(jobs, Path(out), settings.interval, settings.eval, [f"{k}={v}" for k, v in rest.items()], at)
