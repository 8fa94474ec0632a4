"""File helpers every module shares (one copy each): atomic writes, fsyncs, sha256 and its records, staged
folders, the mark saying which command made a folder (the rule built on it is ``rundir.claim_out``), removing what
killed processes left, the modes a plain ``open()`` gives, and the one-line reason of an exception.

Atomic means: written under a temporary sibling name, fsynced, renamed into place, and the folder fsynced, so
a reader (or a crash) sees the old file or the new one, never half of one. Temporary names start with a dot
and carry a random token, so concurrent writers of one file never collide and listings skip them; they also carry
the writer's pid and host, so the next write into the folder removes those a killed process left (and only those).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import mmap
import os
import re
import secrets
import shutil
import socket
import stat
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lawa_suite.errors import WriteError

__all__ = ["first_line", "os_reason", "fsync_dir", "fsync_file", "temporary_sibling", "write_atomic",
           "write_text_atomic", "write_npz_atomic", "sha256_file", "SUMS", "Recorded", "record_sha256s",
           "read_sha256s", "inside", "staged_folder", "commit_folder", "OUTPUT_MARK",
           "mark_output", "made_by"]


def first_line(exc: BaseException | str) -> str:
    """The first line of an exception's message (or of a message), or the exception's type when it has none."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def os_reason(exc: BaseException) -> str:
    """One line: errno text for OS errors ("No space left on device (errno 28)"), else the first line."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} (errno {exc.errno})"
    return first_line(exc)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def temporary_sibling(path: Path, kind: str = "tmp") -> Path:
    """``.<name>.<kind>-<pid>_<host>_<token>`` beside ``path``: hidden, unique, on the same file system (renames are
    atomic), and saying which process made it (``owned_sibling``), so what a killed process left can be told from
    what a live one is writing."""
    return owned_sibling(path, kind)


# -- temporary names that say whose they are ------------------------------------------------------------------
# A process killed mid-write leaves its temporary file or staging folder behind. One named by ``owned_sibling``
# carries its maker's pid and host, so a later process removes what a dead process left (``remove_dead_leftovers``)
# and keeps what a live writer is still writing, and anything not named so.
def _this_kernel() -> str:
    """This host's name as a word (``tmp-\\w+`` matches it), with a digest of this boot and this PID namespace: a pid
    means something only to the kernel and namespace that gave it, and two machines or containers sharing a file
    system may share a host name (Docker with the host's UTS namespace, ``unshare -p``, VMs all named ``ubuntu``)."""
    name = re.sub(r"\W", "_", socket.gethostname(), flags=re.ASCII)[:48] or "localhost"
    ids = []
    for read in (lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
                 lambda: os.readlink("/proc/self/ns/pid")):
        try:
            ids.append(read())
        except OSError:
            pass
    return f"{name}_{hashlib.sha256('|'.join(ids).encode()).hexdigest()[:8]}" if ids else name


HOST = _this_kernel()  # what temporary names carry: only a process of this kernel and namespace is asked if it lives
_OWNED = re.compile(r"^\.(?P<target>.+)\.(?P<kind>[a-z]+)-(?P<pid>\d+)_(?P<host>\w+)_[0-9a-f]{8}$", re.ASCII)


def owned_sibling(path: Path, kind: str = "tmp") -> Path:
    """``.<name>.<kind>-<pid>_<host>_<token>`` beside ``path``: a ``temporary_sibling`` whose name says which process
    made it."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}_{HOST}_{secrets.token_hex(4)}")


def owner_of(name: str) -> tuple[str, str, int, str] | None:
    """``(target name, kind, pid, host)`` of a name ``owned_sibling`` made, or None for any other name."""
    found = _OWNED.match(name)
    return (found["target"], found["kind"], int(found["pid"]), found["host"]) if found else None


def process_alive(pid: int, host: str) -> bool:
    """False only where that is certain: no process ``pid`` on this host (another host's cannot be asked)."""
    if host != HOST or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: asks whether the process exists, sends nothing
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, another user's
        return True
    return True


def remove_dead_leftovers(folder: Path, kind: str = "tmp", log: Callable[[str], None] | None = None) -> list[Path]:
    """Remove from ``folder`` the ``owned_sibling`` entries of ``kind`` whose maker, on this host, is no longer
    running: a temporary ("tmp") file or staging folder of a dead process is never renamed into place. Returns
    what was removed, each also said through ``log`` when given. A live process's entries, another host's, and every
    other name are kept. (Every atomic write and every staged folder calls it for the folder it writes into, so what
    a killed process left goes the next time the suite writes there.)"""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        owner = owner_of(entry.name)
        if owner is None or owner[1] != kind or process_alive(owner[2], owner[3]):
            continue
        try:  # (one that cannot be removed, another user's in a sticky folder, is left: never the writer's problem)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                Path(entry.path).unlink(missing_ok=True)
        except OSError:
            continue
        removed.append(Path(entry.path))
        if log is not None:
            log(f"removed {entry.path}: left behind by process {owner[2]}, which is no longer running")
    return removed


__all__ += ["HOST", "owned_sibling", "owner_of", "process_alive", "remove_dead_leftovers"]


def lock_beside(folder: Path) -> Path:
    """The lock file of ``folder``: ``.<name>.lock`` beside it (not in it: the folder's listing stays its own), links
    resolved so two names of one folder share one lock."""
    real = Path(folder).resolve()
    return real.with_name(f".{real.name}.lock")


__all__ += ["lock_beside"]


def write_atomic(path: Path, write: Callable[[Path], None], durable: bool = True) -> None:
    """Write ``path`` through ``write(temporary path)``, then fsync, rename into place and fsync the folder.

    ``durable=False`` skips the fsyncs, for files that are cheap to make again (decoded data caches, scratch
    copies): a crash may then lose the file, but never leaves half of one under its name. Any failure removes
    the temporary file and raises ``WriteError`` naming ``path`` and the reason.
    """
    path = Path(path)
    remove_dead_leftovers(path.parent)  # a write of this file (or a sibling) killed midway: no one will finish it
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        plain_mode(tmp)
        if durable:
            fsync_file(tmp)
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except Exception as exc:  # OSError, or a library's own error for a failed write (safetensors, numpy)
        tmp.unlink(missing_ok=True)
        raise WriteError(f"could not write {path}: {os_reason(exc)}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_npz_atomic(path: Path, durable: bool = True, **arrays: Any) -> None:
    """An uncompressed ``.npz`` of ``arrays``, written atomically (see ``write_atomic`` for ``durable``)."""
    import numpy as np  # here: the CLI imports this module and must not pay for numpy on --help

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object keeps np.savez from appending its own .npz to the name
            np.savez(f, **arrays)
    write_atomic(path, write, durable)


def sha256_file(path: Path) -> str:
    """sha256 of a file, read through a memory map (no copies; hashlib releases the GIL while it works)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return digest.hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                for start in range(0, size, 1 << 23):
                    digest.update(view[start:start + (1 << 23)])
            finally:
                view.release()
    return digest.hexdigest()


# -- sha256 records: what a file was when it was written -------------------------------------------------------
SUMS = "SHA256SUMS"
_SUMS_HEADER = (f"# sha256 of files lawa-suite wrote in this folder, each taken as the file was written.\n"
                f"# Check them with `sha256sum -c {SUMS}` (it skips '#' lines). The '#' line above a hash gives\n"
                f"# the file's size in bytes and mtime in ns then: while both still match, a reader may take the\n"
                f"# hash without reading the file.\n")
_HASH_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")
_STAT_LINE = re.compile(r"^# (\d+) (\d+) (.+)$")
_record_lock = threading.Lock()  # one read-modify-write of a record at a time in this process


@dataclass(frozen=True)
class Recorded:
    """A file's sha256 as recorded when it was written, with its size and mtime then."""
    sha256: str
    size: int
    mtime_ns: int | None  # None: the record keeps no mtime (suite checkpoints written before records had one)
    where: str            # the record, as messages name it: "SHA256SUMS", "manifest.json"

    def describes(self, stat: os.stat_result) -> bool:
        """True while the file has the size and mtime it had when recorded, so the hash may stand for it."""
        return self.mtime_ns is not None and (stat.st_size, stat.st_mtime_ns) == (self.size, self.mtime_ns)


def read_sha256s(folder: Path) -> dict[str, Recorded]:
    """The records of ``folder/SHA256SUMS``: file name -> ``Recorded``. Names with a hash line and no size line
    (a file listed by hand, ``sha256sum *``) count with ``mtime_ns`` None; a missing or unreadable record is empty."""
    try:
        text = (Path(folder) / SUMS).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    stats: dict[str, tuple[int, int]] = {}
    found: dict[str, Recorded] = {}
    for line in text.splitlines():
        if stat := _STAT_LINE.match(line):
            stats[stat.group(3)] = (int(stat.group(1)), int(stat.group(2)))
        elif digest := _HASH_LINE.match(line):
            size, mtime_ns = stats.get(digest.group(2), (-1, None))
            found[digest.group(2)] = Recorded(digest.group(1), size, mtime_ns, SUMS)
    return found


def record_sha256s(folder: Path, sha256s: Mapping[str, str]) -> None:
    """Record the sha256 of files just written into ``folder`` (name -> hex digest) in ``folder/SHA256SUMS``,
    with each file's size and mtime now; the record is rewritten atomically, sorted by name, and drops files
    that no longer exist. Call it after the file is in place: a crash before leaves a file without a record
    (readers then hash it or go without), never a record that lies. One process writes a folder's record."""
    folder = Path(folder)
    if any("\n" in name or "\\" in name or "/" in name for name in sha256s):  # sha256sum would escape these
        raise ValueError(f"cannot record names with a newline, backslash or slash: {sorted(sha256s)}")
    with _record_lock:
        present = set(os.listdir(folder))
        records = {name: r for name, r in read_sha256s(folder).items() if name in present}
        for name, digest in sha256s.items():
            stat = (folder / name).stat()
            records[name] = Recorded(digest, stat.st_size, stat.st_mtime_ns, SUMS)
        lines = [_SUMS_HEADER]
        for name, r in sorted(records.items()):
            if r.mtime_ns is not None:
                lines.append(f"# {r.size} {r.mtime_ns} {name}\n")
            lines.append(f"{r.sha256}  {name}\n")
        write_text_atomic(folder / SUMS, "".join(lines))


def inside(path: Path, root: Path) -> bool:
    """True if ``path`` is ``root`` or lies below it (both resolved by the caller)."""
    return path == root or path.is_relative_to(root)


def staged_folder(out: Path, log: Callable[[str], None] | None = None) -> Path:
    """A new, empty, hidden folder beside ``out`` to write into before ``commit_folder`` renames it; what dead
    processes left beside it (their staging folders, temporary files) is removed first, and said through ``log``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_leftovers(out.parent, log=log)
    staging = temporary_sibling(out)
    staging.mkdir()
    return staging


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system or the file system
    cannot, an ``OSError`` for any other failure."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a C library without it
        return False
    at_cwd, rename_exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a))


def commit_folder(staging: Path, out: Path) -> None:
    """Rename the staged folder to ``out`` durably. An existing ``out`` (``--force``) is swapped with it in one step
    where the system can (``out`` is never missing: a kill leaves the old one under the staging name, removed as a
    dead process's leftover), else moved aside first and removed once the new one is in place."""
    fsync_dir(staging)
    old = None
    if out.exists() and _exchange(staging, out):
        fsync_dir(out.parent)
        shutil.rmtree(staging) if staging.is_dir() else staging.unlink()  # (it holds the old out now)
        return
    if out.exists():
        old = temporary_sibling(out, "old")
        os.rename(out, old)
    os.rename(staging, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


# -- which command made a folder --------------------------------------------------------------------------------
OUTPUT_MARK = "suite-output.json"


def mark_output(folder: Path, command: str, **details: Any) -> None:
    """Write ``folder/suite-output.json``: ``{"command": command, ...details}``. A command that writes a whole
    folder (``suite average``, ``suite export``, ``suite eval out=``, ``suite analyze lmc``) marks it, so that its
    ``--force`` later replaces that folder and nothing else (``rundir.claim_out``)."""
    record = {"command": command, **{k: str(v) for k, v in details.items()}}
    write_text_atomic(Path(folder) / OUTPUT_MARK, json.dumps(record, indent=1) + "\n")


def made_by(folder: Path) -> str | None:
    """The command that marked ``folder`` as its output (``mark_output``), or None (no mark, or not readable)."""
    try:
        command = json.loads((Path(folder) / OUTPUT_MARK).read_text(encoding="utf-8")).get("command")
    except (OSError, ValueError, AttributeError):
        return None
    return command if isinstance(command, str) else None


# -- the modes a plain open() gives ---------------------------------------------------------------------------
# safetensors (0.8: save_file writes through its own temporary file) and other atomic writers leave their files
# 0600, where a plain open() gives 0666 less the umask: an exported folder would hold one private file among
# readable siblings. A command that writes a whole folder gives its files the plain modes before committing it.
def current_umask() -> int:
    """This process's umask, read without changing it where Linux tells it (/proc/self/status, Linux 4.7+);
    elsewhere set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_mode(path: Path) -> None:
    """Give the file ``path`` the mode a plain ``open()`` gives a new file: 0666 less the umask. Every file the suite
    writes goes through this (``write_atomic``; each file of a checkpoint, ``checkpoints.commit_checkpoint``):
    safetensors' ``save_file`` and ``mkstemp`` make theirs 0600."""
    os.chmod(path, 0o666 & ~current_umask())


def plain_modes(root: Path) -> None:
    """Give ``root`` and everything below it the mode a plain ``open()`` or ``mkdir()`` would have: 0666 (files;
    0777 where any execute bit is set) and 0777 (folders), less the umask. Symbolic links are left alone."""
    mask = current_umask()
    for folder, dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                os.chmod(path, (0o777 if mode & 0o111 else 0o666) & ~mask)
        for name in dirs:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o777 & ~mask)
    os.chmod(root, 0o777 & ~mask)


__all__ += ["current_umask", "plain_mode", "plain_modes"]
