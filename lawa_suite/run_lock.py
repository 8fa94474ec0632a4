"""One process writes a run folder at a time: the lock ``suite run`` holds on its ``out``.

A second process is refused in one line naming the holder (``RunInUse``). The lock is ``flock`` on ``.<name>.lock``
beside the folder (``files.lock_beside``: not in it, so a run folder's listing is only the run's files), holding the
holder's pid, host and start time: the kernel drops it when the holder dies, so a killed run never leaves a lock
behind that blocks the next one. The holder removes the file as it lets go (and at exit).
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lawa_suite.errors import RunInUse
from lawa_suite.files import lock_beside

__all__ = ["lock_file", "lock_run", "unlock_run", "refuse_if_locked"]


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


@dataclass
class _Lock:
    path: Path
    fd: int
    pid: int  # the process that took it: a forked child inherits the table, not the right to release


_held: dict[Path, _Lock] = {}
_exit_hook = False  # whether _unlock_all is registered to run at exit


def lock_file(out: Path) -> Path:
    """The lock of run folder ``out`` (``files.lock_beside``)."""
    return lock_beside(out)


def _holder(fd: int) -> str:
    """Who holds a lock, from the record it wrote: pid, host (this one or another) and since when."""
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        pid, host, since = record["pid"], record["host"], record["since"]
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"
    where = "this host" if host == socket.gethostname() else f"host {host} (another host)"
    return f"pid {pid} on {where}, since {since}"


def _in_use(out: Path, path: Path, fd: int) -> RunInUse:
    return RunInUse(f"out: {out} is in use by another suite run ({_holder(fd)}; lock {path}); wait for it to end "
                    f"or choose another out=")


def refuse_if_locked(out: Path) -> None:
    """A ``RunInUse`` if another process holds the lock of ``out``; takes nothing (a shared lock tried and
    dropped at once), so every process of a run may ask, before its main process locks."""
    path = lock_file(out)
    held = _held.get(path)
    if held is not None and held.pid == os.getpid():
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # no lock file: nobody holds the folder
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(out, path, fd) from None
    except OSError:  # no flock here: lock_run says so when it tries
        pass
    finally:
        os.close(fd)  # (drops the shared lock, if taken)


def lock_run(out: Path) -> bool:
    """Lock run folder ``out`` for this process until ``unlock_run`` or its exit; True if taken now, False if this
    process held it already. Another holder is a ``RunInUse`` naming it. Where the file system has no ``flock``
    (or the lock cannot be created) the run goes on unlocked, with a warning."""
    path = lock_file(out)
    held = _held.get(path)
    if held is not None and held.pid == os.getpid():
        return False
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            _warn(f"could not create the lock {path} ({exc.strerror}); this run is not guarded against another "
                  f"one writing {out}")
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            error = _in_use(out, path, fd)
            os.close(fd)
            raise error from None
        except OSError as exc:  # ENOLCK, EOPNOTSUPP: a file system without flock
            os.close(fd)
            _warn(f"could not lock {path} ({exc.strerror}); this run is not guarded against another one writing "
                  f"{out}")
            return False
        # The holder before us removes the file as it lets go: a lock on a removed file guards nothing, so open
        # the new one and lock again.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            break
        os.close(fd)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
              "out": str(out)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
    global _exit_hook
    if not _exit_hook:  # registered with the first lock, not at import: importing the module changes nothing
        _exit_hook = True
        atexit.register(_unlock_all)
    _held[path] = _Lock(path, fd, os.getpid())
    return True


def unlock_run(out: Path) -> None:
    """Let go of the lock of ``out`` if this process holds it (removing the file while still holding it: a
    process that opened it meanwhile sees it gone and retries)."""
    held = _held.get(lock_file(out))
    if held is not None:
        _release(held)


def _release(held: _Lock) -> None:
    if held.pid != os.getpid():
        return
    del _held[held.path]
    try:
        os.unlink(held.path)
    except OSError:
        pass
    os.close(held.fd)


def _unlock_all() -> None:  # the kernel drops the locks anyway; this also removes the files
    for held in list(_held.values()):
        _release(held)
