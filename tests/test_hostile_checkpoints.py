"""Hostile users against checkpoints and post-hoc averaging: a manifest that hides a damaged file, leftovers of
killed processes, a trajectory that diverges into Inf (issue "Nothing lost, nothing run, nothing silent")."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lawa_suite import checkpoints as ckpt, files, registry
from lawa_suite.averagers.base import NonFiniteWarning
from lawa_suite.cli import app
from lawa_suite.config import resolve
from lawa_suite.training.loop import train

from conftest import ToyTask
from helpers import same_bits, tree_digest

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent


# -- 4. verify trusts no manifest ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    """A toy run with checkpoints at steps 3 and 6."""
    out = tmp_path_factory.mktemp("toy") / "run"
    train(resolve(["task=toy", f"out={out}", "steps=6", "checkpoint.every=3", "checkpoint.keep=5"]))
    return out


def edit_manifest(folder: Path, change) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def files_emptied(folder: Path) -> str:
    truncate(folder / "model.safetensors")
    edit_manifest(folder, lambda m: m.update(files={}))
    return "does not list model.safetensors, state.json, state.safetensors"


def entry_swapped_for_dotdot(folder: Path) -> str:
    """The damaged file's entry now names the healthy copy in the checkpoint beside it, which verifies."""
    truncate(folder / "model.safetensors")
    healthy = json.loads((folder.parent / "step-00000003" / "manifest.json").read_text())["files"]["model.safetensors"]

    def swap(m):
        del m["files"]["model.safetensors"]
        m["files"]["../step-00000003/model.safetensors"] = healthy
    edit_manifest(folder, swap)
    return "'../step-00000003/model.safetensors' is not a plain name inside the checkpoint folder"


def entry_swapped_for_absolute(folder: Path) -> str:
    truncate(folder / "model.safetensors")
    other = folder.parent / "step-00000003" / "model.safetensors"
    healthy = json.loads((other.parent / "manifest.json").read_text())["files"]["model.safetensors"]

    def swap(m):
        del m["files"]["model.safetensors"]
        m["files"][str(other)] = healthy
    edit_manifest(folder, swap)
    return "is not a plain name inside the checkpoint folder"


def state_file_unlisted(folder: Path) -> str:
    (folder / "state.json").write_text("{}")  # present, changed, and no longer listed
    edit_manifest(folder, lambda m: m["files"].pop("state.json"))
    return "does not list state.json"


def files_as_a_list(folder: Path) -> str:
    edit_manifest(folder, lambda m: m.update(files=sorted(m["files"])))
    return "'files' is a list; expected a mapping"


def entry_without_size(folder: Path) -> str:
    edit_manifest(folder, lambda m: m["files"]["model.safetensors"].pop("size"))
    return "the entry of model.safetensors is"


TAMPERING = [files_emptied, entry_swapped_for_dotdot, entry_swapped_for_absolute, state_file_unlisted,
             files_as_a_list, entry_without_size]


@pytest.mark.parametrize("tamper", TAMPERING)
def test_a_manifest_that_hides_a_file_fails_verify_and_resume_auto_skips_it(toy_run, tmp_path, tamper):
    out = tmp_path / "run"
    shutil.copytree(toy_run, out)
    newest = out / "checkpoints" / "step-00000006"
    assert ckpt.verify(newest) == []
    expected = tamper(newest)
    problems = ckpt.verify(newest)
    assert problems and expected in problems[0] and all("\n" not in p for p in problems), problems
    verdict = runner.invoke(app, ["verify", str(newest)])
    assert verdict.exit_code == 1 and "INVALID" in verdict.output and expected in verdict.output, verdict.output
    assert verdict.exception is None or isinstance(verdict.exception, SystemExit)  # no traceback
    warned = []
    assert ckpt.latest_valid(out / "checkpoints", warn=warned.append).step == 3
    assert len(warned) == 1 and "skipping checkpoint step-00000006" in warned[0] and expected in warned[0]


def test_resume_auto_continues_from_the_last_checkpoint_whose_manifest_holds(toy_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(toy_run, out)
    newest = out / "checkpoints" / "step-00000006"
    files_emptied(newest)
    train(resolve(["task=toy", f"out={out}", "steps=6", "checkpoint.every=3", "checkpoint.keep=5", "resume=auto"]))
    assert ckpt.verify(newest) == []  # step 6 again, from step 3
    assert len(list((out / "checkpoints").glob("step-00000006.invalid-*"))) == 1  # the tampered one: evidence


# -- a checkpoint folder is a real folder of its run, holding the step its name gives (audit finding 3) ------------
def linked_to_another_run(folder: Path, theirs: Path) -> str:
    """The audit's case: checkpoints/step-00000009 -> another run's step-00000003 (which verifies on its own)."""
    folder.symlink_to(theirs / "checkpoints" / "step-00000003", target_is_directory=True)
    return "step 3, while the folder is named for step 9"


def copied_from_another_step(folder: Path, theirs: Path) -> str:
    shutil.copytree(theirs / "checkpoints" / "step-00000003", folder)
    return "step 3, while the folder is named for step 9"


def copied_with_the_manifest_step_edited(folder: Path, theirs: Path) -> str:
    copied_from_another_step(folder, theirs)
    edit_manifest(folder, lambda m: m.update(step=9))  # the manifest's own step is not covered by a hash
    return "the training state is at step 3, while the folder is named for step 9"


@pytest.mark.parametrize("plant", [linked_to_another_run, copied_from_another_step,
                                   copied_with_the_manifest_step_edited])
def test_a_checkpoint_of_another_step_or_run_fails_verify_and_resume_auto_skips_it(toy_run, tmp_path, plant):
    out, theirs = tmp_path / "run", tmp_path / "theirs"
    shutil.copytree(toy_run, out)
    shutil.copytree(toy_run, theirs)
    before = tree_digest(theirs)
    planted = out / "checkpoints" / "step-00000009"
    expected = plant(planted, theirs)
    problems = ckpt.verify(planted)
    assert len(problems) == 1 and expected in problems[0], problems
    verdict = runner.invoke(app, ["verify", str(out)])  # the old code said "ok" for each
    lines = verdict.output.strip().splitlines()
    assert verdict.exit_code == 1 and len(lines) == 3, verdict.output
    assert lines[-1].startswith(f"{planted}: INVALID: ") and expected in lines[-1], verdict.output
    assert lines[0].endswith("step-00000003: ok") and lines[1].endswith("step-00000006: ok"), verdict.output
    # resume=auto skips it with its warning (the old code said "resumed from .../step-00000009 at step 3")
    resumed = runner.invoke(app, ["run", "task=toy", f"out={out}", "steps=6", "checkpoint.every=3",
                                  "checkpoint.keep=5", "resume=auto", "progress=false"])
    assert resumed.exit_code == 0, resumed.output
    assert "skipping checkpoint step-00000009" in resumed.output and expected in resumed.output, resumed.output
    assert f"resumed from {out / 'checkpoints' / 'step-00000006'} at step 6" in resumed.output, resumed.output
    assert tree_digest(theirs) == before


def test_checkpoints_moved_to_another_disk_and_linked_back_verify_and_resume(toy_run, tmp_path):
    """A checkpoint folder that is a link to its own files elsewhere is a user's choice, not an attack: it verifies,
    and resume=auto continues from it (refusing links made such a finished run start again from step 0)."""
    out, elsewhere = tmp_path / "run", tmp_path / "other-disk"
    shutil.copytree(toy_run, out)
    elsewhere.mkdir()
    for folder in sorted((out / "checkpoints").glob("step-*")):
        shutil.move(str(folder), elsewhere / folder.name)
        folder.symlink_to(elsewhere / folder.name, target_is_directory=True)
    verdict = runner.invoke(app, ["verify", str(out)])
    assert verdict.exit_code == 0 and verdict.output.count(": ok") == 2, verdict.output
    resumed = runner.invoke(app, ["run", "task=toy", f"out={out}", "steps=6", "checkpoint.every=3",
                                  "checkpoint.keep=5", "resume=auto", "progress=false"])
    assert resumed.exit_code == 0, resumed.output
    assert f"resumed from {out / 'checkpoints' / 'step-00000006'} at step 6" in resumed.output, resumed.output


def test_resume_auto_where_every_checkpoint_is_invalid_changes_nothing(toy_run, tmp_path):
    """Every checkpoint skipped: starting over from step 0 would truncate the run's metrics and rewrite its report,
    so resume=auto refuses in one line, naming what to do, and the folder is left as it was."""
    out = tmp_path / "run"
    shutil.copytree(toy_run, out)
    for folder in (out / "checkpoints").glob("step-*"):
        (folder / "model.safetensors").write_bytes(b"truncated")
    before = tree_digest(out)
    resumed = runner.invoke(app, ["run", "task=toy", f"out={out}", "steps=6", "checkpoint.every=3",
                                  "checkpoint.keep=5", "resume=auto", "progress=false"])
    assert resumed.exit_code == 1, resumed.output
    last = resumed.output.strip().splitlines()[-1]
    assert "none of the 2 checkpoint(s)" in last and "nothing was changed" in last, resumed.output
    assert "skipping checkpoint step-00000006" in resumed.output and "Traceback" not in resumed.output
    assert tree_digest(out) == before


def test_retention_neither_counts_nor_deletes_through_a_linked_checkpoint(toy_run, tmp_path):
    out, theirs = tmp_path / "run", tmp_path / "theirs"
    shutil.copytree(toy_run, out)
    shutil.copytree(toy_run, theirs)
    before = tree_digest(theirs)
    link = out / "checkpoints" / "step-00000009"
    linked_to_another_run(link, theirs)
    assert ckpt.apply_retention(out / "checkpoints", keep=1) == [out / "checkpoints" / "step-00000003"]
    assert link.is_symlink() and (out / "checkpoints" / "step-00000006").is_dir()
    assert tree_digest(theirs) == before  # the old code unlinked their manifest through the link


def sharded(root: Path, ranks: int) -> Path:
    """A checkpoint with the files a distributed=fsdp run commits (contents are not read by verify)."""
    files = {name: (lambda p, n=name: p.write_text(n)) for name in
             [".metadata", "state.json", "state.safetensors", *(f"__{r}_0.distcp" for r in range(ranks))]}
    return ckpt.commit_checkpoint(root, 8, files, {"averagers": [], "task": "toy", "sharded": ranks})


@pytest.mark.parametrize("hide", ["entry", "entry and file", "process count"])
def test_a_sharded_checkpoint_must_list_every_rank_file(tmp_path, hide):
    folder = sharded(tmp_path, 2)
    assert ckpt.verify(folder) == []
    if hide == "process count":  # and the last rank's file with it: what is left would look whole
        edit_manifest(folder, lambda m: (m.pop("sharded"), m["files"].pop("__1_0.distcp")))
        (folder / "__1_0.distcp").unlink()
        expected = "'sharded' is None"
    else:
        edit_manifest(folder, lambda m: m["files"].pop("__1_0.distcp"))
        if hide == "entry and file":
            (folder / "__1_0.distcp").unlink()
        expected = "does not list __1_0.distcp"
    problems = ckpt.verify(folder)
    assert len(problems) == 1 and expected in problems[0], problems


def test_checkpoints_of_other_writers_keep_their_own_files(tmp_path):
    """commit_checkpoint is generic: files of other names verify as listed, but a manifest must list something."""
    folder = ckpt.commit_checkpoint(tmp_path, 1, {"weights.bin": lambda p: p.write_bytes(b"w")})
    (folder / "notes.txt").write_text("a user's note beside the files")
    assert ckpt.verify(folder) == []
    edit_manifest(folder, lambda m: m.update(files={}))
    assert ckpt.verify(folder) == [f"{folder / 'manifest.json'}: lists no files; a checkpoint holds at least one"]


# -- 6. leftovers of killed processes: ours and dead are removed, live ones and strangers' kept ----------------
@pytest.fixture
def pids():
    """A pid no process has any more (a child that ran and was reaped) and a live one (a sleeping child)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield dead.pid, live.pid
    finally:
        live.kill()
        live.wait()


def leftover(folder: Path, target: str, pid: int, is_dir: bool = False) -> Path:
    path = folder / f".{target}.tmp-{pid}_{files.HOST}_0123abcd"
    assert files.owner_of(path.name) == (target, "tmp", pid, files.HOST)
    if is_dir:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"half of a file")
    else:
        path.write_bytes(b"half of a file")
    return path


def strangers(folder: Path, target: str, dead: int, is_dir: bool = False) -> list[Path]:
    """Names like those of a dead process's leftovers that are not: no owner, another host's (where that pid may
    live), another kind (an ``old`` folder may be the only copy), not hidden, a longer name (a user's own)."""
    ours = f"{dead}_{files.HOST}_0123abcd"
    made = [folder / f".{target}.tmp-0123abcd", folder / f".{target}.tmp-{dead}_elsewhere_0123abcd",
            folder / f".{target}.old-{ours}", folder / f"{target}.tmp-{ours}", folder / f".{target}.tmp-{ours}.bak"]
    for path in made:
        path.mkdir() if is_dir else path.write_bytes(b"not ours to remove")
    return made


def test_a_trajectory_save_removes_what_dead_saves_left_and_nothing_else(tmp_path, pids):
    dead, live = pids
    folder = tmp_path / "trajectory"
    folder.mkdir()
    target = "step-00000004.safetensors"
    gone, kept = leftover(folder, target, dead), [leftover(folder, target, live), *strangers(folder, target, dead)]
    ckpt.save_tensors_atomic(folder / "step-00000008.safetensors", {"w": torch.ones(3)})
    assert not gone.exists() and all(p.exists() for p in kept)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [p.name for p in kept] + ["step-00000008.safetensors", "SHA256SUMS"])


def test_a_save_killed_mid_write_leaves_a_file_the_next_save_removes(tmp_path):
    folder = tmp_path / "trajectory"
    folder.mkdir()
    code = ("import os, signal, sys, torch\n"
            "from pathlib import Path\n"
            "from lawa_suite import checkpoints as ckpt\n"
            "ckpt.sha256_file = lambda path: os.kill(os.getpid(), signal.SIGKILL)  # written, not renamed\n"
            "ckpt.save_tensors_atomic(Path(sys.argv[1]) / 'step-00000004.safetensors', {'w': torch.ones(1000)})\n")
    killed = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=ROOT, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    left = [p.name for p in folder.iterdir()]
    assert len(left) == 1 and left[0].startswith(".step-00000004.safetensors.tmp-"), left
    ckpt.save_tensors_atomic(folder / "step-00000008.safetensors", {"w": torch.ones(3)})
    assert sorted(p.name for p in folder.iterdir()) == ["SHA256SUMS", "step-00000008.safetensors"]


def test_clean_leftovers_removes_dead_staging_and_keeps_live_and_strangers(tmp_path, pids):
    dead, live = pids
    root = tmp_path / "checkpoints"
    root.mkdir()
    gone = leftover(root, "step-00000020", dead, is_dir=True)
    no_owner, *others = strangers(root, "step-00000040", dead, is_dir=True)
    kept = [leftover(root, "step-00000030", live, is_dir=True), *others]
    # a staging name without an owner (a sharded save's scratch, an older version's): removed, as before
    assert sorted(ckpt.clean_leftovers(root)) == sorted([gone, no_owner])
    assert all(p.exists() for p in kept)


def test_a_process_of_another_pid_namespace_with_this_host_name_never_removes_a_live_staging_folder(tmp_path):
    """A pid means something only in its own namespace: a writer in a container sharing this host's name (``unshare
    -p``; Docker with the host's UTS namespace) found this process's live staging folder 'dead' and removed it."""
    import shutil as shell

    if shell.which("unshare") is None:
        pytest.skip("needs unshare(1) to start a process in a PID namespace of its own")
    live = files.staged_folder(tmp_path / "out")  # this process's, still being written
    (live / "model.safetensors").write_bytes(b"half of an output")
    code = ("import sys\nfrom pathlib import Path\nfrom lawa_suite import files\n"
            "files.write_text_atomic(Path(sys.argv[1]) / 'report.md', 'a report beside it')\n")
    done = subprocess.run(["unshare", "-p", "-f", "--mount-proc", sys.executable, "-c", code, str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    if done.returncode != 0 and "Operation not permitted" in done.stderr:
        pytest.skip(f"unshare -p is not permitted here: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "report.md").read_text() == "a report beside it"
    assert (live / "model.safetensors").read_bytes() == b"half of an output"  # the old code removed the folder


def test_a_leftover_that_cannot_be_removed_does_not_fail_the_write(tmp_path, pids, monkeypatch):
    """Another user's dead leftover in a shared sticky folder cannot be removed: the write goes on, and it is not
    reported as removed (the old code raised PermissionError from every atomic write into that folder)."""
    dead, _ = pids
    stuck = leftover(tmp_path, "report.md", dead)
    real = Path.unlink

    def refuse(path, missing_ok=False):
        if path == stuck:
            raise PermissionError(1, "Operation not permitted", str(path))
        real(path, missing_ok=missing_ok)
    monkeypatch.setattr(Path, "unlink", refuse)
    assert files.remove_dead_leftovers(tmp_path) == []
    files.write_text_atomic(tmp_path / "report.md", "written")
    assert (tmp_path / "report.md").read_text() == "written" and stuck.exists()


def test_a_staging_folder_names_its_process(tmp_path):
    seen = []
    real = ckpt.fsync_dir

    def spy(path):
        seen.append(Path(path).name)
        real(path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ckpt, "fsync_dir", spy)
        ckpt.commit_checkpoint(tmp_path, 7, {"a.bin": lambda p: p.write_bytes(b"a")})
    assert files.owner_of(seen[0]) == ("step-00000007", "tmp", os.getpid(), files.HOST)


def small_trajectory(folder: Path, steps, bad=()) -> None:
    folder.mkdir(parents=True)
    for step in steps:
        w = {"w": torch.full((4, 3), float(step)), "b": torch.arange(3.0) + step}
        if step in bad:
            w["w"][1, 2] = float("inf")
        save_file(w, str(folder / f"step-{step:08d}.safetensors"), metadata={"step": str(step)})


def test_a_killed_suite_average_leaves_staging_the_next_one_removes(tmp_path, pids):
    dead, live = pids
    small_trajectory(tmp_path / "traj", [1, 2, 3, 4])
    code = ("import os, signal, sys\n"
            "from lawa_suite.posthoc import average, parse_jobs, run\n"
            "def die(*args, **kwargs):\n"
            "    os.kill(os.getpid(), signal.SIGKILL)  # the outputs are written, the manifests not yet\n"
            "run._write_manifests = die\n"
            "average(sys.argv[1], parse_jobs(['ema'], {}), sys.argv[2])\n")
    killed = subprocess.run([sys.executable, "-c", code, str(tmp_path / "traj"), str(tmp_path / "out")], cwd=ROOT,
                            timeout=120)
    assert killed.returncode == -signal.SIGKILL
    (staged,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert files.owner_of(staged.name)[:2] == ("out", "tmp")
    assert any(staged.rglob("*.safetensors")), "the kill came after the outputs were written"
    alive = leftover(tmp_path, "out", live, is_dir=True)
    others = strangers(tmp_path, "out", dead, is_dir=True)
    also_dead = leftover(tmp_path, "out2", dead, is_dir=True)  # another output's: ours and dead, the same parent
    result = runner.invoke(app, ["average", str(tmp_path / "traj"), "averager=ema", f"out={tmp_path / 'out'}"])
    assert result.exit_code == 0, result.output
    assert not staged.exists() and not also_dead.exists() and alive.exists() and all(p.exists() for p in others)
    assert f"removed {staged}" in result.output and "no longer running" in result.output
    assert (tmp_path / "out" / "manifest.json").is_file()


TOY = ("task=toy", "steps=4", "eval.every=2", "trajectory.every=2", "progress=false")


def toy_cli_run(out: Path, *words: str):
    result = runner.invoke(app, ["run", *TOY, f"out={out}", *words])
    assert result.exit_code == 0, result.output
    return result


def plant_leftovers(folder: Path, target: str, dead: int, live: int, is_dir: bool = False) -> tuple[list, list]:
    """A dead process's leftover for ``target`` and another target's (both ours, both to go), and what must stay: a
    live process's and the strangers'."""
    gone = [leftover(folder, target, dead, is_dir), leftover(folder, f"{target}2", dead, is_dir)]
    return gone, [leftover(folder, f"{target}3", live, is_dir), *strangers(folder, target, dead, is_dir)]


def test_export_removes_what_killed_exports_left_beside_out_and_nothing_else(tmp_path, pids, monkeypatch):
    monkeypatch.setattr(ToyTask, "export", lambda self, weights, out: (out / "w.json").write_text("{}"),
                        raising=False)
    run = tmp_path / "run"
    toy_cli_run(run)
    gone, kept = plant_leftovers(tmp_path, "hf", *pids, is_dir=True)
    result = runner.invoke(app, ["export", str(run), f"out={tmp_path / 'hf'}"])
    assert result.exit_code == 0, result.output
    assert not any(p.exists() for p in gone) and all(p.exists() for p in kept), result.output
    assert f"removed {gone[0]}" in result.output and "no longer running" in result.output


def test_eval_removes_what_killed_evals_left_beside_out_and_nothing_else(tmp_path, pids):
    run = tmp_path / "run"
    toy_cli_run(run)
    gone, kept = plant_leftovers(tmp_path, "scores", *pids, is_dir=True)
    result = runner.invoke(app, ["eval", str(run / "trajectory"), f"out={tmp_path / 'scores'}"])
    assert result.exit_code == 0, result.output
    assert not any(p.exists() for p in gone) and all(p.exists() for p in kept), result.output
    assert f"removed {gone[0]}" in result.output


@pytest.mark.parametrize("how", ["report", "resume"])
def test_a_report_or_a_resume_removes_what_killed_writes_left_in_the_run_and_nothing_else(tmp_path, pids, how):
    dead, live = pids
    run = tmp_path / "run"
    toy_cli_run(run)
    gone = [leftover(run, name, dead) for name in ("metrics.jsonl", "report.md", "curves.png")]
    kept = [leftover(run, "report.md", live), *strangers(run, "metrics.jsonl", dead)]
    if how == "report":
        result = runner.invoke(app, ["report", str(run)])
    else:
        result = runner.invoke(app, ["run", *TOY, f"out={run}", "resume=auto"])
    assert result.exit_code == 0, result.output
    assert not any(p.exists() for p in gone) and all(p.exists() for p in kept)


# -- 7. a diverged trajectory: its healthy steps are averaged, each one left out is named ---------------------------
def trajectory(folder: Path, steps, bad=()) -> dict[int, dict[str, torch.Tensor]]:
    """Weights per step (fp32, bf16, an integer counter); ``bad`` steps hold Inf in ``w`` (NaN in ``h`` too when
    the step is odd), as a diverging run writes them."""
    folder.mkdir(parents=True)
    saved = {}
    for step in steps:
        g = torch.Generator().manual_seed(step)
        w = {"w": torch.randn(4, 6, generator=g), "b": torch.randn(6, generator=g),
             "h": torch.randn(5, generator=g).to(torch.bfloat16), "count": torch.tensor(step)}
        if step in bad:
            w["w"][1, 2] = float("inf")
            if step % 2:
                w["h"][3] = float("nan")
        save_file(w, str(folder / f"step-{step:08d}.safetensors"), metadata={"step": str(step)})
        saved[step] = w
    return saved


def online(name: str, saved, until: int, clock: str, **config):
    """The online averager fed every saved step up to ``until`` (NaN/Inf ones too: it refuses those itself)."""
    averager = registry.averagers.create(name, **config)
    averager.start_run(len([s for s in saved if s <= until]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)
        for i, step in enumerate(sorted(s for s in saved if s <= until), start=1):
            averager.observe(step if clock == "steps" else i, saved[step])
    return averager


def test_a_diverged_run_averages_its_healthy_steps_and_names_each_step_left_out(tmp_path):
    folder, out = tmp_path / "trajectory", tmp_path / "out"
    saved = trajectory(folder, range(2, 17, 2), bad={12, 14, 16})
    result = runner.invoke(app, ["average", str(folder), "averager=lawa,ema", "lawa.k=3", "lawa.nu=2",
                                 "ema.decay=0.5", f"out={out}"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for step in (12, 14, 16):
        named = [line for line in lines if f"step-{step:08d}.safetensors" in line]
        assert named == [f"left out step-{step:08d}.safetensors: NaN or Inf in w"], lines
    assert "averaging up to step 10, the last input free of NaN and Inf" in lines
    assert "lawa-k3-nu2: 1 derived checkpoint(s) at step(s) 10" in lines
    assert "ema-decay0.5: 1 derived checkpoint(s) at step(s) 10" in lines
    lawa = load_file(str(out / "lawa-k3-nu2" / "step-00000010.safetensors"))
    assert same_bits(lawa, online("lawa", saved, 10, "steps", k=3, nu=2).average())
    ema = load_file(str(out / "ema-decay0.5" / "step-00000010.safetensors"))
    assert same_bits(ema, online("ema", saved, 10, "observations", decay=0.5).average())
    expected = [{"step": s, "input": f"step-{s:08d}.safetensors", "why": "NaN or Inf in w"} for s in (12, 14, 16)]
    for folder in (out, out / "lawa-k3-nu2", out / "ema-decay0.5"):
        assert json.loads((folder / "manifest.json").read_text())["left_out"] == expected


def test_a_window_holding_a_step_left_out_is_not_written_and_an_average_of_all_goes_on_without_it(tmp_path):
    folder, out = tmp_path / "trajectory", tmp_path / "out"
    saved = trajectory(folder, range(1, 9), bad={4})
    result = runner.invoke(app, ["average", str(folder), "averager=lawa,ema", "lawa.k=2", "lawa.nu=1",
                                 "ema.decay=0.5", "interval=1", f"out={out}"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line for line in lines if line.startswith(("left out", "not written"))] == [
        "left out step-00000004.safetensors: NaN or Inf in w",
        "not written: ema-decay0.5 at step 4: the input at this step is left out",
        "not written: lawa-k2-nu1 at step 4: the input at this step is left out",
        "not written: lawa-k2-nu1 at step 5: its window holds left-out step(s) 4"], lines
    assert "lawa-k2-nu1: 5 derived checkpoint(s) at step(s) 2, 3, 6, 7, 8" in lines
    assert "ema-decay0.5: 7 derived checkpoint(s) at step(s) 1, 2, 3, 5, 6, 7, 8" in lines
    for step in (6, 8):  # the window has moved past step 4: as if it had never been bad
        lawa = load_file(str(out / "lawa-k2-nu1" / f"step-{step:08d}.safetensors"))
        assert same_bits(lawa, online("lawa", saved, step, "steps", k=2, nu=1).average())
    for step in (3, 5, 8):  # the online EMA refuses step 4 and goes on
        ema = load_file(str(out / "ema-decay0.5" / f"step-{step:08d}.safetensors"))
        assert same_bits(ema, online("ema", saved, step, "observations", decay=0.5).average()), step
    manifest = json.loads((out / "lawa-k2-nu1" / "manifest.json").read_text())
    assert manifest["not_written"] == [{"step": 4, "why": "the input at this step is left out"},
                                       {"step": 5, "why": "its window holds left-out step(s) 4"}]
    assert [o["inputs"] for o in manifest["outputs"]] == [[1, 2], [2, 3], [5, 6], [6, 7], [7, 8]]
    assert "4" not in json.loads((out / "ema-decay0.5" / "manifest.json").read_text())["inputs"]


def test_a_run_with_nothing_healthy_to_average_says_so_and_writes_nothing(tmp_path):
    folder, out = tmp_path / "trajectory", tmp_path / "out"
    trajectory(folder, [1, 2, 3], bad={1, 2, 3})
    result = runner.invoke(app, ["average", str(folder), "averager=ema", f"out={out}"])
    assert result.exit_code == 2 and "every input holds NaN or Inf" in result.output, result.output
    assert "step-00000001.safetensors, step-00000003.safetensors: NaN or Inf in h, w" in result.output
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    trajectory(tmp_path / "early", [1, 2, 3, 4, 5], bad={2})  # LAWA's only window would hold the step left out
    result = runner.invoke(app, ["average", str(tmp_path / "early"), "averager=lawa", "lawa.k=4", "lawa.nu=1",
                                 f"out={out}"])
    assert result.exit_code == 2, result.output
    assert ("lawa-k4-nu1: no derived checkpoint: every one it would write stands for a step left out (step 5: its "
            "window holds left-out step(s) 2)") in result.output and "step-00000002.safetensors: NaN" in result.output
    trajectory(tmp_path / "late", [1, 2, 3, 4], bad={4})  # the healthy steps are too few for one window
    result = runner.invoke(app, ["average", str(tmp_path / "late"), "averager=lawa", "lawa.k=4", "lawa.nu=1",
                                 f"out={out}"])
    assert result.exit_code == 2 and "lawa-k4-nu1: no window fits" in result.output, result.output
    assert "input holds steps 1..3" in result.output and "step-00000004.safetensors: NaN or Inf" in result.output
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_healthy_inputs_are_read_in_one_pass(tmp_path, monkeypatch):
    """The fast path stays as it was: no full check of the inputs, one pass."""
    from lawa_suite.posthoc import run as posthoc_run

    calls = []
    for name in ("nonfinite_keys", "nonfinite_problem", "average_all"):
        real = getattr(posthoc_run, name, None)
        monkeypatch.setattr(posthoc_run, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name),
                                                                                         _real(*a, **k))[1],
                            raising=False)
    trajectory(tmp_path / "trajectory", range(1, 9))
    result = runner.invoke(app, ["average", str(tmp_path / "trajectory"), "averager=lawa,ema", "lawa.k=2",
                                 "lawa.nu=1", f"out={tmp_path / 'out'}"])
    assert result.exit_code == 0, result.output
    assert calls == ["average_all"] and "left out" not in result.output


def test_a_forced_output_is_never_missing_while_it_is_replaced(tmp_path, monkeypatch):
    """--force swaps the new folder with the old one in one step (renameat2 RENAME_EXCHANGE): a kill at any moment
    leaves out= whole, old or new. The old code renamed out aside, then the new one in: killed between the two, out=
    was gone, its new version hidden in a staging folder the next write removes and the old one in a hidden .old-*."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "scores.json").write_text("old")
    staging = files.staged_folder(out)
    (staging / "scores.json").write_text("new")

    renames, real_rename = [], os.rename

    def killed_at_the_second_rename(src, dst):  # a kill between two renames: nothing after it runs
        renames.append(src)
        if len(renames) == 2:
            raise KeyboardInterrupt("killed")
        real_rename(src, dst)

    def killed_here(*args, **kwargs):
        raise KeyboardInterrupt("killed")
    monkeypatch.setattr(os, "rename", killed_at_the_second_rename)
    monkeypatch.setattr(shutil, "rmtree", killed_here)  # or killed right after the swap
    with pytest.raises(KeyboardInterrupt):
        files.commit_folder(staging, out)
    assert (out / "scores.json").read_text() in ("old", "new")
    monkeypatch.undo()
    assert (out / "scores.json").read_text() == "new"  # the swap took place; the old one waits under the staging name
    assert (staging / "scores.json").read_text() == "old" and files.owner_of(staging.name)[2] == os.getpid()
