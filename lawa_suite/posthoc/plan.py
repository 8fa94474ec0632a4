"""Planning: which saved steps feed which averager replay, and which outputs each replay writes when.

Each job's averager class plans its own replays (``Averager.plan_replay``: by default one replay that counts
observations; a window in steps may need one per residue of its spacing), so this module names no averager. Where a
replay is ready is found by running it on a one-element probe, so a plugin's own notion of "ready" decides.

Inputs left out (``left_out``: their weights hold NaN or Inf) are refused where they come, as the online averager
refuses a non-finite observation: an average of every accepted observation goes on without them. An output is not
written where it would stand for a left-out input: at its step, or where its window (an averager that averages a
window, ``averaged_clocks``) would hold one; a window of other members in its place would be an average in name only.
``Track.dropped`` says which, and why.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lawa_suite.averagers.base import Averager, ReplayTrack
from lawa_suite.posthoc.jobs import Job

__all__ = ["Output", "Track", "derived_steps", "plan"]


@dataclass
class Output:
    """One derived checkpoint: written after the track's averager observed snapshot ``index``."""
    job: Job
    step: int
    index: int
    members: list[int]            # the input steps it averages (a window's, or every accepted one)
    path: Path | None = None
    sha256: str = ""
    size: int = 0
    notes: dict[str, Any] = field(default_factory=dict)  # for the manifest (a reconstruction's coefficients, error)


@dataclass
class Track:
    """One averager instance's replay of the trajectory and what it writes."""
    job: Job
    replay: ReplayTrack
    outputs: dict[int, list[Output]] = field(default_factory=dict)  # snapshot index -> outputs
    refused: frozenset[int] = frozenset()  # snapshot indices left out: refused, never observed
    dropped: list[tuple[int, str]] = field(default_factory=list)  # (step, why) of outputs not written

    def __post_init__(self) -> None:
        self.cls = self.job.cls

    def feed(self, averager: Averager, i: int, weights: dict[str, Tensor]) -> bool:
        """Snapshot ``i`` to ``averager``: observed, or refused where it is left out (``Averager.refuse``, as the
        online loop does for a wanted observation holding NaN or Inf)."""
        clock = self.replay.clocks[i]
        if i in self.refused:
            if averager.wants(clock):
                averager.refuse(clock)
            return False
        return averager.observe(clock, weights, checked=True)

    @property
    def clocks(self) -> list[int]:
        return self.replay.clocks

    def new(self, read: Callable[[int], list[Tensor]]) -> Averager:
        """A fresh averager; ``read(clock)`` gives back what it observed at ``clock`` (see ``replay_from``)."""
        averager = self.cls(**self.job.config)
        averager.name = self.job.name
        averager.start_run(self.replay.total)
        averager.replay_from(read)
        return averager


def derived_steps(steps: list[int], interval: int | None) -> tuple[list[int], list[str]]:
    """The saved steps where ``interval`` wants outputs, and the problems (steps it needs that are not saved)."""
    if interval is None:
        return [], []
    first, last = steps[0], steps[-1]
    wanted = list(range(-(-first // interval) * interval, last + 1, interval))
    have = set(steps)
    missing = [t for t in wanted if t not in have]
    problems = []
    if missing:
        problems.append(f"interval={interval} asks for step(s) {', '.join(map(str, missing))}, which the input does "
                        f"not hold (it holds {len(steps)} steps from {first} to {last})")
    if not wanted:
        problems.append(f"interval={interval}: no multiple of it lies between the first and last saved steps "
                        f"({first}..{last})")
    return [t for t in wanted if t in have], problems


def plan(jobs: Sequence[Job], steps: list[int], interval: int | None,
         left_out: Collection[int] = ()) -> tuple[list[Track], list[str], list[str]]:
    """The tracks of every job with their outputs; the problems (windows with missing steps, jobs that never
    produce anything); and warnings about outputs that are averages in name only (``dominated_outputs``).
    ``left_out``: saved steps whose weights are not averaged (see the module's docstring)."""
    derived, problems = derived_steps(steps, interval)
    refused = frozenset(i for i, s in enumerate(steps) if s in left_out)
    tracks: list[Track] = []
    warnings: list[str] = []
    for job in jobs:
        replays, job_problems = job.cls.plan_replay(job.cls.Config(**job.config), steps,
                                                    derived if interval else None)
        problems += [f"{job.folder}: {p}" for p in job_problems]
        produced = 0
        for replay in replays:
            track = Track(job, replay, refused=refused)
            produced += _probe(track, steps)
            tracks.append(track)
        dropped = sorted(d for t in tracks if t.job is job for d in t.dropped)
        if produced == 0 and dropped and not job_problems:
            problems.append(f"{job.folder}: no derived checkpoint: every one it would write stands for a step left "
                            f"out (step {dropped[-1][0]}: {dropped[-1][1]})")
        elif produced == 0 and not job_problems:
            at = ", ".join(map(str, derived)) if interval else f"the last step {steps[-1]}"
            problems.append(f"{job.folder}: no derived checkpoint (the averager is not ready at {at})")
        warnings += dominated_outputs(job, [t for t in tracks if t.job is job], steps)
    return tracks, problems, warnings


DOMINATED = 0.5  # an output giving more than this weight to its first input is that input more than an average


def dominated_outputs(job: Job, tracks: list[Track], steps: list[int]) -> list[str]:
    """A warning when the job's outputs give most of their weight to their first input: an EMA whose decay was
    chosen for optimizer steps, replayed over a few saved checkpoints, is the first checkpoint in all but name.
    The weights come from replaying the averager on a one-hot trajectory, so any averager is judged by its own
    arithmetic."""
    found = []
    for track in tracks:
        for first in sorted({o.members[0] for outs in track.outputs.values() for o in outs}):
            weights = _weights_on(track, steps, first)
            found += [(o, weights[id(o)]) for outs in track.outputs.values() for o in outs
                      if o.members[0] == first and len(o.members) > 1 and weights[id(o)] > DOMINATED]
    if not found:
        return []
    output, weight = max(found, key=lambda pair: pair[0].step)
    hint = job.cls.span_hint(job.cls.Config(**job.config))
    return [f"{job.folder}: {len(found)} output(s) give most of their weight to their first input; the one at step "
            f"{output.step} gives {weight:.1%} to step {output.members[0]}, of the {len(output.members)} "
            f"checkpoints it averages" + (f" ({hint})" if hint else "")]


def _weights_on(track: Track, steps: list[int], first: int) -> dict[int, float]:
    """Each output's weight on saved step ``first``: the track replayed on 1 at that step and 0 elsewhere."""
    values = {s: torch.tensor([1.0 if s == first else 0.0]) for s in steps}
    step_of = dict(zip(track.clocks, steps))
    averager = track.new(lambda clock: [values[step_of[clock]]])
    weights = {}
    for i, step in enumerate(steps):
        track.feed(averager, i, {"probe": values[step]})
        for o in track.outputs.get(i, ()):
            weights[id(o)] = float(averager.average()["probe"])
    return weights


def _probe(track: Track, steps: list[int]) -> int:
    """Replay ``track`` on a one-element tensor; record an output at each target step where it is ready. With
    inputs left out, a second replay that observes them tells which window each output would have had."""
    probe = {"probe": torch.zeros(1)}
    averager = track.new(lambda clock: [probe["probe"]])
    whole = track.new(lambda clock: [probe["probe"]]) if track.refused else None  # as if nothing were left out
    step_of = dict(zip(track.clocks, steps))
    left_out = {steps[i] for i in track.refused}
    accepted: list[int] = []
    wanted = set(track.replay.targets)
    for i, (step, clock) in enumerate(zip(steps, track.clocks)):
        if track.feed(averager, i, probe):
            accepted.append(step)
        if whole is not None:
            whole.observe(clock, probe, checked=True)
        if step in wanted and averager.ready:
            window = averager.averaged_clocks()
            if i in track.refused:
                track.dropped.append((step, "the input at this step is left out"))
                continue
            if window is not None and whole is not None and whole.ready:
                holds = [step_of[c] for c in whole.averaged_clocks() or () if step_of[c] in left_out]
                if holds:
                    track.dropped.append((step, f"its window holds left-out step(s) {', '.join(map(str, holds))}"))
                    continue
            members = [step_of[c] for c in window] if window is not None else list(accepted)
            track.outputs.setdefault(i, []).append(Output(track.job, step, i, members))
    return sum(len(v) for v in track.outputs.values())
