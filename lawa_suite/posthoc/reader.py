"""Reading inputs: headers first (the layout of every tensor), then tensors as zero-copy views of the mapped files.

safetensors files are memory-mapped (``safe_open``), so reading costs file pages, not anonymous memory;
``.pt``/``.bin`` go through ``torch.load(mmap=True, weights_only=True)``, only behind an explicit flag.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lawa_suite.files import first_line
from lawa_suite.posthoc.discover import Snapshot

__all__ = ["DTYPES", "CODES", "HeaderLayout", "Reader"]

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
          "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
for _name in ("uint16", "uint32", "uint64"):  # torch >= 2.3
    if hasattr(torch, _name):
        DTYPES["U" + _name[4:]] = getattr(torch, _name)
CODES = {dtype: code for code, dtype in DTYPES.items()}


HeaderLayout = dict[str, tuple[torch.dtype, tuple[int, ...]]]  # name -> (dtype, shape), from headers


class Reader:
    """The tensors of one snapshot as views of its memory-mapped files; ``layout`` comes from headers only."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.layout: HeaderLayout = {}
        self.metadata: dict[str, str] = {}
        self._where: dict[str, Any] = {}   # tensor name -> open safe_open handle (or the loaded torch mapping)
        self._handles: list[Any] = []
        self.problems: list[str] = []
        self.opened: list[Path] = []       # the files that could be read (the others are among the problems)
        self.file_of: dict[str, Path] = {}  # tensor name -> the file holding it
        label = snapshot.label
        weight_map = None
        if snapshot.index is not None:
            weight_map = json.loads(snapshot.index.read_text())["weight_map"]
        for file in snapshot.files:
            where = label if len(snapshot.files) == 1 else f"{label} -> {file.name}"
            try:
                tensors = self._open_torch(file) if snapshot.torch_format else self._open_safetensors(file)
            except Exception as exc:  # noqa: BLE001 (safetensors, pickle and OS errors all name the reason)
                self.problems.append(f"{where}: unreadable ({first_line(exc)})")
                continue
            self.opened.append(file)
            for name, (dtype, shape, source) in tensors.items():
                if name in self._where:
                    self.problems.append(f"{label}: key {name} is stored in two shards")
                    continue
                if weight_map is not None and (name not in weight_map or
                                               (snapshot.index.parent / weight_map[name]).resolve() != file):
                    self.problems.append(f"{where}: holds key {name}, which the index puts in "
                                         f"{weight_map.get(name, 'no shard')}")
                self.layout[name] = (dtype, shape)
                self._where[name] = source
                self.file_of[name] = file
        if weight_map is not None and not self.problems:
            lost = sorted(set(weight_map) - set(self.layout))
            if lost:
                self.problems.append(f"{label}: the index lists keys no shard holds: {', '.join(lost)}")
        recorded_step = self.metadata.get("step")
        if (snapshot.step >= 0 and recorded_step is not None and recorded_step.strip().isdigit()
                and int(recorded_step) != snapshot.step):
            self.problems.append(f"{label}: named step {snapshot.step}, but its metadata says step {recorded_step}")

    def _open_safetensors(self, file: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], Any]]:
        from safetensors import safe_open

        handle = safe_open(str(file), framework="pt", device="cpu")
        handle.__enter__()
        self._handles.append(handle)
        self.metadata.update(handle.metadata() or {})
        out = {}
        for name in handle.keys():
            piece = handle.get_slice(name)
            code, shape = piece.get_dtype(), tuple(int(d) for d in piece.get_shape())
            if code not in DTYPES:
                self.problems.append(f"{self.snapshot.label}: key {name} has dtype {code}, which post-hoc averaging "
                                     f"does not handle (known: {', '.join(DTYPES)})")
                continue
            out[name] = (DTYPES[code], shape, handle)
        return out

    def _open_torch(self, file: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], Any]]:
        if tuple(int(p) for p in re.findall(r"\d+", torch.__version__)[:2]) < (2, 6):
            raise RuntimeError(f"torch {torch.__version__} < 2.6: torch.load(weights_only=True) is not safe "
                               f"there (CVE-2025-32434); convert the file to safetensors")
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)  # legacy format: cannot be mapped
        if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                     for k, v in state.items()):
            raise ValueError("expected a flat mapping of name -> tensor (a state_dict)")
        out = {}
        for name, t in state.items():
            if t.dtype not in CODES:
                self.problems.append(f"{self.snapshot.label}: key {name} has dtype {t.dtype}, which post-hoc "
                                     f"averaging does not handle")
                continue
            out[name] = (t.dtype, tuple(t.shape), state)
        return out

    def tensor(self, name: str) -> Tensor:
        """The tensor ``name``: a view of the mapped file (no copy) for safetensors."""
        source = self._where[name]
        return source[name] if isinstance(source, Mapping) else source.get_tensor(name)

    def flat(self, name: str) -> Tensor:
        """``tensor(name)`` flattened (still a view for contiguous storage, which safetensors always is)."""
        return self.tensor(name).reshape(-1)

    def close(self) -> None:
        for handle in self._handles:
            handle.__exit__(None, None, None)
        self._handles.clear()
        self._where.clear()
