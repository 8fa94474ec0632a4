"""Writing outputs: safetensors files whose header is known in advance, written slice by slice on a writer
thread (past the page cache where the file system allows), hashed as they are written; and (``--hash-inputs``)
the sha256 of every input, read through the reader's own mapping so each page is faulted in once for checks, hash
and averaging.
Output bytes depend only on the inputs and the settings, never on directory order or time.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import math
import mmap
import os
import queue
import struct
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lawa_suite.files import sha256_file
from lawa_suite.posthoc.limits import Limits
from lawa_suite.posthoc.reader import CODES, HeaderLayout, Reader

__all__ = ["ordered_layout", "safetensors_header", "tensor_bytes", "Writer", "OutputFile", "hash_input",
           "DIRECT_ALIGN"]

DIRECT_ALIGN = 4096  # O_DIRECT writes: offsets and lengths in multiples of this (any common block size)


def ordered_layout(layout: HeaderLayout) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """Data order: widest dtype first, then by name (every tensor aligned to its itemsize, as safetensors does)."""
    return sorted(((n, d, s) for n, (d, s) in layout.items()), key=lambda x: (-x[1].itemsize, x[0]))


def safetensors_header(order: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str]) -> bytes:
    """The length prefix and JSON header of a safetensors file holding ``order``'s tensors in that order."""
    entries: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in order:
        size = math.prod(shape) * dtype.itemsize
        entries[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # pad: the data then starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


def tensor_bytes(t: Tensor) -> memoryview:
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


class Writer:
    """One background thread that runs output work (write, hash) in submission order. ``os.write`` and
    ``hashlib`` release the GIL, so writing overlaps with the averaging on the calling thread; the bounded
    queue keeps at most ``depth`` slices waiting."""

    def __init__(self, depth: int = 8) -> None:
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="posthoc-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (work := self._queue.get()) is not None:
            if self._error is None:
                try:
                    work()
                except BaseException as exc:  # noqa: BLE001 - re-raised on the calling thread
                    self._error = exc

    def submit(self, work: Callable[[], None]) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(work)

    def close(self) -> None:
        """Finish the queued work; re-raise the first error it met."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


class OutputFile:
    """A safetensors file whose header is written first; data is appended in order and hashed as it goes
    (on ``writer``'s thread when given, and hashed on ``hasher``'s when given too).

    Where the file system allows it the bytes bypass the page cache (``O_DIRECT``, through a page-aligned buffer
    of ``buffer_bytes``): a derived checkpoint is not read back by this run, and filling the cache with it costs
    kernel time on the cores the hashing and averaging need (``benchmarks/posthoc.py``); the disk writes then
    overlap the work, and the final fsync has little left to do. Elsewhere: plain writes.
    """

    def __init__(self, path: Path, header: bytes, data_size: int, writer: Writer | None = None,
                 buffer_bytes: int = Limits.direct_buffer, hasher: Writer | None = None, direct: bool = True) -> None:
        self.path = path
        self.writer, self.hasher = writer, hasher
        self.size = len(header) + data_size
        self.sha256 = hashlib.sha256()
        self.written = 0
        self._direct = direct and hasattr(os, "O_DIRECT")  # direct=False: the caller knows it is pointless (in_memory)
        self._fd: int | None = self._open(os.O_CREAT | os.O_EXCL)
        self._buffer = mmap.mmap(-1, buffer_bytes) if self._direct else None  # anonymous maps are page-aligned
        self._filled = 0
        self._put(header)

    def _open(self, flags: int) -> int:
        if self._direct:
            try:
                return os.open(self.path, os.O_WRONLY | flags | os.O_DIRECT, 0o644)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._direct = False  # the file system refuses O_DIRECT (it may have created the file first)
                flags &= ~os.O_EXCL
        return os.open(self.path, os.O_WRONLY | flags, 0o644)

    def _put(self, data: memoryview | bytes) -> None:
        self.sha256.update(data)
        self._store(data)

    def _store(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        self.written += view.nbytes
        if self._buffer is None:
            self._write(view)
            return
        while view.nbytes:
            taken = min(view.nbytes, len(self._buffer) - self._filled)
            self._buffer[self._filled:self._filled + taken] = view[:taken]
            self._filled += taken
            view = view[taken:]
            if self._filled == len(self._buffer):
                self._write(memoryview(self._buffer))
                self._filled = 0

    def _write(self, view: memoryview) -> None:
        if self._fd is None:
            self._fd = self._open(os.O_APPEND)
        while view.nbytes:
            try:
                view = view[os.write(self._fd, view):]
            except OSError as exc:  # O_DIRECT accepted at open but not for this device's alignment: plain writes
                if exc.errno != errno.EINVAL or not self._direct:
                    raise
                self._direct = False
                fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)

    def write(self, *tensors: Tensor) -> None:
        """Append the bytes of ``tensors``, in order, as one piece of work for each thread (they must not change
        afterwards: the threads may read them later)."""
        if self.hasher is not None and self.writer is not None:
            self.hasher.submit(lambda: [self.sha256.update(tensor_bytes(t)) for t in tensors])
            self.writer.submit(lambda: [self._store(tensor_bytes(t)) for t in tensors])
            return
        work = lambda: [self._put(tensor_bytes(t)) for t in tensors]  # noqa: E731
        self.writer.submit(work) if self.writer else work()

    def release(self) -> None:
        """Close the descriptor for now (many outputs at once); the next write reopens it."""
        self.writer.submit(self.close_now) if self.writer else self.close_now()

    def close_now(self) -> None:
        """Close the descriptor on this thread (the next write reopens it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def finish(self) -> str:
        """Write what is buffered (padded to the alignment, then truncated to the real size), fsync, close."""
        assert self.written == self.size, f"{self.path}: wrote {self.written} bytes of {self.size}"
        if self._filled:
            self._write(memoryview(self._buffer)[:-(-self._filled // DIRECT_ALIGN) * DIRECT_ALIGN])
            self._filled = 0
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY)
        os.ftruncate(self._fd, self.size)
        os.fsync(self._fd)
        self.close_now()
        if self._buffer is not None:
            self._buffer.close()
        return self.sha256.hexdigest()


_MEMORY_FILE_SYSTEMS = {0x01021994, 0x858458F6}  # tmpfs, ramfs (statfs f_type)


def in_memory(folder: Path) -> bool:
    """Whether ``folder`` is on tmpfs or ramfs, where the page cache is the file: ``O_DIRECT`` is accepted there
    (tmpfs, Linux 6.6+) but only adds a copy through the aligned buffer. False where it cannot be told."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        buffer = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux; f_type comes first
        if libc.statfs(os.fsencode(folder), buffer) != 0:
            return False
    except (OSError, AttributeError):
        return False
    return struct.unpack_from("l", buffer)[0] in _MEMORY_FILE_SYSTEMS


def hash_input(reader: Reader, file: Path) -> str:
    """sha256 of ``file``, one of ``reader``'s files. A safetensors file is read through the reader's own mapping
    of it, in file order: its pages are mapped once for the value check, the hash and the averaging together
    (a mapping of its own would fault every page in again); bytes no tensor view covers are read directly."""
    if reader.snapshot.torch_format or reader.snapshot.dcp:
        return sha256_file(file)
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        fd = f.fileno()
        (header_size,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        start, size = 8 + header_size, os.fstat(fd).st_size
        header = json.loads(os.pread(fd, header_size, 8))
        spans = sorted((e["data_offsets"][0], e["data_offsets"][1], name)
                       for name, e in header.items() if name != "__metadata__")
        cursor = 0  # in the data, after the header
        _hash_range(digest, fd, 0, start)
        for begin, end, name in spans:
            if begin < cursor:  # overlapping tensors (the reader refuses these); hash the plain bytes instead
                return sha256_file(file)
            _hash_range(digest, fd, start + cursor, start + begin)
            if reader.file_of.get(name) == file:
                digest.update(tensor_bytes(reader.flat(name)))
            else:  # a tensor the reader skipped (a dtype it does not handle)
                _hash_range(digest, fd, start + begin, start + end)
            cursor = end
        _hash_range(digest, fd, start + cursor, size)
    return digest.hexdigest()


def _hash_range(digest: Any, fd: int, begin: int, end: int) -> None:
    for offset in range(begin, end, 1 << 23):
        digest.update(os.pread(fd, min(1 << 23, end - offset), offset))
