"""Whether an averager has weights to score by the end of a run, from its settings alone.

An averager class documents its profile (``documented_profile(config, total)``: the weight the average after
``total`` steps gives each step); None, or no weight at all, means it has averaged nothing by then: it is not
ready, and no evaluation scores it. ``suite run`` warns of such an averager before training, and the run's report
says why it has no numbers. No averager is named here: each comes from the registry by the name it runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lawa_suite import registry
from lawa_suite.averagers.base import Averager

__all__ = ["has_average", "steps_needed", "never_ready", "never_ready_in_saved"]

SEARCH_LIMIT = 100_000  # steps: beyond this "needs more than", so a far-off start costs no long search


def has_average(cls: Any, config: Any, total: int) -> bool | None:
    """Whether an averager of ``cls`` with ``config`` holds an average after ``total`` steps (every step
    observed); None when the class documents no profile to tell by."""
    documented = getattr(cls, "documented_profile", None)
    if documented is None or getattr(documented, "__func__", None) is Averager.documented_profile.__func__:
        return None  # the base's None means "no closed form", not "not ready"
    profile = documented(config, total)
    return profile is not None and any(profile)


def steps_needed(cls: Any, config: Any, steps: int) -> int | None:
    """The fewest steps after which the averager holds an average, when ``steps`` are too few; None when that is
    more than ``SEARCH_LIMIT``. Readiness only grows with the steps (every method starts averaging at some step
    and keeps its average), so doubling then bisecting finds it in a few profiles."""
    low, high = steps, max(2 * steps, 2)  # not ready at low; find a ready high
    while not has_average(cls, config, high):
        if high >= SEARCH_LIMIT:
            return None
        low, high = high, min(2 * high, SEARCH_LIMIT)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if has_average(cls, config, middle) else (middle, high)
    return high


def _why(cls: Any, config: Any, steps: int) -> str | None:
    if has_average(cls, config, steps) is not False:
        return None
    needed = steps_needed(cls, config, steps)
    need = f"needs {needed} steps" if needed is not None else f"needs more than {SEARCH_LIMIT:,} steps"
    return f"not ready by the end ({need}, the run has {steps})"


def never_ready(averagers: Mapping[str, Any], registered: Mapping[str, str], steps: int) -> dict[str, str]:
    """``name -> why`` for each averager (name -> its Config) that its settings leave without an average after
    ``steps``; ``registered`` maps an instance's name to the averager it runs."""
    found = {}
    for name, config in averagers.items():
        try:
            cls = registry.averagers.get(registered.get(name, name))
            why = _why(cls, config, steps)
        except Exception:  # noqa: BLE001 - a plugin's failure here only means we cannot tell in advance
            continue
        if why:
            found[name] = why
    return found


def never_ready_in_saved(config: Mapping[str, Any]) -> dict[str, str]:
    """``never_ready`` for a saved config.yaml's tree (each averager's section, ``of`` naming an instance's
    averager); an averager whose settings cannot be read back (a plugin no longer installed) is left out."""
    steps = config.get("steps")
    if not isinstance(steps, int) or steps < 1:
        return {}
    settings, registered = {}, {}
    for name in config.get("averager") or []:
        section = dict(config.get(name) or {})
        registered[name] = str(section.pop("of", name))
        try:
            settings[name] = registry.averagers.get(registered[name]).Config(**section)
        except Exception:  # noqa: BLE001 - unknown, broken or changed: say nothing rather than guess
            continue
    return never_ready(settings, registered, steps)
