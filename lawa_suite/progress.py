"""The training progress bar. Its time-to-go counts the evaluations still to come at their measured cost: an
evaluation (FID samples, many held-out batches) can take as long as hundreds of steps, which a bar that
extrapolates steps alone would hide."""

from __future__ import annotations

import time
from typing import Any

__all__ = ["ProgressBar", "evaluations_left", "eta_seconds"]


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
        self.step_seconds: float | None = None   # a moving mean: the rate drifts (caches warm, machines get busy)
        self.eval_seconds = 0.0                  # the last evaluation's duration; 0 until one is measured
        self._last = time.perf_counter()

    def stepped(self, step: int, loss: float, lr: float) -> None:
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        self.step_seconds = seconds if self.step_seconds is None else 0.9 * self.step_seconds + 0.1 * seconds
        eta = eta_seconds(step, self.total, self.every, self.step_seconds, self.eval_seconds)
        self.bar.update(1)
        self.bar.set_postfix_str(f"loss={loss:.4f}, lr={lr:.2e}, eta {_clock(eta)}", refresh=False)

    def evaluated(self, seconds: float, line: str) -> None:
        """An evaluation took ``seconds`` (not counted as step time); print its scores above the bar."""
        self.eval_seconds = seconds
        self._last = time.perf_counter()
        if self.enabled:
            self.bar.write(line)

    def paused(self) -> None:
        """Time since the last step that was not training (a checkpoint, a trajectory snapshot)."""
        self._last = time.perf_counter()

    def close(self) -> Any:
        return self.bar.close()
