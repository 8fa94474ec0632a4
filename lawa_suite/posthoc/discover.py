"""Finding the inputs: which files of a folder hold which step.

Recognised: ``<step>.safetensors`` files and ``<step>/`` folders holding ``model.safetensors`` (or its shards and
``model.safetensors.index.json``, or, from a ``distributed=fsdp`` run, every rank's DCP files); a suite run folder,
its ``trajectory/`` or its ``checkpoints/``; and, only with ``allow_torch_load``, torch files (``.pt``, ``.pth``,
``.bin``, ``.ckpt``, ``.pth.tar``). ``<step>`` is the name other tools give a step too: ``step-1000``, ``step1000``,
``checkpoint-1000`` (Hugging Face, timm), ``ckpt_1000``, ``ckpt_step_1000``, ``iter_1000``, ``global_step1000``,
``model_1000``, ``epoch=3-step=1000`` (Lightning). Every other entry is skipped and listed with the reason (hidden
ones excepted: staging folders, editor files; and ``SHA256SUMS``). Nothing that resolves outside the input folder (a
symlink, ``..`` in a shard index) is ever read: it is a problem.

Each snapshot carries the sha256 its files had when they were written, where the suite recorded them: a suite
checkpoint's ``manifest.json``, else the ``SHA256SUMS`` beside the file (``files.record_sha256s``: trajectory files,
stored averages, post-hoc outputs).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

from lawa_suite.files import SUMS, Recorded, inside, read_sha256s
from lawa_suite.checkpoints import DCP_METADATA

__all__ = ["Snapshot", "Found", "STEP_NAME", "ACCEPTED", "discover", "find_stored", "folder_snapshot",
           "snapshot_of_path", "step_of", "split_name"]

STEP_NAME = re.compile(r"^(?:(?:step|checkpoint|ckpt|iter|iteration|global_step|model)[-_]?)+(\d+)$", re.IGNORECASE)
LIGHTNING_STEP = re.compile(r"(?:^|-)step=(\d+)(?:-|$)")  # epoch=0-step=100 (and other key=value parts)
SAFETENSORS_WEIGHTS = ("model.safetensors", "diffusion_pytorch_model.safetensors")
TORCH_WEIGHTS = ("pytorch_model.bin", "diffusion_pytorch_model.bin", "model.pt", "model.bin")
TORCH_SUFFIXES = (".pth.tar", ".pt.tar", ".pt", ".pth", ".bin", ".ckpt")  # longest first: split_name takes the first
PICKLE_HINT = "a pickle-based file; pass --allow-torch-load to read it with torch.load(weights_only=True)"
ACCEPTED = ("step-N.safetensors files or step-N/ model folders (also named stepN, checkpoint-N, ckpt_N, ckpt_step_N, "
            "iter_N, global_stepN, model_N, epoch=E-step=N), and .pt, .pth, .bin, .ckpt, .pth.tar files of those "
            "names with --allow-torch-load")


@dataclass(frozen=True)
class Snapshot:
    """The weights saved at one step: one file, the shards of one (Hugging Face sharded) checkpoint, or the DCP
    files of a ``distributed=fsdp`` checkpoint (every rank's shards, read a whole tensor at a time)."""
    step: int
    label: str                          # as messages name it: the path relative to the input folder
    files: tuple[Path, ...]             # weight files, real paths
    torch_format: bool = False          # .pt/.pth/.bin/.ckpt, read with torch.load(weights_only=True)
    index: Path | None = None           # the shard index json of a sharded checkpoint
    dcp: bool = False                   # a distributed=fsdp checkpoint: files are every rank's DCP files
    recorded: tuple[tuple[Path, Recorded], ...] = ()  # the sha256 of files recorded when they were written


class Found(NamedTuple):
    folder: Path
    snapshots: list[Snapshot]     # in step order
    problems: list[str]           # what keeps the folder from being read (errors)
    skipped: list[str]            # "name (reason)" for every entry that is not a checkpoint


def step_of(name: str) -> int | None:
    """The step a checkpoint's name (without its suffix) gives, or None."""
    match = STEP_NAME.match(name) or (LIGHTNING_STEP.search(name) if "=" in name else None)
    return int(match.group(1)) if match else None


def split_name(name: str) -> tuple[str, str]:
    """``(stem, suffix)`` with the suffixes checkpoints use, two-part ones (``.pth.tar``) included; lower-case."""
    for suffix in (".safetensors", *TORCH_SUFFIXES):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[:-len(suffix)], suffix
    stem, suffix = os.path.splitext(name)
    return stem, suffix.lower()


def pick_source(source: Path) -> Path:
    """A run folder stands for its ``trajectory/`` (or, without one, its ``checkpoints/``)."""
    if (source / "config.yaml").is_file():
        for sub in ("trajectory", "checkpoints"):
            if (source / sub).is_dir() and any(not n.startswith(".") for n in os.listdir(source / sub)):
                return source / sub
    return source


def discover(source: str | os.PathLike[str], allow_torch_load: bool = False) -> Found:
    """The checkpoints of a trajectory folder in step order, the problems, and what was skipped."""
    folder = pick_source(Path(source))
    problems: list[str] = []
    skipped: list[str] = []
    if not folder.is_dir():
        return Found(folder, [], [f"{folder}: not a folder"], [])
    root = folder.resolve()
    found: dict[int, list[Snapshot]] = {}
    steps = {e: _entry_step(folder / e, e) for e in os.listdir(folder) if not e.startswith(".") and e != SUMS}
    # in step order, then by name: nothing may depend on directory order, and problems read in step order
    for entry in sorted(steps, key=lambda e: (steps[e] is None, steps[e] or 0, e)):
        snapshot = _entry_snapshot(folder / entry, entry, steps[entry], root, allow_torch_load, problems, skipped)
        if snapshot is not None:
            found.setdefault(snapshot.step, []).append(snapshot)
    snapshots = []
    for step in sorted(found):
        if len(found[step]) > 1:
            problems.append(f"step {step} is saved twice ({', '.join(s.label for s in found[step])}); keep one")
        snapshots.append(found[step][0])
    skipped.sort()
    if not snapshots and not problems:
        seen = f"skipped {len(skipped)}: {_short(skipped)}" if skipped else "it is empty"
        problems.append(f"{folder}: no checkpoints named by step ({seen}); accepted: {ACCEPTED}")
    return Found(folder, with_records(snapshots), problems, skipped)


def _short(items: list[str], limit: int = 6) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _entry_step(path: Path, entry: str) -> int | None:
    return step_of(entry if path.is_dir() else split_name(entry)[0])


def _entry_snapshot(path: Path, entry: str, step: int | None, root: Path, allow_torch_load: bool,
                    problems: list[str], skipped: list[str]) -> Snapshot | None:
    """The snapshot one folder entry holds; None for entries that are not checkpoints (listed in ``skipped`` with
    the reason) or that have problems."""
    is_dir = path.is_dir()
    suffix = "" if is_dir else split_name(entry)[1]
    weights_like = is_dir or suffix in (".safetensors", *TORCH_SUFFIXES)
    if step is None:
        reason = "not named by step" if weights_like else "not a checkpoint"
        skipped.append(f"{entry}{'/' if is_dir else ''} ({reason})")
        return None
    if not weights_like:
        skipped.append(f"{entry} (named by step, but not a weights file: .safetensors, or a torch file with "
                       f"--allow-torch-load)")
        return None
    real = path.resolve()
    if not inside(real, root):
        problems.append(f"{entry}: a link that leads outside the input folder (to {real})")
        return None
    if is_dir:
        if _uncommitted(path):
            skipped.append(f"{entry}/ (a suite checkpoint that was never committed: no manifest.json)")
            return None
        return folder_snapshot(path, entry, step, root, allow_torch_load, problems)
    if suffix == ".safetensors":
        return Snapshot(step, entry, (real,))
    if not allow_torch_load:
        problems.append(f"{entry}: {PICKLE_HINT}, or convert it to safetensors")
        return None
    return Snapshot(step, entry, (real,), torch_format=True)


def _uncommitted(path: Path) -> bool:
    """A suite checkpoint that was never committed (or is being deleted)."""
    return (path / "state.json").exists() and not (path / "manifest.json").exists()


def folder_snapshot(path: Path, entry: str, step: int, root: Path, allow_torch_load: bool,
                    problems: list[str]) -> Snapshot | None:
    """The weights of a checkpoint folder (a suite checkpoint, a Hugging Face or diffusers model folder)."""
    names = set(os.listdir(path))
    if _uncommitted(path):
        return None
    recorded: tuple[tuple[Path, Recorded], ...] = ()
    if "manifest.json" in names:
        try:
            files = json.loads((path / "manifest.json").read_text())["files"]
            recorded = tuple((path.joinpath(n).resolve(), Recorded(e["sha256"], e["size"], e.get("mtime_ns"),
                                                                   "manifest.json"))
                             for n, e in sorted(files.items())
                             if (n.endswith((".safetensors", ".distcp")) or n == DCP_METADATA)
                             and isinstance(e, dict) and "sha256" in e)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            problems.append(f"{entry}/manifest.json: unreadable")
    if DCP_METADATA in names and "manifest.json" in names:
        return _dcp(path, entry, step, root, recorded, problems)
    candidates = [(n, False) for n in SAFETENSORS_WEIGHTS]
    if allow_torch_load:
        candidates += [(n, True) for n in TORCH_WEIGHTS]
    for name, is_torch in candidates:
        if name + ".index.json" in names:
            return _sharded(path, entry, step, name, is_torch, root, recorded, problems)
        if name in names:
            real = (path / name).resolve()
            if not inside(real, root):
                problems.append(f"{entry}/{name}: a link that leads outside the input folder (to {real})")
                return None
            return Snapshot(step, f"{entry}/{name}", (real,), is_torch, recorded=recorded)
    hint = "" if allow_torch_load or not any(n.endswith(TORCH_SUFFIXES) for n in names) else \
        " (it holds pickle-based weights: pass --allow-torch-load)"
    problems.append(f"{entry}/: no {' or '.join(SAFETENSORS_WEIGHTS)} (nor a sharded index) in it{hint}")
    return None


def with_records(snapshots: list[Snapshot]) -> list[Snapshot]:
    """``snapshots`` with the records of the ``SHA256SUMS`` beside their files, where no manifest gave any (each
    folder's record read once)."""
    sums: dict[Path, dict[str, Recorded]] = {}
    out = []
    for s in snapshots:
        if not s.recorded:
            for folder in {f.parent for f in s.files} - set(sums):
                sums[folder] = read_sha256s(folder)
            s = replace(s, recorded=tuple((f, sums[f.parent][f.name]) for f in s.files if f.name in sums[f.parent]))
        out.append(s)
    return out


def _sharded(path: Path, entry: str, step: int, name: str, is_torch: bool, root: Path,
             recorded: tuple[tuple[Path, Recorded], ...], problems: list[str]) -> Snapshot | None:
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
        if Path(shard).is_absolute() or ".." in Path(shard).parts or os.sep in shard or not inside(real, root):
            problems.append(f"{label}: shard {shard!r} lies outside the checkpoint folder")
            bad = True
        elif not real.is_file():
            problems.append(f"{label}: shard {shard!r} is missing")
            bad = True
        else:
            shards.append(real)
    return None if bad else Snapshot(step, label, tuple(shards), is_torch, index=index, recorded=recorded)


def _dcp(path: Path, entry: str, step: int, root: Path, recorded: tuple[tuple[Path, Recorded], ...],
         problems: list[str]) -> Snapshot | None:
    """A suite checkpoint of a ``distributed=fsdp`` run: DCP's ``.metadata`` and every rank's ``.distcp`` file."""
    files = []
    for name in sorted(n for n in os.listdir(path) if n.endswith(".distcp") or n == DCP_METADATA):
        real = (path / name).resolve()
        if not inside(real, root):
            problems.append(f"{entry}/{name}: a link that leads outside the input folder (to {real})")
            return None
        files.append(real)
    return Snapshot(step, f"{entry}/", tuple(files), dcp=True, recorded=recorded)


def snapshot_of_path(path: Path, allow_torch_load: bool) -> tuple[Snapshot | None, list[str]]:
    """One checkpoint named directly (a safetensors file, a ``.pt`` file with the flag, or a checkpoint or model
    folder), as a snapshot of no particular step, and the problems that keep it from being read."""
    if not path.exists():
        return None, [f"{path}: does not exist"]
    if path.is_dir():
        problems: list[str] = []
        snapshot = folder_snapshot(path, path.name, 0, path.resolve(), allow_torch_load, problems)
        if snapshot is None and not problems:
            problems.append(f"{path}: an uncommitted checkpoint (no manifest.json)")
    elif split_name(path.name)[1] == ".safetensors":
        snapshot, problems = Snapshot(0, path.name, (path.resolve(),)), []
    elif split_name(path.name)[1] in TORCH_SUFFIXES:
        snapshot, problems = Snapshot(0, path.name, (path.resolve(),), torch_format=True), []
        if not allow_torch_load:
            problems.append(f"{path}: {PICKLE_HINT}")
    else:
        return None, [f"{path}: expected a .safetensors file, a checkpoint folder, or a torch file (.pt, .pth, .bin, "
                      f".ckpt, .pth.tar) with --allow-torch-load"]
    if snapshot is None:
        return None, problems
    # step -1: the reader then skips the check of the step recorded in the file's metadata
    return replace(snapshot, step=-1), problems


def find_stored(source: str | os.PathLike[str], formats: set[str]) -> tuple[Path, list[Snapshot]]:
    """The averages an averager stored during training whose ``format`` metadata is one of ``formats``: in a run
    folder's ``averages/<name>/`` (the folder returned is then ``averages/``), or directly in ``source``; in (step,
    file name) order."""
    from safetensors import safe_open

    source = Path(source)
    if (source / "config.yaml").is_file():
        folder, candidates = source / "averages", sorted((source / "averages").glob("*/*.safetensors"))
    else:
        folder, candidates = source, sorted(source.glob("*.safetensors"))
    root = folder.resolve()
    found = []
    for path in candidates:
        real = path.resolve()
        if path.name.startswith(".") or not inside(real, root):
            continue
        try:
            with safe_open(str(real), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except Exception:  # noqa: BLE001 - not a safetensors file we can read: not a stored average
            continue
        if metadata.get("format") in formats and metadata.get("step", "").isdigit():
            found.append(Snapshot(int(metadata["step"]), path.relative_to(folder).as_posix(), (real,)))
    return folder, with_records(sorted(found, key=lambda s: (s.step, s.label)))
