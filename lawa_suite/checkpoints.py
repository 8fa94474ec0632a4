"""Crash-safe checkpoints: atomic save, manifest, verify, list, retention, and nested-state serialisation.

Commit protocol (a checkpoint is valid iff ``step-N/manifest.json`` exists and every hash in it verifies):
  1. every file is written into a staging folder ``.step-N.tmp-<pid>_<host>_<token>/`` and fsynced;
  2. ``manifest.json`` (format, step, per-file size, mtime_ns and sha256, config hash) is written last and fsynced;
  3. the staging folder is fsynced, renamed to ``step-N``, and the parent folder fsynced;
  4. only then does retention delete the oldest committed checkpoints beyond ``keep``.
A crash at any point leaves every earlier checkpoint untouched; staging leftovers are never listed and are
removed by ``clean_leftovers`` at the next start once the process that made them is gone (its pid and host are in
the name). A write error (full disk, file size limit, a failing writer)
raises ``CheckpointError`` naming the file, and retention never runs. An invalid folder in the way of a new
commit (corrupt, or never committed) is renamed to ``step-N.invalid-<token>``, never deleted. Tensors go to
safetensors (no pickle); the rest of a nested
state (optimizer, RNG, counters) goes to JSON with placeholders pointing at the tensors. Single files outside
checkpoints (``save_tensors_atomic``) get their sha256 recorded in their folder's ``SHA256SUMS`` instead; a save
into a folder first removes the temporary files that dead processes' saves left there.

``SUITE_FAULT=<point>@<step>`` kills the process with SIGKILL at a named point of the protocol (for the
crash tests): see ``FAULT_POINTS``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from lawa_suite.errors import CheckpointError
from lawa_suite.files import (first_line, fsync_dir, fsync_file, os_reason, owned_sibling, plain_mode, record_sha256s,
                              remove_dead_leftovers, sha256_file, write_atomic)

__all__ = ["CheckpointError", "Checkpoint", "FAULT_POINTS", "fault_point", "flatten_state", "unflatten_state",
           "save_tensors_atomic", "step_in_name", "commit_checkpoint", "verify", "list_checkpoints", "latest_valid",
           "apply_retention", "clean_leftovers", "quarantine", "state_writers", "tensor_writer", "read_state",
           "sha256_file", "step_dir_name"]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_STAGING = re.compile(r"^\.step-(\d+)\.tmp-[0-9a-f]+$")
FAULT_POINTS = ("after_first_file", "before_manifest", "after_manifest_before_rename",
                "after_rename_before_dir_fsync", "during_retention_delete")


def fault_point(name: str, step: int) -> None:
    """Die by SIGKILL here if ``SUITE_FAULT`` names this point and step (crash-safety tests only)."""
    spec = os.environ.get("SUITE_FAULT")
    if spec and spec == f"{name}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


# -- nested state <-> (tensors, JSON) -----------------------------------------------------------------
def flatten_state(state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested structure into a flat ``{path: tensor}`` dict and a JSON skeleton that references it.

    Dicts with non-string keys (optimizer states are keyed by int) and tuples survive the round trip.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach()
            return {"__tensor__": path}
        if isinstance(node, dict):
            if all(isinstance(k, str) for k in node):
                return {"__dict__": {k: walk(v, f"{path}/{k}") for k, v in node.items()}}
            return {"__pairs__": [[k, walk(v, f"{path}/{k}")] for k, v in node.items()]}
        if isinstance(node, (list, tuple)):
            items = [walk(v, f"{path}/{i}") for i, v in enumerate(node)]
            return {"__tuple__": items} if isinstance(node, tuple) else items
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if hasattr(node, "tolist"):  # numpy arrays and scalars (numpy RNG state)
            return {"__array__": node.tolist(), "dtype": str(node.dtype)}
        raise CheckpointError(f"cannot serialise {type(node).__name__} at {path or '/'}")

    return tensors, walk(state, "")


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``flatten_state``."""
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"]]
    if "__dict__" in skeleton:
        return {k: unflatten_state(v, tensors) for k, v in skeleton["__dict__"].items()}
    if "__pairs__" in skeleton:
        return {k: unflatten_state(v, tensors) for k, v in skeleton["__pairs__"]}
    if "__tuple__" in skeleton:
        return tuple(unflatten_state(v, tensors) for v in skeleton["__tuple__"])
    if "__array__" in skeleton:
        import numpy as np
        return np.asarray(skeleton["__array__"], dtype=skeleton["dtype"])
    raise CheckpointError(f"unknown node in checkpoint state: {sorted(skeleton)}")


def _savable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared or non-contiguous storage (tied weights): copy only those tensors."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, t in tensors.items():
        t = t.detach().cpu()
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        if key in seen or not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.contiguous().clone()
        seen.add(key)
        out[name] = t
    return out


# -- single files -----------------------------------------------------------------------------------
def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """A safetensors file, written atomically (trajectory snapshots, stored averages), its sha256 recorded in the
    folder's ``SHA256SUMS`` with its size and mtime (``files.record_sha256s``). Returns the sha256.

    The hash is taken right after the write, before the fsync, while the bytes are still in the page cache: a
    read from memory, about a quarter of a second per GB on one core, far less than the write to disk costs."""
    path = Path(path)
    digest: list[str] = []

    def write(tmp: Path) -> None:
        tensor_writer(tensors, metadata)(tmp)
        digest.append(sha256_file(tmp))

    write_atomic(path, write)  # (which first removes the temporary files of saves killed mid-write)
    record_sha256s(path.parent, {path.name: digest[0]})
    return digest[0]


# -- checkpoints ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def step_in_name(name: str) -> int | None:
    """The step a checkpoint folder's name gives (``step-N``), or None for any other name."""
    named = _STEP_DIR.match(name)
    return int(named.group(1)) if named else None


def _write_into(staging: Path, name: str, write: Callable[[Path], None]) -> dict[str, Any]:
    target = staging / name
    try:
        write(target)
        plain_mode(target)  # safetensors writes 0600: a checkpoint's files get a plain open()'s mode, as their siblings
        fsync_file(target)
    except Exception as exc:  # OSError, or safetensors' own error for a failed write (full disk, size limit)
        raise CheckpointError(f"could not write {target}: {os_reason(exc)}") from exc
    stat = target.stat()  # mtime_ns: a reader may take the sha256 without hashing while size and mtime match
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_file(target)}


def commit_checkpoint(root: Path, step: int, files: dict[str, Callable[[Path], None]],
                      info: dict[str, Any] | None = None) -> Path:
    """Write ``files`` (name -> writer of that path) as checkpoint ``step`` under ``root``, atomically.

    On any error the staging folder is removed and earlier checkpoints are untouched.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    staging = owned_sibling(final)  # names this process: a later run removes it only once the process is gone
    staging.mkdir()
    try:
        entries = {}
        for i, (name, write) in enumerate(files.items()):
            entries[name] = _write_into(staging, name, write)
            if i == 0:
                fault_point("after_first_file", step)
        fault_point("before_manifest", step)
        manifest = {"format": FORMAT_VERSION, "step": step, "files": dict(sorted(entries.items())), **(info or {})}
        _write_into(staging, MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1, sort_keys=True)))
        fsync_dir(staging)
        fault_point("after_manifest_before_rename", step)
        if final.exists():
            if not verify(final):  # the same step saved again (e.g. a periodic save that is also the final one)
                shutil.rmtree(staging)
                return final
            quarantine(final)  # an invalid folder in the way (corrupt, never committed): keep it as evidence
        os.rename(staging, final)
        fault_point("after_rename_before_dir_fsync", step)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


# What the run's writer (``training/checkpointing.py``, ``training/sharded_checkpoints.py``) puts into a checkpoint
# besides the manifest: a whole one holds WHOLE_FILES; a sharded one SHARDED_FILES and one ``__<rank>_0.distcp`` per
# process (the manifest's ``sharded`` says how many). A checkpoint holding or naming any of them must list every one
# it needs.
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of a sharded checkpoint's .distcp files
WHOLE_FILES = ("model.safetensors", "state.json", "state.safetensors")
SHARDED_FILES = (DCP_METADATA, "state.json", "state.safetensors")
_RANK_FILE = re.compile(r"^__\d+_\d+\.distcp$")
_RUN_KEYS = ("task", "averagers", "sharded")  # the info a run's writer adds to every manifest


def _written_by_run(name: str) -> bool:
    return name in WHOLE_FILES or name in SHARDED_FILES or bool(_RANK_FILE.match(name))


def _plain_name(name: object) -> bool:
    """A file name that stays in the checkpoint folder: the writer uses plain names, never paths."""
    return (isinstance(name, str) and name not in ("", ".", "..")
            and not any(c in "/\\" or ord(c) < 32 for c in name))


def _json_type(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _needed_files(manifest: dict[str, Any], present: set[str], manifest_path: Path) -> tuple[list[str], list[str]]:
    """The files a run checkpoint must list (whole or sharded, as its manifest and folder say), and the problems
    with the manifest's own record of them."""
    sharded = "sharded" in manifest or ".metadata" in present or ".metadata" in manifest["files"]
    if not sharded:
        return list(WHOLE_FILES), []
    ranks = manifest.get("sharded")
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        return list(SHARDED_FILES), [f"{manifest_path}: 'sharded' is {ranks!r}; a sharded checkpoint's manifest gives "
                                     f"its number of processes (an integer >= 1), whose files it must list"]
    return [*SHARDED_FILES, *(f"__{rank}_0.distcp" for rank in range(ranks))], []


def verify(path: Path) -> list[str]:
    """Problems with the checkpoint at ``path`` (empty if valid), one line each: a missing or malformed manifest, a name
    that leaves the folder, a file the writer produces that the manifest does not list (a run checkpoint must list
    every file it needs, and every such file present), a missing, truncated or corrupted file, and a step in the
    manifest or the saved training state other than the one the folder's name gives (another step's checkpoint
    copied or linked in). The folder itself may be a link (checkpoints moved to another disk and linked back); its
    files may not, and retention never deletes through it."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return [f"{manifest_path}: missing (the checkpoint was never committed)"]
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        return [f"{manifest_path}: unreadable ({first_line(exc)})"]
    if not isinstance(manifest, dict):
        return [f"{manifest_path}: {_json_type(manifest)}; expected a JSON object with 'files'"]
    files = manifest.get("files")
    if not isinstance(files, dict):
        what = "missing" if "files" not in manifest else _json_type(files)
        return [f"{manifest_path}: 'files' is {what}; expected a mapping of each file name to its size and sha256"]
    problems = []
    for name, entry in files.items():
        if not _plain_name(name):
            problems.append(f"{manifest_path}: file name {name!r} is not a plain name inside the checkpoint folder; "
                            f"the manifest names its files plainly (no '/', '\\', '..' or control characters)")
        elif (not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or isinstance(entry["size"], bool)
              or not isinstance(entry.get("sha256"), str)):
            problems.append(f"{manifest_path}: the entry of {name} is {json.dumps(entry)[:80]}; expected "
                            f'{{"size": <bytes>, "sha256": <hex>}}')
    if problems:
        return problems
    present = {child.name for child in path.iterdir()}
    if any(k in manifest for k in _RUN_KEYS) or any(_written_by_run(n) for n in present | set(files)):
        needed, problems = _needed_files(manifest, present, manifest_path)
        unlisted = sorted({n for n in needed if n not in files} | {n for n in present if _written_by_run(n)
                                                                   and n not in files})
        if unlisted:
            problems.append(f"{manifest_path}: does not list {', '.join(unlisted)}; a checkpoint's manifest lists "
                            f"every file the run wrote into it")
        if problems:
            return problems
    elif not files:
        return [f"{manifest_path}: lists no files; a checkpoint holds at least one"]
    for name, entry in files.items():
        file = path / name
        if file.is_symlink() or not file.is_file():
            problems.append(f"{file}: {'a link' if file.is_symlink() else 'missing'} (a checkpoint's files are "
                            f"regular files inside it)")
        elif file.stat().st_size != entry["size"]:
            problems.append(f"{file}: {file.stat().st_size} bytes, the manifest says {entry['size']} (truncated?)")
        elif sha256_file(file) != entry["sha256"]:
            problems.append(f"{file}: sha256 differs from the manifest (corrupted)")
    return problems or _step_problems(path, manifest, manifest_path)


def _step_problems(path: Path, manifest: dict[str, Any], manifest_path: Path) -> list[str]:
    """A checkpoint folder named ``step-N`` holds step N: the manifest's ``step`` and the training state's step (the
    loop's counter in ``state.json``, whose sha256 the manifest has just verified) must say N. A folder of another
    name is not checked (a checkpoint copied elsewhere under a name of the user's)."""
    step = step_in_name(path.name)
    if step is None:
        return []
    said = manifest.get("step", step)
    if said != step or isinstance(said, bool):
        return [f"{manifest_path}: step {json.dumps(said)[:40]}, while the folder is named for step {step}; a "
                f"checkpoint's folder is named by the step it holds (renamed or copied from another step?)"]
    if "state.json" not in manifest["files"]:
        return []
    try:
        train = read_state_skeleton(path, "state")["__dict__"]["train"]["__dict__"]
    except (OSError, ValueError, KeyError, TypeError):  # a state of another shape: the files verified, nothing to say
        return []
    said = train.get("step", step) if isinstance(train, dict) else step
    if said != step or isinstance(said, bool):
        return [f"{path / 'state.json'}: the training state is at step {json.dumps(said)[:40]}, while the folder is "
                f"named for step {step}; a checkpoint's folder is named by the step it holds (renamed or copied from "
                f"another step?)"]
    return []


def quarantine(path: Path) -> Path:
    """Rename an invalid checkpoint folder out of the way (``step-N.invalid-<token>``); never delete it."""
    target = path.with_name(f"{path.name}.invalid-{secrets.token_hex(4)}")
    os.rename(path, target)
    return target


def list_checkpoints(root: Path) -> list[Checkpoint]:
    """Committed checkpoints (a manifest exists) in step order; staging folders are never listed."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        step = step_in_name(child.name)
        if step is not None and child.is_dir() and (child / MANIFEST).is_file():
            found.append(Checkpoint(step, child))
    return sorted(found, key=lambda c: c.step)


def latest_valid(root: Path, warn: Callable[[str], None] = print) -> Checkpoint | None:
    """The newest checkpoint whose files verify; invalid newer ones are reported and left in place."""
    for ckpt in reversed(list_checkpoints(root)):
        problems = verify(ckpt.path)
        if not problems:
            return ckpt
        warn(f"skipping checkpoint {ckpt.path.name}: {problems[0]}")
    return None


def apply_retention(root: Path, keep: int, warn: Callable[[str], None] = print) -> list[Path]:
    """Delete the oldest committed checkpoints beyond ``keep``; a failed delete is reported, not fatal. A folder that
    is a link is neither counted nor deleted (nor anything through it: it leads to another run's checkpoint)."""
    committed = [c for c in list_checkpoints(root) if not c.path.is_symlink()]
    doomed = committed[:-keep] if keep > 0 else []
    deleted = []
    for ckpt in doomed:
        fault_point("during_retention_delete", ckpt.step)
        try:
            # Remove the manifest first: a half-deleted folder is then never listed as a checkpoint.
            (ckpt.path / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(ckpt.path)
            deleted.append(ckpt.path)
        except OSError as exc:
            warn(f"could not delete old checkpoint {ckpt.path}: {exc}")
    return deleted


def clean_leftovers(root: Path) -> list[Path]:
    """Remove staging folders left by a crash mid-save (they were never committed): those of processes no longer
    running (``files.remove_dead_leftovers``), and those whose name says no owner (a sharded save's scratch folder,
    older versions' staging), which only the run that holds this folder can have made."""
    root = Path(root)
    removed = []
    if root.is_dir():
        for child in root.iterdir():
            if _STAGING.match(child.name):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
        removed += remove_dead_leftovers(root)
    return removed


def state_writers(stem: str, state: Any) -> dict[str, Callable[[Path], None]]:
    """Writers for a nested state as ``<stem>.safetensors`` (tensors) + ``<stem>.json`` (everything else)."""
    tensors, skeleton = flatten_state(state)
    text = json.dumps(skeleton)
    return {f"{stem}.safetensors": tensor_writer(tensors),
            f"{stem}.json": lambda p: p.write_text(text)}


def tensor_writer(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Callable[[Path], None]:
    safe = _savable(tensors)
    return lambda p: save_file(safe, str(p), metadata=metadata)


def read_state(folder: Path, stem: str) -> Any:
    """Read back what ``state_writers(stem, ...)`` wrote into ``folder``."""
    tensors = load_file(str(folder / f"{stem}.safetensors"))
    return unflatten_state(read_state_skeleton(folder, stem), tensors)


def read_state_skeleton(folder: Path, stem: str) -> Any:
    """The JSON skeleton of what ``state_writers(stem, ...)`` wrote (its structure and plain values, no tensor)."""
    return json.loads((folder / f"{stem}.json").read_text())


def read_state_part(folder: Path, stem: str, key: str) -> Any:
    """``read_state(folder, stem)[key]``, reading only the tensors that part holds (an optimizer's state, without
    every averager's snapshots beside it)."""
    from safetensors import safe_open

    part = read_state_skeleton(folder, stem)["__dict__"][key]
    with safe_open(str(folder / f"{stem}.safetensors"), framework="pt") as saved:
        return unflatten_state(part, _TensorsOnDemand(saved))


class _TensorsOnDemand:
    """The tensors of an open safetensors file, each read when ``unflatten_state`` looks it up."""

    def __init__(self, saved: Any) -> None:
        self.saved = saved

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.saved.get_tensor(key)
