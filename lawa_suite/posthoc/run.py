"""The entry point: check everything, average, write, commit.

Nothing is averaged before the headers are checked (keys, shapes, dtypes, steps: one error lists every problem).
Values are checked for NaN/Inf where the averaging reads them, slice by slice, before any averager sees the slice
(``replay.py``), so every byte of the inputs is read once. A NaN or Inf stops the pass; an exact check then finds
every input holding any, and the pass starts again without them (``_average_healthy``): each is left out, as the
online averager refuses a non-finite observation (``plan.py``), the trajectory ends at its last healthy input (a
diverged run's start is averaged), and the log and the manifests name each input left out and each output not
written, and why. Only then is anything committed. (Stored averages a reconstruction combines are checked up front,
in threads, and one holding NaN or Inf stops the command; so do the inputs of a command with other problems, whose
error lists them too.) The output folder is staged beside its target and renamed
into place only at the end. ``out`` follows the rule of every command that writes a folder (``rundir.claim_out``): it
may not be, hold or lie in the input; an existing one is replaced only with ``force``, and only if ``suite average``
made it (its ``suite-output.json``, written with the manifests, says so) and it holds no run. Inputs are never
written. The staging folder's name carries this process's pid and host: a run killed mid-way leaves it behind, and
the next ``suite average`` into the same parent folder removes it once that process is gone (and nothing a live
process is writing).

Every averager folder carries ``manifest.json`` (input steps and files, averager and keys, suite version, each
output's sha256, the inputs left out and the outputs not written) and ``SHA256SUMS`` (each output's sha256, size
and mtime, for ``sha256sum -c`` and for a later run that reads the outputs). An input's entry gives its size and
mtime and, where the suite recorded the file's sha256 when writing it (a checkpoint's ``manifest.json``, a
``SHA256SUMS`` beside it) and the file still has the recorded size and mtime, that sha256 (``"sha256_from":
"recorded"``): no input is read for its hash. ``hash_inputs`` reads every input in full in threads alongside the
averaging (``"sha256_from": "hashed"``) and checks each against its record, whatever its mtime: a difference stops
the run before anything is committed.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lawa_suite import __version__ as version
from lawa_suite.errors import PosthocError
from lawa_suite.files import (Recorded, commit_folder, fsync_dir, made_by, mark_output, record_sha256s, staged_folder,
                              write_text_atomic)
from lawa_suite.posthoc.checks import check_layouts, nonfinite_keys, nonfinite_problem, problem_list
from lawa_suite.posthoc.discover import Snapshot, discover, find_stored
from lawa_suite.posthoc.jobs import Job
from lawa_suite.posthoc.limits import Limits
from lawa_suite.posthoc.modelfolder import model_folders
from lawa_suite.posthoc.peers import WeightsAt
from lawa_suite.posthoc.plan import Output, Track, plan
from lawa_suite.posthoc.reader import Reader, describe_found
from lawa_suite.posthoc.replay import NonFiniteInput, average_all
from lawa_suite.posthoc.synthesis import plan_syntheses, synthesize_all
from lawa_suite.posthoc.writer import hash_input, ordered_layout
from lawa_suite.rundir import claim_out

__all__ = ["FORMAT", "COMMAND", "PosthocResult", "average", "is_average_output"]

FORMAT = "lawa-suite-posthoc/1"
COMMAND = "suite average"  # the command its suite-output.json names (files.mark_output)


def is_average_output(folder: Path) -> bool:
    """Whether ``folder`` is what ``suite average`` wrote: its ``suite-output.json`` says so, or (an output written
    before outputs were marked) its top ``manifest.json`` is of this module's ``FORMAT`` and lists the averagers.
    A run's checkpoint also holds a ``manifest.json``, of another format: it is not one."""
    folder = Path(folder)
    if made_by(folder) == COMMAND:
        return True
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT and "averagers" in manifest


@dataclass
class PosthocResult:
    out: Path
    source: Path
    steps: list[int]
    outputs: dict[str, list[int]]      # job folder -> derived steps written
    left_out: dict[int, str] = field(default_factory=dict)  # input step -> why it was not averaged (NaN or Inf)


def average(source: str | os.PathLike[str], jobs: Sequence[Job], out: str | os.PathLike[str],
            interval: int | None = None, force: bool = False, allow_torch_load: bool = False,
            log: Callable[[str], None] = lambda message: None, limits: Limits = Limits(),
            at: WeightsAt = WeightsAt(), hash_inputs: bool = False) -> PosthocResult:
    """Average the trajectory in ``source`` with every job; write ``out/<job.folder>/step-N.safetensors``. ``at``
    says where the weights lie in torch checkpoints other tools wrote (``peers.py``); ``hash_inputs`` reads every
    input for its sha256 and checks it against the one recorded when it was written.

    Raises ``PosthocError`` (nothing written; a line, or a line and one per problem) for bad input or settings,
    ``OSError`` for I/O. Entries of the folder that are not checkpoints are logged with the reason.
    """
    if interval is not None and (not isinstance(interval, int) or isinstance(interval, bool) or interval < 1):
        raise PosthocError(f"interval: expected an integer >= 1, got {interval!r}")
    if not jobs:
        raise PosthocError("averager: expected at least one averager")
    out = Path(out)
    if not Path(source).exists():  # as every command says it (exit 2), not as a folder that cannot be read
        raise PosthocError(f"{source}: does not exist (expected a trajectory: a run folder, its trajectory/ or "
                           f"checkpoints/, or a folder of checkpoints named by step)")
    folder, snapshots, problems, reconstructing = _inputs(Path(source), jobs, allow_torch_load, log)
    if folder.is_dir():  # the rule of every command that writes a folder: never an input, --force only its own
        claim_out(out, COMMAND, [folder], force, PosthocError, made=is_average_output)
    readers = [Reader(s, at) for s in snapshots]
    # unmapping gigabytes of inputs takes the kernel a while: done on a thread of its own once the pass is over,
    # alongside the outputs' fsyncs and the manifests
    unmap = threading.Thread(target=lambda: [r.close() for r in readers], name="posthoc-unmap")
    try:
        with ThreadPoolExecutor(max_workers=limits.read_threads, thread_name_prefix="posthoc-read") as pool:
            try:
                outputs, steps, left_out = _validated_run(pool, folder, problems, readers, jobs, out, interval, log,
                                                          limits, reconstructing, at, hash_inputs, unmap.start)
            except BaseException:
                pool.shutdown(cancel_futures=True)  # hashes not yet started are not needed any more
                raise
    finally:
        if unmap.ident is not None:
            unmap.join()
        for r in readers:
            r.close()
    written: dict[str, list[int]] = {job.folder: [] for job in jobs}
    for o in outputs:
        written[o.job.folder].append(o.step)
    return PosthocResult(out, folder, steps, {k: sorted(v) for k, v in written.items()},
                         {step: why for step, (_, why) in left_out.items()})


def _inputs(source: Path, jobs: Sequence[Job], allow_torch_load: bool,
            log: Callable[[str], None]) -> tuple[Path, list[Snapshot], list[str], bool]:
    """The saved trajectory (``discover``), or, when the source holds averages the jobs' averager stored during
    training, those: every job is then reconstructed from them (``synthesis.py``). The last value says which."""
    formats = {job.cls.stored_format for job in jobs} - {""}
    folder, stored = find_stored(source, formats) if formats else (source, [])
    if not stored:
        found = discover(source, allow_torch_load)
        for skipped in found.skipped if found.snapshots else ():  # without any, the error lists them
            log(f"skipped: {skipped}")
        return found.folder, found.snapshots, found.problems, False
    if replaying := sorted({job.name for job in jobs if not job.cls.stored_format}):
        raise PosthocError(f"averager: {', '.join(replaying)} replay the saved trajectory, while "
                           f"{', '.join(sorted({j.name for j in jobs} - set(replaying)))} are reconstructed from the "
                           f"averages stored in {source}; run them as two commands")
    log(f"reconstructing from {len(stored)} stored averages in {source} (steps {stored[0].step}..{stored[-1].step})")
    return folder, stored, [], True


def _validated_run(pool: ThreadPoolExecutor, folder: Path, found: list[str], readers: list[Reader],
                   jobs: Sequence[Job], out: Path, interval: int | None, log: Callable[[str], None],
                   limits: Limits, reconstructing: bool, at: WeightsAt, hash_inputs: bool,
                   done_reading: Callable[[], None]) -> tuple[list[Output], list[int], dict[int, tuple[str, str]]]:
    """Check everything (``found``: the problems discovery met), average (or reconstruct), commit. Returns the
    outputs, the input steps, and the inputs left out (step -> label, why)."""
    snapshots = [r.snapshot for r in readers]
    steps = [s.step for s in snapshots]
    names = sorted({n for r in readers for n in r.layout})
    stats = {f: f.stat() for r in readers for f in r.opened}  # before any reading: what the manifest describes

    def value_checks() -> list[Future[str | None]]:
        return [pool.submit(nonfinite_problem, r, names, limits.check_bytes) for r in readers]

    checks = value_checks() if reconstructing else []  # first in the queue: the reconstruction waits on them
    hashes: dict[Path, Future[str]] = {}
    if hash_inputs:  # biggest first: the last to finish is short
        by_size = sorted(((f, r) for r in readers for f in r.opened),
                         key=lambda fr: (-stats[fr[0]].st_size, str(fr[0])))
        hashes = {f: pool.submit(hash_input, r, f) for f, r in by_size}
    problems = found + [p for r in readers for p in r.problems] + check_layouts(readers)
    tracks: list[Track] = []
    syntheses: list[Output] = []
    warnings: list[str] = []
    if steps and reconstructing:
        syntheses, plan_problems = plan_syntheses(jobs, readers, interval)
        problems += plan_problems
    elif steps:
        tracks, plan_problems, warnings = plan(jobs, steps, interval)
        problems += plan_problems
    if problems and not checks:  # the error lists everything there is to fix, NaN/Inf too
        checks = value_checks()
    problems += [line for c in checks if (line := c.result()) is not None]
    if problems:  # one error lists everything there is to fix, the corrupted checkpoints too
        raise PosthocError(_summary(problems + _corrupted(snapshots, _results(hashes)), folder))
    folders = None if reconstructing else model_folders(snapshots)
    for line in describe_found(readers):
        log(line)
    if not reconstructing:
        log(f"averaging {len(snapshots)} checkpoints (steps {steps[0]}..{steps[-1]}) with {len(jobs)} "
            f"averager setting(s)")
    if folders is not None:
        log(f"the inputs are model folders: each output is one (step-N/{folders.weights_name} with the config and "
            f"tokenizer files of the newest input it averages)")
    for warning in warnings:
        log(f"warning: {warning}")
    if not hash_inputs and (changed := _changed_since_recorded(snapshots, stats)):
        log(f"note: {_short(changed)} changed since their sha256 was recorded (size or mtime differ): the manifest "
            f"gives their size and mtime only; --hash-inputs reads them and checks them against the record")
    # names this process: a later run removes it if this one is killed (and what killed runs left goes first)
    staging = staged_folder(out, log=log)
    left_out: dict[int, tuple[str, str]] = {}
    dropped: list[tuple[str, int, str]] = []
    try:
        order = ordered_layout(readers[0].layout)
        try:
            outputs = (synthesize_all(readers, syntheses, order, staging, limits) if reconstructing
                       else average_all(readers, tracks, order, staging, limits, folders,
                                        None if hash_inputs else done_reading))  # hashes may still be reading
        except NonFiniteInput:  # met in the pass: every input is checked in full
            if reconstructing:  # a stored average is not an observation to leave out: name every bad tensor
                bad = [line for c in value_checks() if (line := c.result()) is not None]
                raise PosthocError(_summary(bad + _corrupted(snapshots, _results(hashes)), folder)) from None
            futures = [pool.submit(nonfinite_keys, r, names, limits.check_bytes) for r in readers]
            left_out = {r.snapshot.step: (r.snapshot.label, f"NaN or Inf in {', '.join(keys)}")
                        for r, future in zip(readers, futures) if (keys := future.result())}
            shutil.rmtree(staging)  # the pass stopped part way: its outputs go, and it starts again without them
            staging.mkdir()
            said = warnings
            outputs, warnings, dropped = _average_healthy(readers, left_out, jobs, interval, order, staging, limits,
                                                          folders, None if hash_inputs else done_reading, folder, log)
            for warning in warnings:
                if warning not in said:  # the plan changed: outputs left out, the trajectory shorter
                    log(f"warning: {warning}")
        digests = _results(hashes)
        if corrupted := _corrupted(snapshots, digests):
            raise PosthocError(_summary(corrupted, folder))
        _write_manifests(staging, jobs, outputs, readers, _input_entries(readers, stats, digests), folder.resolve(),
                         interval, warnings, reconstructing, at, left_out, dropped)
        _record_outputs(outputs)
        mark_output(staging, COMMAND, source=folder)  # what lets a later --force replace this folder, and only it
        commit_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return outputs, steps, left_out


def _average_healthy(readers: list[Reader], left_out: Mapping[int, tuple[str, str]], jobs: Sequence[Job],
                     interval: int | None, order: Any, staging: Path, limits: Limits, folders: Any,
                     done_reading: Callable[[], None] | None, folder: Path,
                     log: Callable[[str], None]) -> tuple[list[Output], list[str], list[tuple[str, int, str]]]:
    """The pass again, leaving out the inputs that hold NaN or Inf (``left_out``: step -> label, why): each is
    refused where it comes (``plan.py``), and the trajectory ends at its last input free of them (a diverged run's
    healthy start). Returns the outputs, the plan's warnings, and the outputs not written (job folder, step, why).
    Every input left out and every output not written is logged, one line each."""
    said = [f"{label}: {why}" for _, (label, why) in sorted(left_out.items())]
    kept = [r for r in readers if r.snapshot.step not in left_out]
    if not kept:
        raise PosthocError(_summary(said + ["every input holds NaN or Inf: there is nothing to average"], folder))
    kept = [r for r in readers if r.snapshot.step <= kept[-1].snapshot.step]
    steps = [r.snapshot.step for r in kept]
    tracks, problems, warnings = plan(jobs, steps, interval, left_out)
    if problems:
        raise PosthocError(_summary(said + problems, folder))
    for line in said:
        log(f"left out {line}")
    if len(kept) < len(readers):
        log(f"averaging up to step {steps[-1]}, the last input free of NaN and Inf")
    dropped = sorted({(t.job.folder, step, why) for t in tracks for step, why in t.dropped})
    for job_folder, step, why in dropped:
        log(f"not written: {job_folder} at step {step}: {why}")
    try:
        return average_all(kept, tracks, order, staging, limits, folders, done_reading), warnings, dropped
    except NonFiniteInput as exc:  # not there a moment ago
        raise PosthocError(_summary([f"{exc} (found on the second pass: did it change while it was read?)"],
                                    folder)) from None


def _results(futures: Mapping[Path, Future[str]]) -> dict[Path, str]:
    return {f: future.result() for f, future in futures.items()}


def _corrupted(snapshots: Sequence[Snapshot], digests: Mapping[Path, str]) -> list[str]:
    """Inputs whose sha256 (read in full) differs from the one recorded when the suite wrote them."""
    return [f"{s.label}: sha256 differs from the one its {record.where} recorded when it was written (corrupted)"
            for s in snapshots
            if (record := next((r for f, r in s.recorded if f in digests and digests[f] != r.sha256), None))]


def _changed_since_recorded(snapshots: Sequence[Snapshot], stats: Mapping[Path, os.stat_result]) -> list[str]:
    """Inputs with a record that no longer describes them (another size or mtime; records without an mtime, from
    checkpoints written before records had one, are not counted: they never described an mtime)."""
    return [s.label for s in snapshots
            if any(f in stats and r.mtime_ns is not None and not r.describes(stats[f]) for f, r in s.recorded)]


def _short(labels: list[str], limit: int = 4) -> str:
    return ", ".join(labels[:limit]) + (f" and {len(labels) - limit} more" if len(labels) > limit else "")


def _input_entries(readers: Sequence[Reader], stats: Mapping[Path, os.stat_result],
                   digests: Mapping[Path, str]) -> dict[Path, dict[str, Any]]:
    """Each input file's manifest entry (without its path): size and mtime as read, and a sha256 where it is
    known: computed (``digests``), or recorded when the suite wrote the file and still describing it."""
    entries = {}
    for r in readers:
        recorded: dict[Path, Recorded] = dict(r.snapshot.recorded)
        for f in r.snapshot.files:
            stat = stats.get(f) or f.stat()
            entry: dict[str, Any] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            if f in digests:
                entry.update(sha256=digests[f], sha256_from="hashed")
            elif f in recorded and recorded[f].describes(stat):
                entry.update(sha256=recorded[f].sha256, sha256_from="recorded")
            entries[f] = entry
    return entries


def _record_outputs(outputs: Sequence[Output]) -> None:
    """``SHA256SUMS`` beside the outputs (a model folder's weights file in its own folder): their hashes, computed
    as they were written, with their size and mtime."""
    by_folder: dict[Path, dict[str, str]] = {}
    for o in outputs:
        assert o.path is not None
        by_folder.setdefault(o.path.parent, {})[o.path.name] = o.sha256
    for folder, sha256s in by_folder.items():
        record_sha256s(folder, sha256s)


def _summary(problems: list[str], folder: Path) -> str:
    return problem_list(problems, f"{folder}, nothing was written")


def _write_manifests(staging: Path, jobs: Sequence[Job], outputs: list[Output], readers: list[Reader],
                     entries: Mapping[Path, dict[str, Any]], root: Path, interval: int | None, warnings: list[str],
                     reconstructing: bool, at: WeightsAt, left_out: Mapping[int, tuple[str, str]],
                     dropped: Sequence[tuple[str, int, str]]) -> None:
    snapshots = [r.snapshot for r in readers]
    read = {r.snapshot.label: {**({"key": r.where} if r.where else {}), **({"renamed": r.renamed} if r.renamed else {})}
            for r in readers}

    def files_of(s: Snapshot) -> list[dict[str, Any]]:
        return [{"file": f.relative_to(root).as_posix(), **entries[f]} for f in s.files]

    def averager_of(job: Job) -> dict[str, Any]:
        return {"averager": job.name, **({"of": job.averager} if job.averager != job.name else {})}

    by_step = {s.step: s for s in snapshots}
    by_label = {s.label: s for s in snapshots}
    # key= and prefix= as given: suite eval reads the raw checkpoints again the same way
    common = {"format": FORMAT, "suite_version": version, "source": str(root), "interval": interval, **at.given()}
    if left_out:  # one entry per input not averaged, and why
        common["left_out"] = [{"step": step, "input": label, "why": why}
                              for step, (label, why) in sorted(left_out.items())]
    if reconstructing and (root.parent / "config.yaml").is_file():  # a run's averages/: its raw weights are there
        common["run"] = str(root.parent)
    for job in jobs:
        mine = [o for o in outputs if o.job is job]
        used = sorted({m for o in mine for m in o.members})
        mine_warned = [w for w in warnings if w.startswith(f"{job.folder}: ")]
        not_written = [{"step": step, "why": why} for f, step, why in dropped if f == job.folder]
        manifest = {**common, **averager_of(job), "config": job.config, "clock": job.cls.posthoc_clock,
                    **({"warnings": mine_warned} if mine_warned else {}),
                    **({"not_written": not_written} if not_written else {}),
                    "outputs": [{"file": o.path.relative_to(staging / job.folder).as_posix(), "step": o.step,
                                 "size": o.size, "sha256": o.sha256,
                                 "inputs": o.members, **o.notes} for o in mine],
                    "inputs": _used_inputs(mine, used, by_step, by_label, files_of)}
        (staging / job.folder).mkdir(exist_ok=True)
        write_text_atomic(staging / job.folder / "manifest.json", _json(manifest))
    top = {**common, "averagers": [{"folder": j.folder, **averager_of(j), "config": j.config} for j in jobs],
           "inputs": [{"step": s.step, "files": files_of(s), **({"read": read[s.label]} if read[s.label] else {})}
                      for s in snapshots]}
    write_text_atomic(staging / "manifest.json", _json(top))
    for job in jobs:
        fsync_dir(staging / job.folder)


def _used_inputs(outputs: list[Output], steps: list[int], by_step: Mapping[int, Snapshot],
                 by_label: Mapping[str, Snapshot], files_of: Callable[[Snapshot], Any]) -> dict[str, Any]:
    """The inputs a job's outputs use, with their files: by step, or by file where a reconstruction weighs several
    stored averages of one step (its outputs' ``coefficients`` name them)."""
    if any("coefficients" in o.notes for o in outputs):
        labels = sorted({label for o in outputs for label in o.notes["coefficients"]})
        return {label: files_of(by_label[label]) for label in labels}
    return {str(s): files_of(by_step[s]) for s in steps}


def _json(data: Any) -> str:
    return json.dumps(data, indent=1, sort_keys=True) + "\n"
