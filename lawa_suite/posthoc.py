"""Post-hoc averaging: replay the saved checkpoints of a trajectory, in step order, through registered averagers.

The averagers are the classes that run online (plugins included); only the clock differs. As the LAWA
paper's Algorithm 2 applies EMA and SWA to a checkpoint list, an averager post hoc observes the saved
checkpoints only, so ``every``, ``start`` and ``decay`` count *observations* (the i-th saved checkpoint is
observation ``i``, from 1). LAWA keeps its meaning in steps: the derived checkpoint at step ``t`` is the mean
of the checkpoints at ``t, t - nu, ..., t - (k-1)*nu`` (design.md), and a window member the input lacks is
an error naming it. A derived checkpoint is written at every saved step divisible by ``interval``; without
``interval`` there is one per averager, the state an online averager would hold at the end (LAWA: the
window ending at the newest saved multiple of ``nu``), which is why post-hoc LAWA over a run's trajectory
equals the online LAWA of that run bit for bit.

Memory stays constant however long the trajectory and however large ``k``:
- inputs are memory-mapped (``safetensors.safe_open``; ``.pt``/``.bin`` through ``torch.load(mmap=True,
  weights_only=True)`` behind an explicit flag), so reading costs file pages, not anonymous memory;
- the work runs tensor by tensor, and an ``elementwise`` averager (EMA, SWA, LAWA) sees each large tensor
  in slices of at most ``BLOCK_ELEMENTS`` elements, one fresh averager per slice; every checkpoint is read
  once for all averagers and grid points together, and the slices stay in cache while all of them work;
- LAWA's window lives in a store that re-reads the member leaving the window from its mapped file instead
  of keeping ``k`` copies, so LAWA runs the very update sequence of the online class (running sum,
  subtract-the-leaver, exact recompute every ``k`` evictions);
- outputs are safetensors files whose header is known in advance, written slice by slice (on a writer
  thread, past the page cache where the file system allows) and hashed as they are written. Peak anonymous
  memory is the interpreter plus a few slices per averager.

Nothing is computed before everything is checked: headers first, then every value (NaN/Inf, in threads).
Unknown or malformed files, missing or extra keys, shape (including broadcastable shapes) or dtype
mismatches, non-finite values, steps a window or ``interval`` needs but the input lacks, and files that
resolve outside the input folder (symlinks, ``..`` in a shard index) all go into one error, and nothing is
written. The sha256 of every input (for the manifests, and against a suite checkpoint's recorded hashes) is
computed in threads meanwhile and alongside the averaging, which it overlaps instead of adding to (at ~2 GB/s
a core it is the largest cost of the run); a corrupted suite checkpoint stops the run before anything is
written. Inputs are never written. The output folder is staged beside its target and renamed into place
(``force`` replaces an existing one the same way); it may not lie inside the input or contain it. Every
averager folder carries ``manifest.json`` (input steps and sha256s, averager and keys, suite version, each
output's sha256); output bytes depend only on the inputs and the settings, never on directory order or time.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import json
import math
import mmap
import os
import queue
import re
import secrets
import shutil
import struct
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lawa_suite import registry
from lawa_suite.averagers.base import Averager
from lawa_suite.averagers.lawa import LAWA
from lawa_suite.config import ConfigError

__all__ = ["PosthocError", "Snapshot", "Job", "PosthocResult", "discover", "parse_jobs", "average", "hash_input",
           "load_weights", "load_snapshot", "Command", "parse_command", "BLOCK_ELEMENTS", "FORMAT"]

FORMAT = "lawa-suite-posthoc/1"
DERIVED_FORMAT = "lawa-suite-derived/1"
BLOCK_ELEMENTS = 1 << 20     # largest slice of a tensor one elementwise averager sees (a multiple of 4096)
BLOCK_BUDGET = 64 << 20      # bytes of slices all averagers may hold together; slices shrink for big grids
MAX_OPEN_OUTPUTS = 256       # past this many outputs, files are reopened for each tensor
CHECK_BYTES = 4 << 20        # inputs are checked for NaN/Inf in pieces this size (bounds the temporary masks)
READ_THREADS = 8             # a file's sha256 runs in order, so a thread per file lets the OS balance the cores
DIRECT_BUFFER = 4 << 20      # the aligned write buffer of an output (less each when there are many outputs)
DIRECT_ALIGN = 4096          # O_DIRECT writes: offsets and lengths in multiples of this (any common block size)

STEP_NAME = re.compile(r"^(?:step|checkpoint|ckpt|iter|global_step)[-_]?(\d+)$", re.IGNORECASE)
SAFETENSORS_WEIGHTS = ("model.safetensors", "diffusion_pytorch_model.safetensors")
TORCH_WEIGHTS = ("pytorch_model.bin", "diffusion_pytorch_model.bin", "model.pt", "model.bin")
TORCH_SUFFIXES = (".pt", ".bin", ".pth")

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
           "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
for _name in ("uint16", "uint32", "uint64"):  # torch >= 2.3
    if hasattr(torch, _name):
        _DTYPES["U" + _name[4:]] = getattr(torch, _name)
_CODES = {dtype: code for code, dtype in _DTYPES.items()}


class PosthocError(ValueError):
    """The input or the settings cannot be averaged. ``str(error)`` is one line listing every problem."""


# -- discovery: which files hold which step ------------------------------------------------------------------
@dataclass(frozen=True)
class Snapshot:
    """The weights saved at one step: one file, or the shards of one (Hugging Face sharded) checkpoint."""
    step: int
    label: str                          # as messages name it: the path relative to the input folder
    files: tuple[Path, ...]             # weight files, real paths
    torch_format: bool = False          # .pt/.bin, read with torch.load(weights_only=True)
    index: Path | None = None           # the shard index json of a sharded checkpoint
    recorded: tuple[tuple[Path, str], ...] = ()  # sha256 recorded by a suite checkpoint's manifest.json


def _step_of(name: str) -> int | None:
    match = STEP_NAME.match(name)
    return int(match.group(1)) if match else None


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def _pick_source(source: Path) -> Path:
    """A run folder stands for its ``trajectory/`` (or, without one, its ``checkpoints/``)."""
    if (source / "config.yaml").is_file():
        for sub in ("trajectory", "checkpoints"):
            if (source / sub).is_dir() and any(not n.startswith(".") for n in os.listdir(source / sub)):
                return source / sub
    return source


def discover(source: str | os.PathLike[str], allow_torch_load: bool = False) -> tuple[Path, list[Snapshot], list[str]]:
    """``(folder, snapshots in step order, problems)`` for a trajectory folder.

    Recognised: ``<step>.safetensors`` files and ``<step>/`` folders holding ``model.safetensors`` (or its
    shards and ``model.safetensors.index.json``), where ``<step>`` is ``step-1000``, ``step1000``,
    ``checkpoint-1000`` and the like; a suite run folder, its ``trajectory/`` or its ``checkpoints/``; and
    ``.pt``/``.bin`` files only with ``allow_torch_load``. Hidden entries and other files are ignored.
    """
    folder = _pick_source(Path(source))
    problems: list[str] = []
    if not folder.is_dir():
        return folder, [], [f"{folder}: not a folder"]
    root = folder.resolve()
    found: dict[int, list[Snapshot]] = {}
    for entry in sorted(os.listdir(folder)):  # sorted: nothing may depend on directory order
        if entry.startswith("."):
            continue
        path = folder / entry
        stem, suffix = (entry, "") if path.is_dir() else os.path.splitext(entry)
        step = _step_of(stem)
        if step is None:
            continue
        real = path.resolve()
        if not _inside(real, root):
            problems.append(f"{entry}: a link that leads outside the input folder (to {real})")
            continue
        if path.is_dir():
            snapshot = _folder_snapshot(path, entry, step, root, allow_torch_load, problems)
        elif suffix == ".safetensors":
            snapshot = Snapshot(step, entry, (real,))
        elif suffix in TORCH_SUFFIXES:
            if not allow_torch_load:
                problems.append(f"{entry}: a pickle-based file; pass --allow-torch-load to read it with "
                                f"torch.load(weights_only=True), or convert it to safetensors")
                continue
            snapshot = Snapshot(step, entry, (real,), torch_format=True)
        else:
            continue
        if snapshot is not None:
            found.setdefault(step, []).append(snapshot)
    snapshots = []
    for step in sorted(found):
        if len(found[step]) > 1:
            problems.append(f"step {step} is saved twice ({', '.join(s.label for s in found[step])}); keep one")
        snapshots.append(found[step][0])
    if not snapshots and not problems:
        problems.append(f"{folder}: no checkpoints named by step (expected step-N.safetensors files, or step-N/, "
                        f"stepN/, checkpoint-N/ folders holding model.safetensors)")
    return folder, snapshots, problems


def _folder_snapshot(path: Path, entry: str, step: int, root: Path, allow_torch_load: bool,
                     problems: list[str]) -> Snapshot | None:
    names = set(os.listdir(path))
    if "state.json" in names and "manifest.json" not in names:
        return None  # a suite checkpoint that was never committed (or is being deleted): not a checkpoint
    recorded: tuple[tuple[Path, str], ...] = ()
    if "manifest.json" in names:
        try:
            files = json.loads((path / "manifest.json").read_text())["files"]
            recorded = tuple((path.joinpath(n).resolve(), e["sha256"]) for n, e in sorted(files.items())
                             if n.endswith(".safetensors") and isinstance(e, dict) and "sha256" in e)
        except (OSError, ValueError, KeyError, TypeError):
            problems.append(f"{entry}/manifest.json: unreadable")
    candidates = [(n, False) for n in SAFETENSORS_WEIGHTS]
    if allow_torch_load:
        candidates += [(n, True) for n in TORCH_WEIGHTS]
    for name, is_torch in candidates:
        if name + ".index.json" in names:
            return _sharded(path, entry, step, name, is_torch, root, recorded, problems)
        if name in names:
            real = (path / name).resolve()
            if not _inside(real, root):
                problems.append(f"{entry}/{name}: a link that leads outside the input folder (to {real})")
                return None
            return Snapshot(step, f"{entry}/{name}", (real,), is_torch, recorded=recorded)
    hint = "" if allow_torch_load or not any(n.endswith(TORCH_SUFFIXES) for n in names) else \
        " (it holds pickle-based weights: pass --allow-torch-load)"
    problems.append(f"{entry}/: no {' or '.join(SAFETENSORS_WEIGHTS)} (nor a sharded index) in it{hint}")
    return None


def _sharded(path: Path, entry: str, step: int, name: str, is_torch: bool, root: Path,
             recorded: tuple[tuple[Path, str], ...], problems: list[str]) -> Snapshot | None:
    index = path / f"{name}.index.json"
    label = f"{entry}/{index.name}"
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        problems.append(f"{label}: unreadable (expected JSON with a weight_map of tensor -> shard file)")
        return None
    shards, bad = [], False
    for shard in sorted(set(weight_map.values())):
        real = (path / shard).resolve()
        if Path(shard).is_absolute() or ".." in Path(shard).parts or os.sep in shard or not _inside(real, root):
            problems.append(f"{label}: shard {shard!r} lies outside the checkpoint folder")
            bad = True
        elif not real.is_file():
            problems.append(f"{label}: shard {shard!r} is missing")
            bad = True
        else:
            shards.append(real)
    return None if bad else Snapshot(step, label, tuple(shards), is_torch, index=index, recorded=recorded)


# -- reading: headers, tensors (zero-copy views of mapped files) --------------------------------------------
Layout = dict[str, tuple[torch.dtype, tuple[int, ...]]]


class Reader:
    """The tensors of one snapshot as views of its memory-mapped files; ``layout`` comes from headers only."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.layout: Layout = {}
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
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                self.problems.append(f"{where}: unreadable ({reason})")
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
            if code not in _DTYPES:
                self.problems.append(f"{self.snapshot.label}: key {name} has dtype {code}, which post-hoc averaging "
                                     f"does not handle (known: {', '.join(_DTYPES)})")
                continue
            out[name] = (_DTYPES[code], shape, handle)
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
            if t.dtype not in _CODES:
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


# Non-finite bit patterns of the float formats numpy lacks: (unsigned view, mask, masked value of NaN/Inf).
_NONFINITE_BITS = {torch.bfloat16: (np.uint16, 0x7F80, 0x7F80),       # exponent all ones
                   torch.float8_e5m2: (np.uint8, 0x7C, 0x7C),          # exponent all ones
                   torch.float8_e4m3fn: (np.uint8, 0x7F, 0x7F)}        # no Inf; NaN is S.1111.111


def _all_finite(flat: Tensor) -> bool:
    """True if the flat float tensor ``flat`` holds no NaN/Inf, checked in pieces of ``CHECK_BYTES``.

    numpy, not torch: the checks run in worker threads, where every torch op would start an OpenMP team that
    then competes with the averaging for the cores; numpy releases the GIL and starts no threads.
    """
    step = max(1, CHECK_BYTES // flat.element_size())
    return all(_piece_finite(flat[start:start + step]) for start in range(0, flat.numel(), step))


def _piece_finite(piece: Tensor) -> bool:
    if piece.dtype in (torch.float16, torch.float32, torch.float64):
        return bool(np.isfinite(piece.numpy()).all())
    unsigned, mask, value = _NONFINITE_BITS[piece.dtype]
    bits = piece.contiguous().view(torch.uint8).numpy().view(unsigned)
    return not bool(np.any((bits & mask) == value))


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _most_common(values: list[Any]) -> Any:
    """The most frequent value; ties go to the earliest (the lowest step): deterministic and blames outliers."""
    counts = Counter(values)
    best = max(counts.values())
    return next(v for v in values if counts[v] == best)


def check_layouts(readers: Sequence[Reader]) -> list[str]:
    """Missing/extra keys and shape/dtype mismatches, against the layout most checkpoints share.

    Shapes must be equal, not merely broadcastable: averaging ``[1]`` with ``[16]`` would run and be wrong.
    """
    problems: list[str] = []
    usable = [r for r in readers if r.layout]
    if not usable:
        return problems
    key_sets = [frozenset(r.layout) for r in usable]
    reference = _most_common(key_sets)
    for r, keys in zip(usable, key_sets):
        missing, extra = sorted(reference - keys), sorted(keys - reference)
        if missing:
            problems.append(f"{r.snapshot.label}: missing keys {', '.join(missing)}")
        if extra:
            problems.append(f"{r.snapshot.label}: extra keys {', '.join(extra)}")
    for name in sorted(reference):
        specs = [(r, r.layout[name]) for r in usable if name in r.layout]
        ref_dtype = _most_common([s[0] for _, s in specs])
        ref_shape = _most_common([s[1] for _, s in specs])
        for r, (dtype, shape) in specs:
            if shape != ref_shape:
                problems.append(f"{r.snapshot.label}: key {name} has shape {_fmt_shape(shape)}, the others "
                                f"{_fmt_shape(ref_shape)}")
            if dtype != ref_dtype:
                problems.append(f"{r.snapshot.label}: key {name} has dtype {_CODES[dtype]}, the others "
                                f"{_CODES[ref_dtype]}")
    return problems


def nonfinite_keys(reader: Reader, names: Sequence[str]) -> list[str]:
    """The float keys among ``names`` whose tensor in ``reader`` holds NaN or Inf, sorted. Reads, computes nothing."""
    layout = reader.layout
    return sorted(n for n in names
                  if n in layout and layout[n][0].is_floating_point and not _all_finite(reader.flat(n)))


def nonfinite(reader: Reader, names: Sequence[str]) -> str | None:
    """The problem line naming every float key of ``reader`` that holds NaN or Inf, or None."""
    bad = nonfinite_keys(reader, names)
    return f"{reader.snapshot.label}: NaN or Inf in {', '.join(bad)}" if bad else None


def check_finite(readers: Sequence[Reader], names: Sequence[str]) -> list[str]:
    """Every (file, key) whose float tensor holds NaN or Inf."""
    return [line for r in readers if (line := nonfinite(r, names)) is not None]


# -- jobs: which averagers with which settings --------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One averager with one setting of its keys (a grid point); its outputs go to ``out/<folder>``."""
    name: str                     # registered averager name
    config: dict[str, Any]        # every field of its Config (what the manifest records)
    folder: str                   # e.g. lawa-k5-nu1000

    @property
    def cls(self) -> type[Averager]:
        return registry.averagers.get(self.name)


def _name_part(value: Any) -> str:
    text = repr(value) if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9._]+", "_", text)


def parse_jobs(averagers: Sequence[str], keys: Mapping[str, str]) -> list[Job]:
    """Every combination of the comma-separated values given per key (``lawa.k=2,5 lawa.nu=100,200``), per averager.

    Values are parsed and checked by the averager's own ``Config`` (the same rules as ``suite run``). The
    folder names each key given on the command line, in the Config's field order: ``lawa-k5-nu200``.
    """
    import dataclasses

    from lawa_suite.config import build_section, parse_value

    if not averagers:
        raise ConfigError("averager: expected at least one averager name (for example averager=lawa)")
    if len(set(averagers)) != len(averagers):
        raise ConfigError(f"averager: expected distinct names, got {','.join(averagers)}")
    classes = {}
    for name in averagers:
        try:
            classes[name] = registry.averagers.get(name)
        except Exception as exc:  # unknown name or broken plugin: already one line
            raise ConfigError(f"averager: {exc}") from None
    for key in keys:
        head = key.partition(".")[0]
        if head not in classes:
            raise ConfigError(f"{key}: averager '{head}' is not selected (averager={','.join(averagers)})")
    jobs = []
    for name, cls in classes.items():
        fields = [f.name for f in dataclasses.fields(cls.Config)]
        affects_average = {f.name: f.metadata.get("affects_average", True) for f in dataclasses.fields(cls.Config)}
        given = {k.partition(".")[2]: v for k, v in keys.items() if k.partition(".")[0] == name}
        for field_name in given:
            if field_name not in fields:
                raise ConfigError(f"{name}.{field_name}: unknown key for averager '{name}'; known: {', '.join(fields)}")
        ordered = [f for f in fields if f in given]
        choices = []
        for f in ordered:
            values = [v.strip() for v in given[f].split(",")]
            if any(not v for v in values):
                raise ConfigError(f"{name}.{f}: expected a value or a comma list of values, got {given[f]!r}")
            choices.append([parse_value(f"{name}.{f}", v) for v in values])
        for combo in itertools.product(*choices):
            config = build_section(name, cls.Config, dict(zip(ordered, combo)))
            as_dict = dataclasses.asdict(config)
            shown = [f for f in ordered if affects_average[f]]  # where LAWA keeps snapshots does not name a folder
            folder = "-".join([name] + [f"{f}{_name_part(as_dict[f])}" for f in shown])
            jobs.append(Job(name, as_dict, folder))
    folders = [j.folder for j in jobs]
    if len(set(folders)) != len(folders):
        raise ConfigError(f"averager keys: two grid points share the folder name {_most_common(folders)}; "
                          f"give distinct values")
    return jobs


@dataclass
class Command:
    """``suite average``'s ``key=value`` words, sorted into what they configure."""
    jobs: list[Job]
    out: Path
    interval: int | None
    evaluate: bool
    eval_overrides: list[str]      # task and run keys for eval=true (task=, preset=, data.path=, eval.batches=...)


def parse_command(words: Sequence[str]) -> Command:
    """Split ``averager=... <averager>.<key>=v1,v2 interval=N out=DIR eval=true <task/run keys>``; one-line
    ConfigError for anything malformed (a task or run key without eval=true included)."""
    from lawa_suite.config import parse_overrides, split_list

    pairs = parse_overrides(list(words))
    names = split_list(pairs.pop("averager", ""))
    if not names:
        raise ConfigError("averager: expected one or more averager names (for example averager=lawa or "
                          "averager=lawa,ema,swa)")
    out = pairs.pop("out", "")
    if not out:
        raise ConfigError("out: expected the folder to write (for example out=runs/cifar-lawa)")
    interval = None
    if "interval" in pairs:
        raw = pairs.pop("interval")
        if not raw.strip().isdigit() or int(raw) < 1:
            raise ConfigError(f"interval: expected an integer >= 1 (a derived checkpoint at every saved step "
                              f"divisible by it), got {raw!r}")
        interval = int(raw)
    evaluate = False
    if "eval" in pairs:
        raw = pairs.pop("eval").strip().lower()
        if raw not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"eval: expected true or false, got {raw!r}")
        evaluate = raw in ("true", "1", "yes")
    known = set(registry.averagers.names())
    averager_keys = {k: v for k, v in pairs.items() if "." in k and k.partition(".")[0] in set(names) | known}
    rest = {k: v for k, v in pairs.items() if k not in averager_keys}
    if rest and not evaluate:
        key = sorted(rest)[0]
        raise ConfigError(f"{key}: not a key of suite average (averager, <averager>.<key>, interval, out, eval); "
                          f"task and run keys apply only with eval=true")
    jobs = parse_jobs(names, averager_keys)
    return Command(jobs, Path(out), interval, evaluate, [f"{k}={v}" for k, v in rest.items()])


# -- planning: which observation feeds which averager, and what is written when ----------------------------
@dataclass
class Output:
    """One derived checkpoint: written after averager track ``track`` observed snapshot ``index``."""
    job: Job
    step: int
    index: int
    members: list[int]            # the input steps it averages (LAWA: the window)
    path: Path | None = None
    sha256: str = ""
    size: int = 0


@dataclass
class Track:
    """One averager instance's view of the trajectory: its clock value per snapshot and what it writes."""
    job: Job
    clocks: list[int]                              # what observe() is told per snapshot, in step order
    total: int                                     # what start_run() is told
    offset: int = 0                                # LAWA: clock = step - offset (the window's residue mod nu)
    outputs: dict[int, list[Output]] = field(default_factory=dict)  # snapshot index -> outputs

    def __post_init__(self) -> None:
        self.cls = self.job.cls
        self.is_lawa = issubclass(self.cls, LAWA)

    def new(self, read: Callable[[int], list[Tensor]] | None = None) -> Averager:
        """A fresh averager; LAWA's window is kept as steps and re-read through ``read(clock)``."""
        averager = self.cls(**self.job.config)
        averager.check_finite = False  # every value was checked before any arithmetic
        averager.start_run(self.total)
        if self.is_lawa:
            averager.use_store(RereadSnapshots(read or (lambda clock: [])))
        return averager


def _derived_steps(steps: list[int], interval: int | None) -> tuple[list[int], list[str]]:
    if interval is None:
        return [], []
    first, last = steps[0], steps[-1]
    wanted = list(range(-(-first // interval) * interval, last + 1, interval))
    have = set(steps)
    missing = [t for t in wanted if t not in have]
    problems = []
    if missing:
        problems.append(f"interval={interval} asks for step(s) {', '.join(map(str, missing))}, which the input does "
                        f"not hold (it holds {len(steps)} steps from {first} to {last})")
    if not wanted:
        problems.append(f"interval={interval}: no multiple of it lies between the first and last saved steps "
                        f"({first}..{last})")
    return [t for t in wanted if t in have], problems


def plan(jobs: Sequence[Job], steps: list[int], interval: int | None) -> tuple[list[Track], list[str]]:
    """The tracks of every job, their outputs (found by replaying each track on a one-element probe, so a
    plugin's own notion of "ready" decides), and the problems: windows with missing steps, jobs that never
    produce anything."""
    derived, problems = _derived_steps(steps, interval)
    tracks: list[Track] = []
    for job in jobs:
        if issubclass(job.cls, LAWA):
            job_tracks, job_problems = _lawa_tracks(job, steps, derived if interval else None)
        else:
            targets = derived if interval else [steps[-1]]
            track = Track(job, clocks=list(range(1, len(steps) + 1)), total=len(steps))
            job_tracks, job_problems = [(track, targets)], []
        problems += job_problems
        produced = 0
        for track, targets in job_tracks:
            produced += _probe(track, steps, targets)
            tracks.append(track)
        if produced == 0 and not job_problems:
            at = ", ".join(map(str, derived)) if interval else f"the last step {steps[-1]}"
            problems.append(f"{job.folder}: no derived checkpoint (the averager is not ready at {at})")
    return tracks, problems


def _lawa_tracks(job: Job, steps: list[int],
                 derived: list[int] | None) -> tuple[list[tuple[Track, list[int]]], list[str]]:
    """LAWA's derived steps, grouped by ``t mod nu`` (one online-identical LAWA per residue), and its windows'
    missing steps. A window that would reach before the first saved step is not ready (no output, no error)."""
    k, nu = job.config["k"], job.config["nu"]
    have, first = set(steps), steps[0]
    problems = []
    if derived is None:  # the online end state: the window ending at the newest saved multiple of nu
        ends = [s for s in steps if s % nu == 0]
        if not ends:
            return [], [f"{job.folder}: no saved step is a multiple of nu={nu}"]
        derived = [ends[-1]]
    ready = []
    for t in derived:
        window = [t - j * nu for j in range(k)]
        if window[-1] < first:
            continue
        missing = [s for s in reversed(window) if s not in have]
        if missing:
            problems.append(f"{job.folder}: the window of step {t} needs step(s) {', '.join(map(str, missing))}, "
                            f"which the input does not hold")
        else:
            ready.append(t)
    if not ready and not problems:
        problems.append(f"{job.folder}: no window fits: {k} checkpoints {nu} steps apart span {(k - 1) * nu} "
                        f"steps before the step they end at, and the input holds steps {first}..{steps[-1]}")
    by_residue: dict[int, list[int]] = {}
    for t in ready:
        by_residue.setdefault(t % nu, []).append(t)
    tracks = [(Track(job, clocks=[s - r for s in steps], total=steps[-1] - r, offset=r), targets)
              for r, targets in sorted(by_residue.items())]
    return tracks, problems


def _probe(track: Track, steps: list[int], targets: list[int]) -> int:
    """Replay ``track`` on a one-element tensor; record an output at each target step where it is ready."""
    probe = {"probe": torch.zeros(1)}
    averager = track.new(lambda clock: [probe["probe"]])
    accepted: list[int] = []
    wanted = set(targets)
    for i, (step, clock) in enumerate(zip(steps, track.clocks)):
        if averager.observe(clock, probe):
            accepted.append(step)
        if step in wanted and averager.ready:
            window = getattr(averager, "snapshot_steps", None)
            members = [c + track.offset for c in window] if window is not None else list(accepted)
            track.outputs.setdefault(i, []).append(Output(track.job, step, i, members))
    return sum(len(v) for v in track.outputs.values())


# -- LAWA's window, re-read from the mapped inputs ----------------------------------------------------------
class RereadSnapshots:
    """A LAWA snapshot store that keeps only steps: a snapshot is re-read (a view of the mapped input) when it
    leaves the window or the sum is recomputed, instead of being kept in memory (``SnapshotStore``)."""

    def __init__(self, read: Callable[[int], list[Tensor]]) -> None:
        self._read = read
        self._steps: deque[int] = deque()

    @property
    def steps(self) -> list[int]:
        return list(self._steps)

    @property
    def newest_step(self) -> int | None:
        return self._steps[-1] if self._steps else None

    def __len__(self) -> int:
        return len(self._steps)

    def __iter__(self) -> Iterator[list[Tensor]]:
        return (self._read(step) for step in list(self._steps))

    def append(self, step: int, tensors: list[Tensor]) -> None:
        self._steps.append(step)  # no copy: the input still holds the snapshot

    def pop_oldest(self) -> list[Tensor]:
        return self._read(self._steps.popleft())

    def recycle(self, tensors: list[Tensor]) -> None:
        """Nothing to reuse: a popped snapshot is a view of the input."""

    def drop_oldest(self) -> None:
        self._steps.popleft()

    def clear(self) -> None:
        self._steps.clear()


# -- output files: safetensors written slice by slice -------------------------------------------------------
def _ordered_layout(layout: Layout) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """Data order: widest dtype first, then by name (every tensor aligned to its itemsize, as safetensors does)."""
    return sorted(((n, d, s) for n, (d, s) in layout.items()), key=lambda x: (-x[1].itemsize, x[0]))


def safetensors_header(order: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str]) -> bytes:
    """The length prefix and JSON header of a safetensors file holding ``order``'s tensors in that order."""
    entries: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in order:
        size = math.prod(shape) * dtype.itemsize
        entries[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # pad: the data then starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


def _tensor_bytes(t: Tensor) -> memoryview:
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
    (on ``writer``'s thread when given).

    Where the file system allows it the bytes bypass the page cache (``O_DIRECT``, through a page-aligned buffer
    of ``buffer_bytes``): a derived checkpoint is not read back by this run, and filling the cache with it costs
    about 0.5 s of kernel time per GB written (measured), on the cores the hashing and averaging need; the disk
    writes then overlap the work, and the final fsync has little left to do. Elsewhere: plain writes.
    """

    def __init__(self, path: Path, header: bytes, data_size: int, writer: Writer | None = None,
                 buffer_bytes: int = DIRECT_BUFFER) -> None:
        self.path = path
        self.writer = writer
        self.size = len(header) + data_size
        self.sha256 = hashlib.sha256()
        self.written = 0
        self._direct = hasattr(os, "O_DIRECT")
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
        view = memoryview(data).cast("B")
        self.sha256.update(view)
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

    def write(self, t: Tensor) -> None:
        """Append ``t``'s bytes (``t`` must not change afterwards: the writer thread may read it later)."""
        work = lambda: self._put(_tensor_bytes(t))  # noqa: E731
        self.writer.submit(work) if self.writer else work()

    def release(self) -> None:
        """Close the descriptor for now (many outputs at once); the next write reopens it."""
        self.writer.submit(self._close) if self.writer else self._close()

    def _close(self) -> None:
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
        self._close()
        if self._buffer is not None:
            self._buffer.close()
        return self.sha256.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_file(path: Path) -> str:
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


def hash_input(reader: Reader, file: Path) -> str:
    """sha256 of ``file``, one of ``reader``'s files. A safetensors file is read through the reader's own mapping
    of it, in file order: its pages are mapped once for the value check, the hash and the averaging together
    (a mapping of its own would fault every page in again); bytes no tensor view covers are read directly."""
    if reader.snapshot.torch_format:
        return _hash_file(file)
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
                return _hash_file(file)
            _hash_range(digest, fd, start + cursor, start + begin)
            if reader.file_of.get(name) == file:
                digest.update(_tensor_bytes(reader.flat(name)))
            else:  # a tensor the reader skipped (a dtype it does not handle)
                _hash_range(digest, fd, start + begin, start + end)
            cursor = end
        _hash_range(digest, fd, start + cursor, size)
    return digest.hexdigest()


def _hash_range(digest: Any, fd: int, begin: int, end: int) -> None:
    for offset in range(begin, end, 1 << 23):
        digest.update(os.pread(fd, min(1 << 23, end - offset), offset))


# -- the run -------------------------------------------------------------------------------------------------
@dataclass
class PosthocResult:
    out: Path
    source: Path
    steps: list[int]
    outputs: dict[str, list[int]]      # job folder -> derived steps written


def _check_out(out: Path, source: Path, force: bool) -> None:
    real_out, real_src = out.resolve(), source.resolve()
    if _inside(real_out, real_src):
        raise PosthocError(f"out: {out} lies inside the input folder {source}; inputs are never written, "
                           f"choose a folder outside it")
    if _inside(real_src, real_out):
        raise PosthocError(f"out: {out} contains the input folder {source}; choose a folder outside it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise PosthocError(f"out: {out} already exists; choose another folder or pass --force to replace it")


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def average(source: str | os.PathLike[str], jobs: Sequence[Job], out: str | os.PathLike[str],
            interval: int | None = None, force: bool = False, allow_torch_load: bool = False,
            log: Callable[[str], None] = lambda message: None) -> PosthocResult:
    """Average the trajectory in ``source`` with every job; write ``out/<job.folder>/step-N.safetensors``.

    Raises ``PosthocError`` (one line, nothing written) for bad input or settings, ``OSError`` for I/O.
    """
    if interval is not None and (not isinstance(interval, int) or isinstance(interval, bool) or interval < 1):
        raise PosthocError(f"interval: expected an integer >= 1, got {interval!r}")
    if not jobs:
        raise PosthocError("averager: expected at least one averager")
    out = Path(out)
    folder, snapshots, problems = discover(source, allow_torch_load)
    if folder.is_dir():
        _check_out(out, folder, force)
    readers = [Reader(s) for s in snapshots]
    try:
        with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="posthoc-read") as pool:
            try:
                outputs, steps = _validated_run(pool, folder, problems, readers, jobs, out, interval, log)
            except BaseException:
                pool.shutdown(cancel_futures=True)  # hashes not yet started are not needed any more
                raise
    finally:
        for r in readers:
            r.close()
    written: dict[str, list[int]] = {job.folder: [] for job in jobs}
    for o in outputs:
        written[o.job.folder].append(o.step)
    return PosthocResult(out, folder, steps, {k: sorted(v) for k, v in written.items()})


def _validated_run(pool: ThreadPoolExecutor, folder: Path, found: list[str], readers: list[Reader], jobs: Sequence[Job],
                   out: Path, interval: int | None, log: Callable[[str], None]) -> tuple[list[Output], list[int]]:
    """Check everything (``found``: the problems discovery met), average, commit. The values are checked (in
    ``pool``) before any arithmetic; the sha256 of every input (for the manifests) runs in ``pool`` meanwhile and
    alongside the averaging, and a suite checkpoint whose files differ from its recorded hashes stops the run
    before anything is written."""
    snapshots = [r.snapshot for r in readers]
    steps = [s.step for s in snapshots]
    names = sorted({n for r in readers for n in r.layout})
    checks = [pool.submit(nonfinite, r, names) for r in readers]  # first in the queue: the averaging waits on them
    by_size = sorted(((f, r) for r in readers for f in r.opened), key=lambda fr: (-fr[0].stat().st_size, str(fr[0])))
    hashes = {f: pool.submit(hash_input, r, f) for f, r in by_size}  # biggest first: the last to finish is short
    problems = found + [p for r in readers for p in r.problems] + check_layouts(readers)
    tracks, plan_problems = plan(jobs, steps, interval) if steps else ([], [])
    problems += plan_problems + [line for c in checks if (line := c.result()) is not None]
    if problems:  # one error lists everything there is to fix, the corrupted checkpoints too
        raise PosthocError(_summary(problems + _corrupted(snapshots, _results(hashes)), folder))
    log(f"averaging {len(snapshots)} checkpoints (steps {steps[0]}..{steps[-1]}) with {len(jobs)} "
        f"averager setting(s)")
    staging = _stage(out)
    try:
        outputs = _run(readers, tracks, _ordered_layout(readers[0].layout), staging)
        digests = _results(hashes)
        if corrupted := _corrupted(snapshots, digests):
            raise PosthocError(_summary(corrupted, folder))
        _write_manifests(staging, jobs, outputs, snapshots, digests, folder.resolve(), interval)
        _commit(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return outputs, steps


def _results(futures: Mapping[Path, Any]) -> dict[Path, str]:
    return {f: future.result() for f, future in futures.items()}


def _corrupted(snapshots: Sequence[Snapshot], digests: Mapping[Path, str]) -> list[str]:
    """Suite checkpoints whose files differ from the sha256 their manifest.json recorded."""
    return [f"{s.label}: sha256 differs from its manifest.json (corrupted)" for s in snapshots
            if any(f in digests and digests[f] != recorded for f, recorded in s.recorded)]


def _summary(problems: list[str], folder: Path) -> str:
    return (f"{len(problems)} problem(s) with {folder}, nothing was written: " + "; ".join(problems))


def _stage(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
    staging.mkdir()
    return staging


def _commit(staging: Path, out: Path) -> None:
    """Rename the staged folder into place; an existing ``out`` (``force``) is moved aside first, then removed."""
    _fsync_dir(staging)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
        os.rename(out, old)
    os.rename(staging, out)
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def _block_elements(tracks: int) -> int:
    """Slice size for elementwise averagers: ``BLOCK_ELEMENTS``, smaller when many averagers share the budget."""
    per_track = BLOCK_BUDGET // max(1, tracks) // (4 * 4)  # ~4 fp32 slices live per averager at a time
    return max(4096, min(BLOCK_ELEMENTS, per_track // 4096 * 4096))


def _run(readers: list[Reader], tracks: list[Track], order: list[tuple[str, torch.dtype, tuple[int, ...]]],
         staging: Path) -> list[Output]:
    """The one pass: tensor by tensor, slice by slice, every snapshot in step order through every track."""
    outputs = [o for t in tracks for outs in t.outputs.values() for o in outs]
    outputs.sort(key=lambda o: (o.job.folder, o.step))
    files: dict[int, OutputFile] = {}
    writer = Writer()
    try:
        with _single_torch_thread():
            _pass(readers, tracks, order, staging, outputs, files, writer)
        writer.close()
    except BaseException:
        try:
            writer.close()
        except BaseException:  # noqa: BLE001 - the first error is the one to report
            pass
        for f in files.values():
            f._close()
        raise
    for o in outputs:
        f = files[id(o)]
        o.sha256, o.size = f.finish(), f.size
    return outputs


@contextmanager
def _single_torch_thread() -> Iterator[None]:
    """Torch on one thread while the pass runs (restored after). Its ops work on cache-sized slices, where an
    OpenMP team per op costs more than it gains, and far more when other processes share the cores: each op then
    waits for a descheduled team member (measured on a busy 2-core machine: the pass of a 124M-parameter LAWA
    took 2.6 s on one thread, 8-11 s on two). The run gets its parallelism from its own threads instead."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _pass(readers: list[Reader], tracks: list[Track], order: list[tuple[str, torch.dtype, tuple[int, ...]]],
          staging: Path, outputs: list[Output], files: dict[int, OutputFile], writer: Writer) -> None:
    data_size = sum(math.prod(s) * d.itemsize for _, d, s in order)
    buffer_bytes = max(16 * DIRECT_ALIGN, min(DIRECT_BUFFER, BLOCK_BUDGET // max(1, len(outputs))))
    buffer_bytes -= buffer_bytes % DIRECT_ALIGN
    for o in outputs:
        (staging / o.job.folder).mkdir(exist_ok=True)
        o.path = staging / o.job.folder / f"step-{o.step:08d}.safetensors"
        metadata = {"format": DERIVED_FORMAT, "step": str(o.step), "averager": o.job.name,
                    "config": json.dumps(o.job.config, sort_keys=True), "inputs": ",".join(map(str, o.members))}
        files[id(o)] = OutputFile(o.path, safetensors_header(order, metadata), data_size, writer, buffer_bytes)
    index_of = {r.snapshot.step: i for i, r in enumerate(readers)}
    many = len(files) > MAX_OPEN_OUTPUTS
    if many:
        for f in files.values():
            f.release()
    elementwise = [t for t in tracks if t.cls.elementwise]
    whole = [t for t in tracks if not t.cls.elementwise]
    block = _block_elements(len(elementwise))
    with torch.no_grad():
        for name, dtype, shape in order:
            numel = math.prod(shape)
            flats = [r.flat(name) for r in readers]
            if not dtype.is_floating_point:  # never averaged: the newest observation the averager accepted
                for o in outputs:
                    files[id(o)].write(flats[index_of[o.members[-1]]])
                continue
            if elementwise:
                for start in range(0, max(1, numel), block):
                    _replay(elementwise, [f[start:start + block] for f in flats], name, files)
            if whole:  # an averager without the elementwise promise sees every tensor whole, in its shape
                _replay(whole, [f.view(shape) for f in flats], name, files)
            if many:
                for f in files.values():
                    f.release()


def _replay(tracks: list[Track], pieces: list[Tensor], name: str, files: dict[int, OutputFile]) -> None:
    """Feed ``pieces`` (one slice of tensor ``name`` per snapshot, in step order) to a fresh averager per track,
    writing each track's outputs as they come due."""
    averagers = [track.new(_reader(pieces, track) if track.is_lawa else None) for track in tracks]
    for i, piece in enumerate(pieces):
        for track, averager in zip(tracks, averagers):
            averager.observe(track.clocks[i], {name: piece})
            for o in track.outputs.get(i, ()):
                files[id(o)].write(averager.average()[name])


def _reader(pieces: list[Tensor], track: Track) -> Callable[[int], list[Tensor]]:
    index = {clock: i for i, clock in enumerate(track.clocks)}
    return lambda clock: [pieces[index[clock]]]


def _write_manifests(staging: Path, jobs: Sequence[Job], outputs: list[Output], snapshots: list[Snapshot],
                     digests: Mapping[Path, str], root: Path, interval: int | None) -> None:
    from lawa_suite import __version__ as version

    def files_of(s: Snapshot) -> list[dict[str, Any]]:
        return [{"file": _relative(f, root), "size": f.stat().st_size, "sha256": digests[f]} for f in s.files]

    by_step = {s.step: s for s in snapshots}
    common = {"format": FORMAT, "suite_version": version, "source": str(root), "interval": interval}
    for job in jobs:
        mine = [o for o in outputs if o.job is job]
        used = sorted({m for o in mine for m in o.members})
        manifest = {**common, "averager": job.name, "config": job.config,
                    "clock": "steps" if issubclass(job.cls, LAWA) else "observations",
                    "outputs": [{"file": o.path.name, "step": o.step, "size": o.size, "sha256": o.sha256,
                                 "inputs": o.members} for o in mine],
                    "inputs": {str(s): files_of(by_step[s]) for s in used}}
        _write_json(staging / job.folder / "manifest.json", manifest)
    top = {**common, "averagers": [{"folder": j.folder, "averager": j.name, "config": j.config} for j in jobs],
           "inputs": [{"step": s.step, "files": files_of(s)} for s in snapshots]}
    _write_json(staging / "manifest.json", top)
    for job in jobs:
        _fsync_dir(staging / job.folder)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


# -- whole checkpoints (evaluation, analysis) -------------------------------------------------------------------
def load_weights(path: str | os.PathLike[str], allow_torch_load: bool = False) -> dict[str, Tensor]:
    """Every tensor of one checkpoint (a safetensors file, a ``.pt`` file with the flag, or a folder holding
    ``model.safetensors`` or its shards), checked (readable, consistent shards, finite) and copied into memory."""
    path = Path(path)
    if not path.exists():
        raise PosthocError(f"{path}: does not exist")
    if path.is_dir():
        problems: list[str] = []
        snapshot = _folder_snapshot(path, path.name, 0, path.resolve(), allow_torch_load, problems)
        if snapshot is None and not problems:
            problems.append(f"{path}: an uncommitted checkpoint (no manifest.json)")
    elif path.suffix == ".safetensors":
        snapshot, problems = Snapshot(0, path.name, (path.resolve(),)), []
    elif path.suffix in TORCH_SUFFIXES:
        snapshot, problems = Snapshot(0, path.name, (path.resolve(),), torch_format=True), []
        if not allow_torch_load:
            problems.append(f"{path}: a pickle-based file; pass --allow-torch-load to read it with "
                            f"torch.load(weights_only=True)")
    else:
        raise PosthocError(f"{path}: expected a .safetensors file or a checkpoint folder")
    if problems:
        raise PosthocError("; ".join(problems))
    assert snapshot is not None
    return load_snapshot(Snapshot(-1, snapshot.label, snapshot.files, snapshot.torch_format, snapshot.index))


def load_snapshot(snapshot: Snapshot) -> dict[str, Tensor]:
    """Every tensor of ``snapshot``, checked (readable, consistent shards, finite) and copied into memory."""
    reader = Reader(snapshot)
    try:
        problems = reader.problems + check_finite([reader], sorted(reader.layout))
        if problems:
            raise PosthocError("; ".join(problems))
        return {name: reader.tensor(name).clone() for name in sorted(reader.layout)}
    finally:
        reader.close()
