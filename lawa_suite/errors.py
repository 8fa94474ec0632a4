"""Every error a user can cause, under one root that carries its exit code.

The CLI maps ``SuiteError`` to ``error: <message>`` and the error's ``exit_code`` in one place
(``cli.user_errors``); a message is one line naming what was wrong and what is allowed. This module imports
nothing heavy, so any module (and ``suite --help``) may import it.

| exit | meaning |
|---|---|
| 1 | the work could not be done: missing data, an unreadable or unwritable file, a checkpoint that fails |
| 2 | the command was wrong: a bad key or value, input that cannot be averaged or scored as asked |
| 3 | training diverged: too many non-finite steps in a row |
| 130 | Ctrl-C (SIGINT): the run saved a checkpoint and stopped (128 + SIGINT, as shells report it) |
| 143 | SIGTERM: the run saved a checkpoint and stopped (128 + SIGTERM, so schedulers requeue it) |
"""

from __future__ import annotations

import sys

from typing import ClassVar

__all__ = ["SuiteError", "ConfigError", "RegistryError", "UnknownNameError", "PluginError", "PosthocError",
           "AnalysisError", "ExportUnsupported", "DataUnavailable", "DataPathError", "CheckpointError", "WriteError",
           "RunInUse", "DamagedFile", "NonFiniteTraining", "Preempted", "Interrupted", "EXIT_NONFINITE",
           "EXIT_INTERRUPTED", "EXIT_PREEMPTED"]

EXIT_NONFINITE = 3
EXIT_INTERRUPTED = 130
EXIT_PREEMPTED = 143


class SuiteError(Exception):
    """Root of every user-facing error. ``str(error)`` is one line; ``exit_code`` is what the CLI exits with."""

    exit_code: ClassVar[int] = 1


# -- exit 2: the command was wrong --------------------------------------------------------------------------
class ConfigError(SuiteError, ValueError):
    """A bad key or value: the key, what was wrong, what is allowed."""

    exit_code = 2


class RegistryError(SuiteError):
    """A name that no plugin has, or a plugin that cannot be used."""

    exit_code = 2


class UnknownNameError(RegistryError, LookupError):
    """No plugin of that kind has that name."""


class PluginError(RegistryError):
    """A plugin exists under that name but cannot be used (import error, wrong interface, name conflict)."""


class PosthocError(SuiteError, ValueError):
    """The input or the settings of ``suite average`` cannot be averaged; one line lists every problem."""

    exit_code = 2


class AnalysisError(SuiteError, ValueError):
    """The weights or the task cannot be scored or compared as asked."""

    exit_code = 2


class ExportUnsupported(SuiteError):
    """The task defines no export format."""

    exit_code = 2


class RunInUse(ConfigError):
    """Another process holds the lock of the run folder ``out=`` names; the message names it (pid, host, since
    when). Exit 2, like a folder that already holds a run: the answer is another ``out=``, or waiting."""


# -- exit 1: the work could not be done ---------------------------------------------------------------------
class DataUnavailable(SuiteError, RuntimeError):
    """Data could not be found or fetched; the message says what is missing and where to put it."""


class DataPathError(ConfigError, DataUnavailable):
    """``data.path`` (or the data source's settings) cannot be what the source reads: missing, empty, the wrong
    kind or the wrong layout. A configuration error (exit 2), and still a ``DataUnavailable``."""


class CheckpointError(SuiteError, RuntimeError):
    """A checkpoint could not be written or read; the message names the file."""


class WriteError(SuiteError):
    """A file could not be written; the message names it and the reason (errno text for OS errors)."""


class DamagedFile(SuiteError):
    """A file the suite writes cannot be read back whole (a line in the middle of ``metrics.jsonl`` that is not
    JSON); the message names the file and the line."""


# -- training stopped --------------------------------------------------------------------------------------
class NonFiniteTraining(SuiteError, RuntimeError):
    """More than ``max_bad_steps`` consecutive steps had a non-finite loss or gradient."""

    exit_code = EXIT_NONFINITE


class Preempted(SuiteError, RuntimeError):
    """SIGTERM arrived; a checkpoint was committed before stopping."""

    exit_code = EXIT_PREEMPTED


class Interrupted(Preempted):
    """Ctrl-C (SIGINT) arrived; a checkpoint was committed before stopping."""

    exit_code = EXIT_INTERRUPTED


# -- warnings: what a command goes on past -----------------------------------------------------------------------
def warn(message: str) -> None:
    """A ``warning: ...`` line on stderr (a command's results go to stdout): the one way commands say what they went
    on past (a skipped checkpoint, a cut-short log line, a stale lock)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


__all__ += ["warn"]
