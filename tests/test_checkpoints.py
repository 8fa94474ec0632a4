"""Checkpoint files: atomic commit, manifest verification, fallback, retention, leftovers, state round trips."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lawa_suite import checkpoints as ckpt
from lawa_suite.cli import app

runner = CliRunner()

def commit(root, step, payload=b"x" * 100):
    return ckpt.commit_checkpoint(root, step, {"model.bin": lambda p: p.write_bytes(payload),
                                               "extra.json": lambda p: p.write_text(json.dumps({"step": step}))})


def hashes(folder):
    return {p.name: ckpt.sha256_file(p) for p in sorted(folder.iterdir())}


def test_commit_writes_manifest_last_and_verifies(tmp_path):
    path = commit(tmp_path, 10)
    assert path.name == "step-00000010"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 10 and set(manifest["files"]) == {"model.bin", "extra.json"}
    assert ckpt.verify(path) == []
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [10]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


@pytest.mark.parametrize("damage, expected", [
    (lambda p: p.joinpath("model.bin").write_bytes(b"x" * 99), "truncated"),
    (lambda p: p.joinpath("model.bin").write_bytes(b"x" * 50 + b"y" + b"x" * 49), "corrupted"),
    (lambda p: p.joinpath("model.bin").unlink(), "missing"),
    (lambda p: p.joinpath("manifest.json").unlink(), "never committed"),
])
def test_verify_names_the_damaged_file(tmp_path, damage, expected):
    path = commit(tmp_path, 10)
    damage(path)
    problems = ckpt.verify(path)
    assert problems and expected in problems[0] and str(path) in problems[0]
    result = CliRunner().invoke(app, ["verify", str(path)])
    assert result.exit_code == 1 and "INVALID" in result.output


def test_latest_valid_falls_back_and_keeps_the_corrupt_one(tmp_path):
    commit(tmp_path, 10)
    newest = commit(tmp_path, 20)
    (newest / "model.bin").write_bytes(b"z" * 100)  # same size, flipped content
    warnings = []
    found = ckpt.latest_valid(tmp_path, warn=warnings.append)
    assert found.step == 10
    assert "step-00000020" in warnings[0] and "model.bin" in warnings[0]
    assert newest.exists(), "a corrupt checkpoint is evidence: never delete it automatically"


def test_retention_by_step_number_after_commit(tmp_path):
    for step in (9, 10, 100):
        commit(tmp_path, step)
    (tmp_path / "logs").mkdir()
    deleted = ckpt.apply_retention(tmp_path, keep=2)
    assert [p.name for p in deleted] == ["step-00000009"]
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [10, 100]
    assert (tmp_path / "logs").exists()


def test_failed_save_leaves_earlier_checkpoints_and_no_partial(tmp_path):
    first = commit(tmp_path, 10)
    before = hashes(first)

    def explode(path):
        path.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(ckpt.CheckpointError, match=r"could not write .*step-00000020.*/bad.bin: No space left"):
        ckpt.commit_checkpoint(tmp_path, 20, {"ok.bin": lambda p: p.write_bytes(b"1"), "bad.bin": explode})
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [10]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000010"]
    assert hashes(first) == before


def test_leftovers_are_ignored_then_cleaned(tmp_path):
    commit(tmp_path, 10)
    staging = tmp_path / ".step-00000020.tmp-abc123"
    staging.mkdir()
    (staging / "model.bin").write_bytes(b"half")
    unmanifested = tmp_path / "step-00000030"
    unmanifested.mkdir()
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [10]
    assert ckpt.clean_leftovers(tmp_path) == [staging]
    assert unmanifested.exists(), "only staging folders are cleaned; anything else is left for the user"


def test_commit_fsyncs_files_then_renames_then_fsyncs_parent(tmp_path, monkeypatch):
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", str(dst)))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    final = commit(tmp_path, 10)
    names = [(kind, os.path.basename(path)) for kind, path in events]
    rename_at = names.index(("rename", "step-00000010"))
    manifest_at = max(i for i, n in enumerate(names) if n == ("fsync", "manifest.json"))
    files_at = [i for i, n in enumerate(names) if n in (("fsync", "model.bin"), ("fsync", "extra.json"))]
    assert max(files_at) < manifest_at < rename_at, names
    assert names[rename_at + 1:] == [("fsync", tmp_path.name)], "the parent folder is fsynced after the rename"
    assert final.exists()


def test_nested_state_round_trip():
    state = {
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4)}},
                      "param_groups": [{"lr": 0.1, "params": [0], "betas": (0.9, 0.95)}]},
        "rng": {"python": (3, tuple(range(5)), None), "numpy": ("MT19937", np.arange(4, dtype=np.uint32), 2, 0, 0.0),
                "torch": torch.get_rng_state()},
        "list": [torch.ones(2, dtype=torch.bfloat16), {"nested": torch.zeros(1, dtype=torch.int64)}],
    }
    tensors, skeleton = ckpt.flatten_state(state)
    back = ckpt.unflatten_state(json.loads(json.dumps(skeleton)), tensors)
    assert back["optimizer"]["state"][0]["step"] is tensors["/optimizer/state/0/step"]
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert back["rng"]["python"] == (3, (0, 1, 2, 3, 4), None)
    assert back["rng"]["numpy"][1].dtype == np.uint32 and list(back["rng"]["numpy"][1]) == [0, 1, 2, 3]
    assert back["list"][0].dtype == torch.bfloat16 and back["list"][1]["nested"].dtype == torch.int64


def test_tied_weights_are_saved(tmp_path):
    shared = torch.randn(3, 4)
    path = tmp_path / "tied.safetensors"
    ckpt.save_tensors_atomic(path, {"a": shared, "b": shared, "t": shared.t()})
    from safetensors.torch import load_file
    loaded = load_file(str(path))
    assert torch.equal(loaded["a"], loaded["b"]) and torch.equal(loaded["t"], shared.t())


def test_atomic_writes_get_the_mode_a_plain_open_gives(tmp_path):
    """safetensors and mkstemp write 0600: checkpoints and trajectory files were private among readable siblings."""
    import os
    import stat

    old = os.umask(0o027)
    try:
        ckpt.save_tensors_atomic(tmp_path / "w.safetensors", {"w": torch.ones(2)}, {"step": "1"})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "w.safetensors").st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SHA256SUMS", "w.safetensors"]


def test_every_file_of_a_run_has_the_mode_a_plain_open_gives(tmp_path):
    """The audit: a checkpoint's model.safetensors and state.safetensors were 0600 (safetensors' own writes) among
    0644 siblings. Under umask 027 every file a run writes is 0640, every folder 0750."""
    import os
    import stat

    old = os.umask(0o027)
    try:
        result = runner.invoke(app, ["run", "task=toy", "steps=4", "eval.every=2", "trajectory.every=2",
                                     "averager=lawa,ema", "lawa.k=2", "lawa.nu=1", f"out={tmp_path / 'run'}"])
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    found = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.lstat().st_mode) for p in tmp_path.rglob("*")}
    checkpoint = "run/checkpoints/step-00000004"
    assert {f"{checkpoint}/{name}" for name in ("model.safetensors", "state.safetensors", "state.json",
                                                "manifest.json")} <= set(found)
    wrong = {name: oct(mode) for name, mode in found.items()
             if mode != (0o750 if (tmp_path / name).is_dir() else 0o640)}
    assert wrong == {}
