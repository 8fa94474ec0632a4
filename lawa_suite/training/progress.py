"""The training progress bar. Its time-to-go counts the evaluations still to come at their measured cost: an
evaluation (FID samples, many held-out batches) can take as long as hundreds of steps, which a bar that
extrapolates steps alone would hide.

The seconds per step are the median of the latest ``WINDOW`` steps, the run's first step left out: that one pays
for start-up (compilation, allocator and data warm-up) and would inflate a moving mean for a hundred steps; a median
also shrugs off a slow step now and then. A step after which an evaluation comes (every ``eval.every`` steps and the
last) says so on the bar, and the time-to-go counts that evaluation: the bar at its last step waits for the final
evaluation, and says it is evaluating rather than look finished."""

from __future__ import annotations

import statistics
import time
from collections import deque
from typing import Any

__all__ = ["ProgressBar", "evaluations_left", "eta_seconds", "WINDOW"]

WINDOW = 50  # steps whose median is the seconds per step: recent enough to follow a machine getting busier


def evaluations_left(step: int, total: int, every: int) -> int:
    """Evaluations after ``step``: one at each multiple of ``every`` up to ``total``, and one at ``total``."""
    if step >= total:
        return 0
    return total // every - step // every + (1 if total % every else 0)


def eta_seconds(step: int, total: int, every: int, step_seconds: float, eval_seconds: float) -> float:
    """Seconds to go: the steps left at the measured seconds per step, the evaluations left at theirs."""
    return (total - step) * step_seconds + evaluations_left(step, total, every) * eval_seconds


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class ProgressBar:
    """tqdm over optimizer steps; ``eta`` in its postfix replaces tqdm's own remaining time."""

    def __init__(self, total: int, initial: int, every: int, desc: str, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.total, self.every, self.enabled = total, every, enabled
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, desc=desc,
                        unit="step", bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
        self.step_seconds: float | None = None   # the median of the latest steps' seconds; None until measured
        self.eval_seconds = 0.0                  # the last evaluation's duration; 0 until one is measured
        self._recent: deque[float] = deque(maxlen=WINDOW)
        self._first = True                       # the next step is the run's first here (start-up): not measured
        self._step, self._scores = initial, ""
        self._last = time.perf_counter()

    def evaluation_follows(self, step: int) -> bool:
        """Whether the loop evaluates after ``step``: every ``every`` steps and at the last."""
        return step % self.every == 0 or step == self.total

    def stepped(self, step: int, loss: float, lr: float) -> None:
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        if self._first:
            self._first = False
        else:
            self._recent.append(seconds)
            self.step_seconds = statistics.median(self._recent)
        evaluating = self.evaluation_follows(step)
        self._step, self._scores = step, f"loss={loss:.4f}, lr={lr:.2e}"
        # the postfix first: update() may redraw, and must not show the new count beside the old time-to-go
        self.bar.set_postfix_str(self._postfix("evaluating" if evaluating else "", evaluating), refresh=False)
        self.bar.update(1)
        if evaluating:  # drawn now: the bar shows what it waits for while the evaluation runs
            self.bar.refresh()

    def _postfix(self, doing: str, evaluation_pending: bool) -> str:
        parts = [self._scores, doing] if doing else [self._scores]
        last_unmeasured = self._step >= self.total and evaluation_pending and not self.eval_seconds
        if self.step_seconds is None and self._step < self.total:
            parts.append("eta --:--")  # only the start-up step measured so far: no rate to tell
        elif not last_unmeasured:  # (the last step's time-to-go is its evaluation's; unknown before the first)
            left = eta_seconds(self._step, self.total, self.every, self.step_seconds or 0.0, self.eval_seconds)
            parts.append(f"eta {_clock(left + (self.eval_seconds if evaluation_pending else 0.0))}")
        return ", ".join(parts)

    def evaluated(self, seconds: float, line: str) -> None:
        """An evaluation took ``seconds`` (not counted as step time); print its scores above the bar."""
        self.eval_seconds = seconds
        self._last = time.perf_counter()
        if self.enabled:
            self.bar.write(line)
        self.bar.set_postfix_str(self._postfix("evaluated" if self._step >= self.total else "", False),
                                 refresh=False)

    def paused(self) -> None:
        """Time since the last step that was not training (a checkpoint, a trajectory snapshot)."""
        self._last = time.perf_counter()

    def close(self) -> Any:
        return self.bar.close()
