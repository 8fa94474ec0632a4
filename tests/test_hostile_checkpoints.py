"""Hostile users against checkpoints and post-hoc averaging: a manifest that hides a damaged file, leftovers of
killed processes, a trajectory that diverges into Inf (issue "Nothing lost, nothing run, nothing silent")."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lawa_suite import checkpoints as ckpt
from lawa_suite.cli import app
from lawa_suite.config import resolve
from lawa_suite.train import train

runner = CliRunner()


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
