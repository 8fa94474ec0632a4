"""One process writes a run folder at a time: the lock ``suite run`` holds on its ``out``.

A second process is refused in one line naming the holder (``RunInUse``). The lock is ``flock`` on ``.<name>.lock``
beside the folder (``files.lock_beside``: not in it, so a run folder's listing is only the run's files), holding the
holder's pid, host and start time: the kernel drops it when the holder dies, so a killed run never leaves a lock
behind that blocks the next one. The holder removes the file as it lets go (and at exit).

The same lock guards a folder an averager keeps its files in for a run (LAWA's ``lawa.dir``: ``lock_folder``), so that
two windows never delete each other's snapshots. The training loop takes it before the run writes anything
(``reserve_folder``), and the averager's store adopts it when it first writes there; either lets go of it, removing
its file, when it is done (``FolderLock.release``).
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lawa_suite.errors import RunInUse, SuiteError, warn
from lawa_suite.files import lock_beside

__all__ = ["lock_file", "lock_run", "unlock_run", "refuse_if_locked", "FolderLock", "lock_folder", "reserve_folder"]



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


def _take(path: Path, folder: Path, in_use: Callable[[int], SuiteError], unguarded: str) -> _Lock | None:
    """An exclusive ``flock`` on the lock file ``path`` (created if need be) holding this process's record, or the
    error ``in_use(fd)`` (given the holder's open file, for its record) when another holds it. Where the file system
    has no ``flock`` (or the file cannot be created): None, with a warning ending in ``unguarded`` (what that means).
    """
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            warn(f"could not create the lock {path} ({exc.strerror}); {unguarded}")
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            error = in_use(fd)
            os.close(fd)
            raise error from None
        except OSError as exc:  # ENOLCK, EOPNOTSUPP: a file system without flock
            os.close(fd)
            warn(f"could not lock {path} ({exc.strerror}); {unguarded}")
            return None
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
              "out": str(folder)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
    global _exit_hook
    if not _exit_hook:  # registered with the first lock, not at import: importing the module changes nothing
        _exit_hook = True
        atexit.register(_unlock_all)
    lock = _Lock(path, fd, os.getpid())
    _held[path] = lock
    return lock


def lock_run(out: Path) -> bool:
    """Lock run folder ``out`` for this process until ``unlock_run`` or its exit; True if taken now, False if this
    process held it already. Another holder is a ``RunInUse`` naming it. Where the file system has no ``flock``
    (or the lock cannot be created) the run goes on unlocked, with a warning."""
    path = lock_file(out)
    held = _held.get(path)
    if held is not None and held.pid == os.getpid():
        return False
    return _take(path, out, lambda fd: _in_use(out, path, fd),
                 f"this run is not guarded against another one writing {out}") is not None


def unlock_run(out: Path) -> None:
    """Let go of the lock of ``out`` if this process holds it (removing the file while still holding it: a
    process that opened it meanwhile sees it gone and retries)."""
    held = _held.get(lock_file(out))
    if held is not None:
        _release(held)


def _release(held: _Lock) -> None:
    if held.pid != os.getpid() or _held.get(held.path) is not held:
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


# -- folders an averager keeps its files in ----------------------------------------------------------------------
class FolderLock:
    """This process's lock of a folder an averager keeps its files in (``.<name>.lock`` beside it, as a run folder's),
    until ``release`` (idempotent; also at exit, or when the kernel drops it with the process)."""

    def __init__(self, folder: Path, lock: _Lock | None) -> None:
        self.folder, self._lock = folder, lock

    def release(self) -> None:
        """Let go of the lock and remove its file (a reservation adopted by ``lock_folder`` is the adopter's now)."""
        if _reserved.get(lock_beside(self.folder)) is self:
            del _reserved[lock_beside(self.folder)]
        lock, self._lock = self._lock, None
        if lock is not None:
            _release(lock)


_reserved: dict[Path, FolderLock] = {}  # lock path -> a lock the loop took that no store has adopted yet


def lock_folder(folder: Path, in_use: Callable[[str], SuiteError]) -> FolderLock:
    """Lock ``folder`` (which must exist, or its parent) for this process: the lock ``reserve_folder`` took for it
    in this process, if any and not adopted yet, else a new one; ``in_use(holder)`` is raised (naming who holds it)
    when another holds it, another process or another user in this one."""
    path = lock_beside(Path(folder))
    reserved = _reserved.pop(path, None)
    if reserved is not None and reserved._lock is not None and reserved._lock.pid == os.getpid():
        lock, reserved._lock = reserved._lock, None  # adopted: the new holder lets go of it, the reserver no more
        return FolderLock(Path(folder), lock)
    if path in _held and _held[path].pid == os.getpid():
        raise in_use(f"this process (pid {os.getpid()})")
    lock = _take(path, Path(folder), lambda fd: in_use(_holder(fd)), f"{folder} is not guarded against another user")
    return FolderLock(Path(folder), lock)


def reserve_folder(folder: Path, in_use: Callable[[str], SuiteError]) -> FolderLock:
    """Lock ``folder`` now for a user in this process that locks it later (``lock_folder``: an averager's store,
    on its first write), so that a folder in use elsewhere is refused before a run writes anything. ``release``
    lets go of it only while no one has adopted it."""
    reserved = lock_folder(folder, in_use)
    _reserved[lock_beside(Path(folder))] = reserved
    return reserved
