"""Preemption: SIGTERM (to the process or its whole group, as SLURM sends it) asks the loop to finish the
current step, commit a checkpoint and exit with 143; nothing else happens in the signal handler."""

from __future__ import annotations

import signal
from typing import Any

__all__ = ["StopFlag"]


class StopFlag:
    """SIGTERM asks the loop to save and stop at the end of the current step; nothing else happens in a handler.

    While installed, SIGTERM is also *blocked* in the main thread, so every process forked from it afterwards
    (DataLoader workers, in particular) inherits the block: a SIGTERM sent to the whole process group (as
    SLURM does) stays pending in the workers instead of killing them under the loop, and the loop can still
    fetch its batches and save. The main thread notices its own pending SIGTERM in ``poll`` (a SIGTERM that
    lands on another, unblocked thread runs the handler instead). A second SIGTERM while saving changes
    nothing: signals of one kind do not queue up. ``uninstall`` discards a pending SIGTERM, since the run
    is already stopping for it.
    """

    def __init__(self) -> None:
        self.raised = False
        self._previous: Any = None
        self._blocked = False

    def install(self) -> None:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: the caller handles its own signals
            self._previous = None
            return
        if hasattr(signal, "pthread_sigmask"):
            self._blocked = signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = True

    def poll(self) -> bool:
        """True once SIGTERM has arrived (delivered to a handler, or pending on the blocked main thread)."""
        if self._blocked and not self.raised and signal.SIGTERM in signal.sigpending():
            self.raised = True
        return self.raised

    def uninstall(self) -> None:
        if self._blocked:
            if self.poll():
                signal.sigtimedwait({signal.SIGTERM}, 0)  # consume it: unblocking must not deliver it again
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            self._blocked = False
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
