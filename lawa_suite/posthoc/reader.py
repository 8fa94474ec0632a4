"""Reading inputs: headers first (the layout of every tensor), then tensors as zero-copy views of the mapped files.

safetensors files are memory-mapped (``safe_open``), so reading costs file pages, not anonymous memory; torch
files (``.pt``, ``.pth``, ``.bin``, ``.ckpt``, ``.pth.tar``) go through ``torch.load(mmap=True, weights_only=True)``,
only behind an explicit flag, and their weights are found inside whatever else they hold (``peers.py``); a
``distributed=fsdp`` checkpoint's tensors are assembled from every rank's DCP shards a tensor at a time
(``sharded_checkpoints.ShardedWeights``).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lawa_suite.posthoc.discover import Snapshot
from lawa_suite.training.sharded_checkpoints import ShardedWeights
from lawa_suite.posthoc.peers import (NoWeights, WeightsAt, find_weights, lightning_hint, load_torch, rename,
                                      torch_error)

__all__ = ["DTYPES", "CODES", "HeaderLayout", "Reader", "describe_found"]

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
          "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
for _name in ("uint16", "uint32", "uint64"):  # torch >= 2.3
    if hasattr(torch, _name):
        DTYPES["U" + _name[4:]] = getattr(torch, _name)
CODES = {dtype: code for code, dtype in DTYPES.items()}


HeaderLayout = dict[str, tuple[torch.dtype, tuple[int, ...]]]  # name -> (dtype, shape), from headers


class Reader:
    """The tensors of one snapshot as views of its memory-mapped files; ``layout`` comes from headers only.

    ``at`` says where the weights lie in a torch checkpoint and which prefix to strip (``peers.py``); names are
    stripped of wrappers' prefixes (``module.``, ``_orig_mod.``) when every key has them. ``where`` and
    ``renamed`` say what was done, for the caller to say once (``describe_found``)."""

    def __init__(self, snapshot: Snapshot, at: WeightsAt = WeightsAt()) -> None:
        self.snapshot = snapshot
        self.at = at
        self.layout: HeaderLayout = {}
        self.metadata: dict[str, str] = {}
        self._where: dict[str, tuple[Any, str]] = {}  # name -> (open safe_open handle or torch mapping, stored name)
        self._handles: list[Any] = []
        self.problems: list[str] = []
        self.opened: list[Path] = []       # the files that could be read (the others are among the problems)
        self.file_of: dict[str, Path] = {}  # name -> its file, for tensors read under the name they are stored as
        self.where = ""                    # the key the weights were under in a torch checkpoint ("": top level)
        self.renamed: list[str] = []       # how their names were changed
        self.hints: list[str] = []         # what the user may want to change about that
        self._object: Any = None           # the loaded torch checkpoint, for a hint about its names
        label = snapshot.label
        weight_map = None
        if snapshot.index is not None:
            weight_map = json.loads(snapshot.index.read_text())["weight_map"]
        if at.key is not None and not snapshot.torch_format:
            self.problems.append(f"{label}: key={at.key} names a mapping inside a torch checkpoint (.pt, .pth, .bin, "
                                 f".ckpt); a safetensors file holds one flat mapping: drop key=")
        stored: dict[str, tuple[torch.dtype, tuple[int, ...], Any, Path]] = {}
        opener = self._open_dcp if snapshot.dcp else self._open_torch if snapshot.torch_format else \
            self._open_safetensors
        units = snapshot.files[:1] if snapshot.dcp else snapshot.files  # DCP: one reader for every rank's files
        for file in units:
            where = label if len(units) == 1 else f"{label} -> {file.name}"
            try:
                tensors = opener(file)
            except NoWeights as exc:
                self.problems.append(f"{where}: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 (safetensors, pickle and OS errors all name the reason)
                self.problems.append(f"{where}: unreadable ({torch_error(exc)})")
                continue
            self.opened += snapshot.files if snapshot.dcp else [file]
            for name, (dtype, shape, source) in tensors.items():
                if name in stored:
                    self.problems.append(f"{label}: key {name} is stored in two shards")
                    continue
                if weight_map is not None and (name not in weight_map or
                                               (snapshot.index.parent / weight_map[name]).resolve() != file):
                    self.problems.append(f"{where}: holds key {name}, which the index puts in "
                                         f"{weight_map.get(name, 'no shard')}")
                stored[name] = (dtype, shape, source, file)
        if weight_map is not None and not self.problems:
            lost = sorted(set(weight_map) - set(stored))
            if lost:
                self.problems.append(f"{label}: the index lists keys no shard holds: {', '.join(lost)}")
        names, done, problem = rename(stored, at.prefix)
        if problem:
            self.problems.append(f"{label}: {problem}")
        self.renamed += done
        if at.prefix is None and snapshot.torch_format and (hint := lightning_hint(self._object, names)):
            self.hints.append(hint)
        for name, old in names.items():
            dtype, shape, source, file = stored[old]
            self.layout[name] = (dtype, shape)
            self._where[name] = (source, old)
            if name == old:
                self.file_of[name] = file
        recorded_step = self.metadata.get("step")
        if (snapshot.step >= 0 and recorded_step is not None and recorded_step.strip().isdigit()
                and int(recorded_step) != snapshot.step):
            self.problems.append(f"{label}: named step {snapshot.step}, but its metadata says step {recorded_step}")

    def _open_safetensors(self, file: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], Any]]:
        from safetensors import safe_open

        with safe_open(str(file), framework="pt", device="cpu") as handle:  # validates the header
            self.metadata.update(handle.metadata() or {})
            names = list(handle.keys())
        mapped = MappedSafetensors(file)
        out = {}
        for name in names:
            code, shape = mapped.entries[name][:2]
            if code not in DTYPES:
                self.problems.append(f"{self.snapshot.label}: key {name} has dtype {code}, which post-hoc averaging "
                                     f"does not handle (known: {', '.join(DTYPES)})")
                continue
            out[name] = (DTYPES[code], shape, mapped)
        self._handles.append(mapped)
        return out

    def _open_torch(self, file: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], Any]]:
        if tuple(int(p) for p in re.findall(r"\d+", torch.__version__)[:2]) < (2, 6):
            raise RuntimeError(f"torch {torch.__version__} < 2.6: torch.load(weights_only=True) is not safe "
                               f"there (CVE-2025-32434); convert the file to safetensors")
        self._object = load_torch(file)
        where, state = find_weights(self._object, self.at.key)
        self.where = where
        out = {}
        for name, t in state.items():
            if t.dtype not in CODES:
                self.problems.append(f"{self.snapshot.label}: key {name} has dtype {t.dtype}, which post-hoc "
                                     f"averaging does not handle")
                continue
            out[name] = (t.dtype, tuple(t.shape), state)
        return out

    def _open_dcp(self, file: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], Any]]:
        weights = ShardedWeights(file.parent)
        out = {}
        for name, (dtype, shape) in weights.layout.items():
            if dtype not in CODES:
                self.problems.append(f"{self.snapshot.label}: key {name} has dtype {dtype}, which post-hoc "
                                     f"averaging does not handle")
                continue
            out[name] = (dtype, shape, weights)
        return out

    def tensor(self, name: str) -> Tensor:
        """The tensor ``name``: a view of the mapped file (no copy) for safetensors."""
        source, stored = self._where[name]
        return source[stored] if isinstance(source, Mapping) else source.get_tensor(stored)

    def flat(self, name: str) -> Tensor:
        """``tensor(name)`` flattened (still a view for contiguous storage, which safetensors always is)."""
        return self.tensor(name).reshape(-1)

    def close(self) -> None:
        self._handles.clear()  # the last view of a mapping gone, torch unmaps it
        self._where.clear()
        self._object = None


class MappedSafetensors:
    """A safetensors file mapped once (private, never written), each tensor a view of it made with two torch calls.
    safetensors' own ``get_tensor`` takes 100-200 us a tensor in Python calls with the GIL held, which the averaging
    and writing threads then wait for; this takes a few. The header is the one ``safe_open`` has just validated."""

    def __init__(self, file: Path) -> None:
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        self.start = 8 + size
        self.entries = {name: (e["dtype"], tuple(int(d) for d in e["shape"]), *e["data_offsets"])
                        for name, e in header.items() if name != "__metadata__"}
        self.data = torch.from_file(str(file), shared=False, size=file.stat().st_size, dtype=torch.uint8)

    def get_tensor(self, name: str) -> Tensor:
        code, shape, begin, end = self.entries[name]
        dtype = DTYPES[code]
        piece = self.data[self.start + begin:self.start + end]
        if (self.start + begin) % dtype.itemsize:  # a view needs aligned data; other writers may not align
            piece = piece.clone()
        return piece.view(dtype).view(shape)


def describe_found(readers: Sequence[Reader]) -> list[str]:
    """Where the weights were found in the inputs and how their names changed, a line per distinct finding:
    "reading the weights under 'model' in each checkpoint: every key stripped of '_orig_mod.' (...)"."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for r in readers:
        if r.where or r.renamed:
            groups.setdefault((r.where, *r.renamed), []).append(r.snapshot.label)
    lines = []
    for (where, *renamed), labels in groups.items():
        which = "each checkpoint" if len(labels) == len(readers) else ", ".join(labels)
        lines.append(f"reading the weights{f' under {where!r}' if where else ''} in {which}"
                     + (f": {'; '.join(renamed)}" if renamed else ""))
    return lines + [f"note: {hint}" for hint in dict.fromkeys(h for r in readers for h in r.hints)]
