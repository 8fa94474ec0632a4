"""What survives what: real crashes, kills, signals, full disks, NaNs, corruption, hostile inputs, broken plugins
and several processes (the reliability plan's cases, on the toy task, on CPU).

Processes that must really die (SIGKILL, SIGTERM, RLIMIT_FSIZE, torchrun) run ``tests/_reliability_child.py``;
everything that can be checked in this process is. Resumed runs are compared with an uninterrupted run of the
same settings, bit for bit.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lawa_suite import checkpoints as ckpt
from lawa_suite import posthoc
from lawa_suite.training import checkpointing as run_checkpoints
from lawa_suite.cli import app
from lawa_suite.posthoc import PosthocError, average, parse_jobs
from lawa_suite.training.loop import NonFiniteTraining

from conftest import PLUGIN_AVERAGER, ToyTask
from helpers import final_state, run_toy, same_tree, torchrun, tree_digest
import _reliability_child  # noqa: F401  (registers the toyloader task here too)

ROOT = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).resolve().parent / "_reliability_child.py"
PYTHON = sys.executable
runner = CliRunner()

# -- helpers ------------------------------------------------------------------------------------------------


def same_run(a: Path, b: Path, rng: bool = True) -> bool:
    """Final raw weights, optimizer, averagers, data position and counters identical (and RNG states)."""
    (wa, sa), (wb, sb) = final_state(a), final_state(b)
    parts = ("optimizer", "averagers", "stream", "train") + (("rng",) if rng else ())
    return same_tree(wa, wb) and all(same_tree(sa[k], sb[k]) for k in parts)


def child(mode: str, *args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, str(CHILD), mode, *args], cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted toy run most resumed runs are compared with (20 steps, a checkpoint every 5)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    ToyTask.consumed = []
    run_toy(out, "checkpoint.every=5")
    (out / "consumed.json").write_text(json.dumps(ToyTask.consumed))
    return out


# -- 1. crash during save ------------------------------------------------------------------------------------
POINTS = ckpt.FAULT_POINTS
COMMITTED_BEFORE_DEATH = {"after_rename_before_dir_fsync": [5, 10, 15], "during_retention_delete": [5, 10, 15]}


@pytest.fixture(scope="module")
def crashed(tmp_path_factory) -> tuple[Path, dict]:
    """One child per fault point (forked from one process), each killed by SIGKILL inside the step-15 save
    (retention's delete of step 5 for that point); every commit's file hashes are logged as it happens."""
    root = tmp_path_factory.mktemp("crashed")
    code, out, err = finish(child("crash", str(root), *POINTS))
    assert code == 0, err
    return root, json.loads(out.splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("point", POINTS)
def test_sigkill_at_every_save_point_loses_nothing(crashed, point, tmp_path):
    root, statuses = crashed
    assert statuses[point] == {"signal": signal.SIGKILL, "exit": None}, "the fault point never fired"
    out = root / point
    folder = out / "checkpoints"
    expected = COMMITTED_BEFORE_DEATH.get(point, [5, 10])
    assert [c.step for c in ckpt.list_checkpoints(folder)] == expected
    # nothing lost: every checkpoint logged as committed is still byte-identical
    for line in (out / "commits.jsonl").read_text().splitlines():
        record = json.loads(line)
        path = folder / ckpt.step_dir_name(record["step"])
        assert tree_digest(path) == record["files"], f"step {record['step']} changed after its commit"
    staging = [p for p in folder.iterdir() if p.name.startswith(".step-")]
    assert bool(staging) == (point not in COMMITTED_BEFORE_DEATH), "the kill did not land inside the save"
    # a post-hoc reader of the folder never sees the half-written checkpoint
    assert [s.step for s in posthoc.discover(folder).snapshots] == expected
    # the next start removes the leftovers, resumes from the newest committed step and finishes
    result = run_toy(out, "steps=15", "checkpoint.every=5", "checkpoint.keep=2", "eval.every=15", "resume=auto")
    assert result.step == 15
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]
    assert ckpt.list_checkpoints(folder)[-1].step == 15 and not ckpt.verify(folder / "step-00000015")


def test_an_exception_mid_save_names_the_file_and_the_next_save_works(tmp_path):
    first = ckpt.commit_checkpoint(tmp_path, 10, {"a.bin": lambda p: p.write_bytes(b"1" * 64)})
    before = tree_digest(first)

    def explode(path):
        path.write_bytes(b"half")
        raise RuntimeError("Error while serializing: I/O error")  # what safetensors raises, not an OSError

    with pytest.raises(ckpt.CheckpointError, match=r"could not write .*\.step-00000020\.tmp-\w+/b\.bin: Error while"):
        ckpt.commit_checkpoint(tmp_path, 20, {"a.bin": lambda p: p.write_bytes(b"2"), "b.bin": explode})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000010"] and tree_digest(first) == before
    ckpt.commit_checkpoint(tmp_path, 20, {"a.bin": lambda p: p.write_bytes(b"2")})
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [10, 20]


def test_a_full_disk_stops_the_run_naming_the_file_and_retention_waits_for_the_commit(tmp_path, monkeypatch):
    real_save = ckpt.save_file

    def enospc(tensors, path, metadata=None):
        if "step-00000015" in path:
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", enospc)
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "task=toy", f"out={out}", "checkpoint.every=5", "checkpoint.keep=2"])
    assert result.exit_code == 1, result.output
    assert "could not write" in result.output and "step-00000015" in result.output
    assert "model.safetensors: No space left on device (errno 28)" in result.output
    # keep=2 and a failed third save: deleting first would have left one checkpoint
    folder = out / "checkpoints"
    assert [c.step for c in ckpt.list_checkpoints(folder)] == [5, 10]
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000005", "step-00000010"]
    assert all(not ckpt.verify(c.path) for c in ckpt.list_checkpoints(folder))


@pytest.mark.slow
def test_a_file_size_limit_in_a_real_process_names_the_file(tmp_path):
    out = tmp_path / "run"
    # RLIMIT_FSIZE is set just before the step-15 save: smaller than the state file, larger than the manifests
    code, _, err = finish(child("run", "task=toy", f"out={out}", "checkpoint.every=5", "checkpoint.keep=2",
                                env={"REL_FSIZE": "15:3000"}))
    assert code == 1, err
    line = [text for text in err.splitlines() if text.startswith("error:")][-1]
    assert "could not write" in line and ".step-00000015.tmp-" in line and ".safetensors" in line, line
    assert "File too large" in line or "27" in line, line
    folder = out / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000005", "step-00000010"]
    assert all(not ckpt.verify(c.path) for c in ckpt.list_checkpoints(folder))


# -- 2. exact resume ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_kill_9_between_checkpoints_then_resume_equals_the_uninterrupted_run(reference, tmp_path, monkeypatch):
    out, consumed_file = tmp_path / "run", tmp_path / "consumed.jsonl"
    code, _, err = finish(child("run", "task=toy", f"out={out}", "checkpoint.every=5",
                                env={"REL_KILL_AT": "13", "REL_CONSUMED": str(consumed_file)}))
    assert code == -signal.SIGKILL, err
    assert [c.step for c in ckpt.list_checkpoints(out / "checkpoints")] == [5, 10]
    control = tmp_path / "control"
    shutil.copytree(out, control)
    ToyTask.consumed = []
    run_toy(out, "checkpoint.every=5", "resume=auto")
    assert same_run(reference, out)
    # the samples: the killed process's 13 steps (it died as the 14th began), then the replay from step 10
    uninterrupted = json.loads((reference / "consumed.json").read_text())
    killed = [i for line in consumed_file.read_text().splitlines() for i in json.loads(line)]
    assert killed == uninterrupted[:13 * 16]
    assert ToyTask.consumed == uninterrupted[10 * 16:]
    # negative control: the same resume without restoring the RNG state does not reproduce the run
    monkeypatch.setattr(run_checkpoints, "set_rng_state", lambda state: None)
    run_toy(control, "checkpoint.every=5", "resume=auto")
    assert not same_run(reference, control)


def test_resuming_without_averager_state_needs_reset_averagers(tmp_path):
    out = tmp_path / "run"
    run_toy(out, "checkpoint.every=5", "steps=10")
    last = out / "checkpoints" / "step-00000010"
    state = json.loads((last / "state.json").read_text())
    del state["__dict__"]["averagers"]["__dict__"]["ema"]  # a checkpoint written without EMA's state
    (last / "state.json").write_text(json.dumps(state))
    manifest = json.loads((last / "manifest.json").read_text())
    manifest["files"]["state.json"] = {"size": (last / "state.json").stat().st_size,
                                       "sha256": ckpt.sha256_file(last / "state.json")}
    (last / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match=r"holds no state for averager\(s\) ema; pass reset_averagers=true"):
        run_toy(out, "checkpoint.every=5", "steps=10", "resume=auto")
    run_toy(out, "checkpoint.every=5", "steps=10", "resume=auto", "reset_averagers=true")


# -- 3. preemption -----------------------------------------------------------------------------------------------
PREEMPT = ("steps=40", "checkpoint.every=100", "eval.every=10")


def wait_for_step(proc: subprocess.Popen, step: int) -> int:
    """Read the child's "step N" lines until N >= step; return N."""
    for line in proc.stdout:
        if line.startswith("step ") and int(line.split()[1]) >= step:
            return int(line.split()[1])
    raise AssertionError(f"the child ended before step {step}: {proc.wait()} {proc.stderr.read()}")


@pytest.fixture(scope="module")
def preempt_reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("preempt") / "run"
    run_toy(out, *PREEMPT)
    return out


STOPS = {"SIGTERM": (signal.SIGTERM, 143, "stopped by SIGTERM after step {step}; checkpoint saved in "),
         "SIGINT": (signal.SIGINT, 130, "interrupted at step {step}; checkpoint saved in ")}


@pytest.mark.slow
@pytest.mark.parametrize("stop", STOPS)
def test_sigterm_or_ctrl_c_saves_within_one_step_and_resumes_exactly(preempt_reference, tmp_path, stop):
    signum, expected_code, said = STOPS[stop]
    out = tmp_path / "run"
    proc = child("run", "task=toy", f"out={out}", *PREEMPT, env={"REL_PRINT_STEPS": "0.05"})
    seen = wait_for_step(proc, 8)  # the child is inside step seen + 1
    proc.send_signal(signum)
    code, _, err = finish(proc)
    assert code == expected_code, err
    saved = [c.step for c in ckpt.list_checkpoints(out / "checkpoints")]
    assert len(saved) == 1 and seen + 1 <= saved[0] <= seen + 2, (seen, saved)
    line = [text for text in err.splitlines() if text.startswith("error:")][-1]
    assert said.format(step=saved[0]) in line and line.endswith("continue with resume=auto"), line
    run_toy(out, *PREEMPT, "resume=auto")
    assert same_run(preempt_reference, out)


@pytest.mark.slow
@pytest.mark.parametrize("stop", STOPS)
def test_a_stop_signal_to_the_process_group_with_loader_workers_and_again_during_the_save(preempt_reference,
                                                                                         tmp_path, stop):
    # SLURM's SIGTERM or the terminal's Ctrl-C reach every process of the group (the loop and its 2 DataLoader
    # workers), and a second one arrives while the checkpoint is being written.
    signum, expected_code, _ = STOPS[stop]
    out = tmp_path / "run"
    proc = child("run", "task=toyloader", f"out={out}", *PREEMPT, "toyloader.dropout=0",
                 env={"REL_PRINT_STEPS": "0.05", "REL_TERM_DURING_SAVE": str(int(signum))}, start_new_session=True)
    seen = wait_for_step(proc, 8)
    os.killpg(proc.pid, signum)
    code, _, err = finish(proc)
    assert code == expected_code, err
    assert "DataLoader worker" not in err, err
    saved = [c.step for c in ckpt.list_checkpoints(out / "checkpoints")]
    assert len(saved) == 1 and seen + 1 <= saved[0] <= seen + 2 and not ckpt.verify(ckpt.list_checkpoints(
        out / "checkpoints")[0].path), (seen, saved)
    for _ in range(50):  # the workers leave with the loop
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("processes of the preempted run are still alive")
    # The same batches as the toy task: resuming reproduces an uninterrupted toy run. Without dropout: with it
    # this comparison does not hold yet and is not explained (the loader's worker seeding, once the suspect, is
    # pinned by the next test).
    run_toy(out, *PREEMPT, "resume=auto", "toyloader.dropout=0", task="toyloader")
    run_toy(tmp_path / "toy", *PREEMPT, "toy.dropout=0")
    assert same_run(tmp_path / "toy", out, rng=False)


def test_starting_loader_workers_does_not_consume_training_randomness():
    from _reliability_child import _LoaderStream
    stream = _LoaderStream(torch.randn(64, 8), 16, seed=0, rank=0, world=1)
    before = torch.get_rng_state()
    stream.next_batch()
    stream.close()
    assert torch.equal(before, torch.get_rng_state())


# -- 4. non-finite training ------------------------------------------------------------------------------------
def inf_loss(model, loss):
    return loss * float("inf")


def nan_gradient(model, loss):
    w = model[0].weight if isinstance(model, torch.nn.Sequential) else model.module[0].weight
    return loss + 0.0 * (w.sum() - w.sum()).sqrt()  # finite value (0), NaN gradient (0 * inf)


@pytest.mark.parametrize("poison", [inf_loss, nan_gradient], ids=["inf loss", "nan gradient"])
def test_inf_loss_and_nan_gradient_are_skipped_counted_and_logged(tmp_path, monkeypatch, poison):
    real_loss, poisoned = ToyTask.loss, {7}

    def loss(self, model, batch, step):
        value = real_loss(self, model, batch, step)
        if step in poisoned and len(batch) > 2:
            poisoned.discard(step)
            return poison(model, value)
        return value

    monkeypatch.setattr(ToyTask, "loss", loss)
    out = tmp_path / "run"
    result = run_toy(out, "steps=10", "checkpoint.every=5")
    assert result.step == 10 and result.skipped_steps == 1
    records = [json.loads(text) for text in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped_total"]) for r in records if r.get("skipped")] == [(7, 1)]
    weights, state = final_state(out)
    assert state["train"]["skipped"] == 1
    tensors, _ = ckpt.flatten_state({"w": weights, "s": state})
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def test_too_many_bad_steps_exit_3_keep_the_last_good_checkpoint_and_resume(tmp_path):
    ToyTask.nan_at, ToyTask.nan_from = {7}, 12
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "task=toy", f"out={out}", "checkpoint.every=5", "max_bad_steps=3"])
    assert result.exit_code == 3 and "3 steps in a row" in result.output, result.output
    assert [c.step for c in ckpt.list_checkpoints(out / "checkpoints")] == [5, 10]
    ToyTask.nan_from = None
    assert run_toy(out, "checkpoint.every=5", "max_bad_steps=3", "resume=auto").skipped_steps == 1  # restored


def test_a_checkpoint_holding_nan_is_never_committed(tmp_path, monkeypatch):
    from lawa_suite.training.checkpointing import RunCheckpointer

    real_state = RunCheckpointer.state

    def poisoned(self, run):
        state = real_state(self, run)
        if run.state.step == 10:
            next(iter(state["optimizer"]["state"].values()))["exp_avg"].view(-1)[0] = float("nan")
        return state

    monkeypatch.setattr(RunCheckpointer, "state", poisoned)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteTraining, match=r"at step 10 holds NaN or Inf in optimizer/state/0/exp_avg; no"):
        run_toy(out, "checkpoint.every=5")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000005"]


# -- 5. corruption -------------------------------------------------------------------------------------------------
def flip_tensor_byte(folder: Path) -> str:
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # inside the tensor data: the header still parses
    path.write_bytes(bytes(data))
    return "model.safetensors: sha256 differs"


def truncate_state(folder: Path) -> str:
    path = folder / "state.safetensors"
    path.write_bytes(path.read_bytes()[:-1])
    return "state.safetensors: "


def drop_manifest(folder: Path) -> str:
    (folder / "manifest.json").unlink()
    return "manifest.json: missing"


@pytest.mark.parametrize("damage", [flip_tensor_byte, truncate_state, drop_manifest])
def test_a_corrupt_checkpoint_fails_verify_and_resume_falls_back_keeping_it(reference, tmp_path, damage):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    newest = out / "checkpoints" / "step-00000020"
    expected = damage(newest)
    evidence = tree_digest(newest)
    verdict = runner.invoke(app, ["verify", str(newest)])
    assert verdict.exit_code == 1 and expected in verdict.output, verdict.output
    if damage is flip_tensor_byte:
        with pytest.raises(ckpt.CheckpointError, match=expected):
            run_toy(out, "checkpoint.every=5", f"resume={newest}")
    run_toy(out, "checkpoint.every=5", "resume=auto")  # from step 15, then step 20 again
    assert same_run(reference, out)
    kept = [p for p in (out / "checkpoints").iterdir() if p.name.startswith("step-00000020.invalid-")]
    assert len(kept) == 1 and tree_digest(kept[0]) == evidence, "the corrupt checkpoint is kept as evidence"
    assert [c.step for c in ckpt.list_checkpoints(out / "checkpoints")] == [15, 20]


# -- 6. hostile inputs to suite average --------------------------------------------------------------------------
def st_file(header: dict | bytes, data: bytes = b"", declared: int | None = None) -> bytes:
    """A safetensors file built by hand: 8-byte little-endian header length, the header, the data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(raw) if declared is None else declared).to_bytes(8, "little") + raw + data


def t(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


MALFORMED = {
    "header length past the end": st_file({"w": t("F32", [2], 0, 8)}, bytes(8), declared=1 << 20),
    "200 MB header declared in a tiny file": st_file(b"{}", declared=200 << 20),
    "header length 2**63": st_file(b"{}", declared=1 << 63),
    "truncated header": st_file({"w": t("F32", [2], 0, 8)})[:20],
    "header not json": st_file(b"not a json header at all"),
    "header not utf-8": st_file(b'{"\xff\xfe": 1}'),
    "overlapping offsets": st_file(b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                                   b'"b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}', bytes(12)),
    "offsets past the end": st_file({"w": t("F32", [4], 0, 16)}, bytes(8)),
    "bad dtype": st_file({"w": t("X99", [2], 0, 8)}, bytes(8)),
    "shape and byte length disagree": st_file({"w": t("F32", [3], 0, 8)}, bytes(8)),
    "a hole between tensors": st_file({"w": t("F32", [2], 0, 8), "b": t("F32", [2], 12, 20)}, bytes(20)),
    "duplicate names": st_file(b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                               b'"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}', bytes(16)),
    "metadata not strings": st_file({"__metadata__": {"step": 5}, "w": t("F32", [2], 0, 8)}, bytes(8)),
    "huge shape": st_file({"w": t("F32", [1 << 40, 1 << 40], 0, 8)}, bytes(8)),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_safetensors_fail_fast_with_a_named_error(tmp_path, case):
    folder = tmp_path / "traj"
    folder.mkdir()
    for step in (1, 2):
        save_file({"w": torch.full((2,), float(step))}, str(folder / f"step-{step}.safetensors"))
    (folder / "step-3.safetensors").write_bytes(MALFORMED[case])
    before_tree = tree_digest(folder)
    before_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(PosthocError) as info:
        average(folder, parse_jobs(["lawa"], {"lawa.k": "2", "lawa.nu": "1"}), tmp_path / "out")
    elapsed = time.perf_counter() - start
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_rss) / 1024
    message = str(info.value)
    assert "step-3.safetensors: unreadable (Error while deserializing header: " in message, message
    assert "\n" not in message
    assert elapsed < 1.0 and grown_mb < 50, (elapsed, grown_mb)
    assert not (tmp_path / "out").exists() and tree_digest(folder) == before_tree


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_suite_average_never_runs_a_pickle(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    folder = tmp_path / "traj"
    (folder / "step-3").mkdir(parents=True)
    save_file({"w": torch.ones(2)}, str(folder / "step-1.safetensors"))
    for path in (folder / "step-2.pt", folder / "step-3" / "pytorch_model.bin", folder / "step-4.bin"):
        path.write_bytes(pickle.dumps({"w": Evil()}))
    before = tree_digest(folder)
    refused = runner.invoke(app, ["average", str(folder), "averager=ema", f"out={tmp_path / 'a'}"])
    # one problem a line, in step order; one cause shared by several files names them all
    assert refused.exit_code == 2 and "\n  step-2.pt, step-4.bin: a pickle-based file" in refused.output
    assert "\n  step-3/: " in refused.output
    flagged = runner.invoke(app, ["average", str(folder), "averager=ema", f"out={tmp_path / 'b'}",
                                  "--allow-torch-load"])
    assert flagged.exit_code == 2, flagged.output
    # a bare pickle (no torch.save zip): the unpickler's cause is kept
    assert "step-2.pt, step-3/pytorch_model.bin, step-4.bin: unreadable (not a torch.save file, or a damaged one " \
           "(torch.load(weights_only=True): Unsupported operand" in flagged.output, flagged.output
    assert not marker.exists(), "unpickling ran code"
    assert tree_digest(folder) == before and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_links_and_paths_out_of_the_input_are_refused(tmp_path):
    folder, outside = tmp_path / "traj", tmp_path / "outside"
    folder.mkdir()
    (outside / "step-3").mkdir(parents=True)
    for step in (1, 2):
        save_file({"w": torch.full((2,), float(step))}, str(folder / f"step-{step}.safetensors"))
    save_file({"w": torch.ones(2)}, str(outside / "step-3" / "model.safetensors"))
    save_file({"w": torch.ones(2)}, str(outside / "secret.safetensors"))
    (folder / "step-3").symlink_to(outside / "step-3", target_is_directory=True)  # a linked folder
    (folder / "step-4").mkdir()
    (folder / "step-4" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"w": "../../outside/secret.safetensors"}}))
    (folder / "step-5").mkdir()
    (folder / "step-5" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"w": str(outside / "secret.safetensors")}}))
    before = tree_digest(folder)
    result = runner.invoke(app, ["average", str(folder), "averager=ema", f"out={tmp_path / 'out'}"])
    assert result.exit_code == 2
    assert "step-3: a link that leads outside the input folder" in result.output
    assert "'../../outside/secret.safetensors' lies outside" in result.output
    assert f"'{outside / 'secret.safetensors'}' lies outside" in result.output
    assert tree_digest(folder) == before and not (tmp_path / "out").exists()


# -- 7. plugins --------------------------------------------------------------------------------------------------
GOOD_PLUGIN = PLUGIN_AVERAGER
BROKEN_PLUGINS = {
    "import_error": "import not_a_module_anywhere\n",
    "syntax_error": "def broken(:\n",
    "exits": "import sys\nsys.exit(3)\n",
    "shapeless": "class Thing:\n    pass\n",
    "duck": "class Thing:\n    observe = average = state_dict = load_state_dict = lambda *a: None\n",
    "slow": "import pathlib, time\npathlib.Path(__file__).with_name('slow-was-imported').touch()\ntime.sleep(1)\n"
            + GOOD_PLUGIN,
}


@pytest.mark.slow
def test_broken_plugins_never_break_the_installed_cli(tmp_path):
    for name, body in {**BROKEN_PLUGINS, "good": GOOD_PLUGIN}.items():
        info = tmp_path / f"plug_{name}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: plug-{name}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[lawa_suite.averagers]\n{name} = relplug_{name}:Thing\n")
        (tmp_path / f"relplug_{name}.py").write_text(textwrap.dedent(body))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    suite = [str(Path(PYTHON).with_name("suite"))]

    def invoke(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(suite + list(args), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    assert invoke("--help").returncode == 0
    assert not (tmp_path / "slow-was-imported").exists(), "--help imported a plugin"
    listing = invoke("list")
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line for line in listing.stdout.splitlines() if line.startswith("  ")}
    for name, expected in (("import_error", "ModuleNotFoundError"), ("syntax_error", "SyntaxError"),
                           ("exits", "SystemExit"), ("shapeless", "lacks the averager interface"),
                           ("duck", "lacks the averager interface")):
        assert "BROKEN" in rows[name] and expected in rows[name] and f"plug-{name} 0.1" in rows[name], rows[name]
    assert "BROKEN" not in rows["good"] and "BROKEN" not in rows["slow"] and "BROKEN" not in rows["lawa"]
    selected = invoke("run", "averager=syntax_error,good", "--dry-run")
    assert selected.returncode == 2 and "plug-syntax_error 0.1" in selected.stderr, selected.stderr
    assert invoke("run", "averager=good,lawa", "--dry-run").returncode == 0


# -- 8. several processes ----------------------------------------------------------------------------------------
def torchrun_toy(out: Path, log: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    done = torchrun(CHILD, "run", "task=toy", f"out={out}", "steps=12", "checkpoint.every=4", "eval.every=4", *args,
                    env={"REL_COMMITS": str(log), **(env or {})})
    return done.returncode, done.stdout + done.stderr


def assert_group_ended(log: Path) -> None:
    """Each process ended the process group its run started (a stop all agreed on, or the end), before
    interpreter exit: left to finalization, gloo's threads abort a process now and then (SIGABRT, "terminate
    called without an active exception"), which made the FSDP resume test flaky."""
    for rank in (0, 1):
        marker = Path(f"{log}.rank{rank}.group_at_exit")
        assert marker.read_text() == "False", f"rank {rank} exited with its process group still open"
        marker.unlink()


@pytest.mark.slow
def test_two_processes_agree_on_averagers_save_once_stop_together_and_resume(tmp_path):
    out, log = tmp_path / "run", tmp_path / "commits"
    # rank 1 alone gets SIGTERM during step 6: both processes must stop after the same step and save once. They
    # vote at the end of each step and read the vote with the next step's one host read: they stop after step 7
    code, output = torchrun_toy(out, log, env={"REL_TERM_AT": "5:1"})
    assert code != 0 and output.count("stopped by SIGTERM after step 7") >= 1, output
    assert_group_ended(log)
    code, output = torchrun_toy(out, log, "resume=auto", env={"REL_READS": str(log)})
    assert code == 0, output
    assert_group_ended(log)
    for rank in (0, 1):  # steps 8-11 (evaluated and checkpointed at 8): the stop vote rides in the step's one read
        per_step = json.loads(Path(f"{log}.rank{rank}.json").read_text())
        assert per_step[1:4] == [1, 1, 1], (rank, per_step)
    commits = log.read_text().split()
    assert commits == ["0", "4", "0", "7", "0", "8", "0", "12"], "checkpoints are written by rank 0, once each"
    for step in (4, 7, 8, 12):
        ranks = [load_file(f"{log}.rank{r}.step{step}.safetensors") for r in (0, 1)]
        assert same_tree(*ranks), f"the averagers of the two processes differ at step {step}"
    assert [c.step for c in ckpt.list_checkpoints(out / "checkpoints")] == [8, 12]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert all(not ckpt.verify(c.path) for c in ckpt.list_checkpoints(out / "checkpoints"))
    records = [json.loads(text) for text in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["split"] == "train"]
    assert steps == list(range(1, 13)), "a resumed run logs each step once"
