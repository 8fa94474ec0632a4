"""Stopping cleanly: SIGTERM (to the process or its whole group, as SLURM sends it) and Ctrl-C (SIGINT, which
the terminal sends to the whole foreground group) ask the loop to finish the current step, commit a checkpoint
and exit with 143 or 130; nothing else happens in the signal handler."""

from __future__ import annotations

import signal
from typing import Any

__all__ = ["StopFlag", "STOP_SIGNALS"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopFlag:
    """SIGTERM or SIGINT asks the loop to save and stop at the end of the current step.

    While installed, both are also *blocked* in the main thread, so every process forked from it afterwards
    (DataLoader workers, in particular) inherits the block: a signal sent to the whole process group (SLURM's
    SIGTERM, the terminal's Ctrl-C) stays pending in the workers instead of killing them under the loop, and the
    loop can still fetch its batches and save. The main thread notices its own pending signal in ``poll`` (one
    that lands on another, unblocked thread runs the handler instead). A second signal while saving changes
    nothing: signals of one kind do not queue up, and neither raises in the middle of a write.
    ``uninstall`` discards pending ones, since the run is already stopping for them. ``signal`` is the first
    one that arrived (None before).
    """

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self._previous: dict[int, Any] = {}
        self._blocked: set[int] = set()

    @property
    def raised(self) -> bool:
        return self.signal is not None

    def install(self) -> None:
        try:
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread: the caller handles its own signals
            self._previous.clear()
            return
        if hasattr(signal, "pthread_sigmask"):
            already = signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))
            self._blocked = {s for s in STOP_SIGNALS if s not in already}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is None:
            self.signal = signal.Signals(signum)

    def poll(self) -> bool:
        """True once SIGTERM or SIGINT has arrived (delivered to a handler, or pending on the blocked thread)."""
        if self._blocked and self.signal is None:
            pending = signal.sigpending() & self._blocked
            if pending:
                self.signal = signal.Signals(min(pending))
        return self.raised

    def uninstall(self) -> None:
        if self._blocked:
            self.poll()
            pending = signal.sigpending() & self._blocked
            for signum in pending:  # consume them: unblocking must not deliver them again
                signal.sigtimedwait({signum}, 0)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self._blocked)
            self._blocked = set()
        for signum, previous in self._previous.items():
            if previous is not None:
                signal.signal(signum, previous)
        self._previous.clear()
