"""sha256 records: every file the suite writes has its sha256 recorded as it is written (SHA256SUMS beside
trajectory files, stored averages and post-hoc outputs; manifest.json in checkpoints), `suite average` takes a
record while the file still has its size and mtime and reads no input for its hash, and `--hash-inputs` reads
every input and checks it against its record. NaN/Inf in any input is refused with nothing written, found where
the averaging reads it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lawa_suite import checkpoints as ckpt
from lawa_suite import posthoc
from lawa_suite.cli import app
from lawa_suite.config import resolve
from lawa_suite.files import SUMS, read_sha256s, record_sha256s
from lawa_suite.posthoc import PosthocError, average, parse_jobs
from lawa_suite.posthoc.checks import slice_finite
from lawa_suite.training.loop import train

runner = CliRunner()
LAWA = {"lawa.k": "2", "lawa.nu": "5"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weights(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(64, 8, generator=g), "h": torch.randn(9, generator=g).to(torch.bfloat16),
            "count": torch.tensor(step)}


def recorded_trajectory(folder: Path, steps: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """A trajectory written the way the training loop writes one (``save_tensors_atomic``: with records)."""
    folder.mkdir(parents=True, exist_ok=True)
    saved = {s: weights(s) for s in steps}
    for s, w in saved.items():
        ckpt.save_tensors_atomic(folder / f"step-{s:08d}.safetensors", w, {"step": str(s)})
    return saved


def input_entries(out: Path, job: str) -> dict[int, dict]:
    manifest = json.loads((out / job / "manifest.json").read_text())
    return {int(step): files[0] for step, files in manifest["inputs"].items()}


def assert_describes(record_folder: Path, names: list[str]) -> None:
    """The folder's SHA256SUMS holds exactly ``names``, each with its true sha256, size and mtime."""
    records = read_sha256s(record_folder)
    assert sorted(records) == sorted(names)
    for name in names:
        stat = (record_folder / name).stat()
        r = records[name]
        assert (r.sha256, r.size, r.mtime_ns) == (sha256(record_folder / name), stat.st_size, stat.st_mtime_ns)
        assert r.describes(stat)


# -- the record ---------------------------------------------------------------------------------------------------
def test_save_tensors_atomic_records_each_file_and_standard_tools_check_the_record(tmp_path):
    folder = tmp_path / "trajectory"
    recorded_trajectory(folder, [1, 2, 3])
    assert_describes(folder, [f"step-{s:08d}.safetensors" for s in (1, 2, 3)])
    # written again (a resumed run saving the same step): its line is replaced, not added
    digest = ckpt.save_tensors_atomic(folder / "step-00000002.safetensors", weights(20))
    assert digest == sha256(folder / "step-00000002.safetensors")
    assert_describes(folder, [f"step-{s:08d}.safetensors" for s in (1, 2, 3)])
    # a file deleted since leaves the record at its next update
    (folder / "step-00000001.safetensors").unlink()
    ckpt.save_tensors_atomic(folder / "step-00000004.safetensors", weights(4))
    assert_describes(folder, [f"step-{s:08d}.safetensors" for s in (2, 3, 4)])
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file left
    if shutil.which("sha256sum") is None:
        pytest.skip("sha256sum (GNU coreutils) is not installed: the record's standard format is not checked here")
    ok = subprocess.run(["sha256sum", "--strict", "-c", SUMS], cwd=folder, capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.count(": OK") == 3, ok.stdout + ok.stderr
    data = bytearray((folder / "step-00000003.safetensors").read_bytes())
    data[-1] ^= 1
    (folder / "step-00000003.safetensors").write_bytes(bytes(data))
    bad = subprocess.run(["sha256sum", "-c", SUMS], cwd=folder, capture_output=True, text=True)
    assert bad.returncode == 1 and "step-00000003.safetensors: FAILED" in bad.stdout


def test_records_refuse_names_sha256sum_would_escape(tmp_path):
    (tmp_path / "a\\b").write_bytes(b"x")
    with pytest.raises(ValueError, match="newline, backslash or slash"):
        record_sha256s(tmp_path, {"a\\b": "0" * 64})
    assert not (tmp_path / SUMS).exists()


def test_a_run_records_its_trajectory_stored_averages_and_checkpoints(tmp_path):
    run = tmp_path / "run"
    train(resolve(["task=toy", f"out={run}", "steps=10", "trajectory.every=5", "checkpoint.every=5",
                   "checkpoint.keep=10", "eval.every=10", "averager=phema", "phema.sigma_rel=0.05,0.1",
                   "phema.snapshot_every=5"]))
    assert_describes(run / "trajectory", ["step-00000005.safetensors", "step-00000010.safetensors"])
    stored = sorted(p.name for p in (run / "averages" / "phema").glob("*.safetensors"))
    assert len(stored) == 4
    assert_describes(run / "averages" / "phema", stored)
    manifest = json.loads((run / "checkpoints" / "step-00000010" / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        stat = (run / "checkpoints" / "step-00000010" / name).stat()
        assert (entry["size"], entry["mtime_ns"], entry["sha256"]) == (
            stat.st_size, stat.st_mtime_ns, sha256(run / "checkpoints" / "step-00000010" / name))
    # a reconstruction from the stored averages takes their records
    average(run, parse_jobs(["phema"], {"phema.sigma_rel": "0.07"}), tmp_path / "ph")
    top = json.loads((tmp_path / "ph" / "manifest.json").read_text())
    files = [f for i in top["inputs"] for f in i["files"]]
    assert len(files) == 4 and {f["sha256_from"] for f in files} == {"recorded"}
    assert all(f["sha256"] == sha256(run / "averages" / f["file"]) for f in files)


# -- suite average: recorded, size and mtime only, or read in full ---------------------------------------------
def test_the_manifest_takes_records_reads_no_input_and_says_size_and_mtime_for_the_rest(tmp_path, monkeypatch):
    folder = tmp_path / "traj"
    recorded_trajectory(folder, [5, 10, 15])
    save_file(weights(20), str(folder / "step-00000020.safetensors"), metadata={"step": "20"})  # no record
    never = lambda *a: pytest.fail("an input was read for its sha256 without --hash-inputs")  # noqa: E731
    monkeypatch.setattr(posthoc.run, "hash_input", never)
    average(folder, parse_jobs(["lawa"], LAWA), tmp_path / "out", interval=5)
    entries = input_entries(tmp_path / "out", "lawa-k2-nu5")
    for step, entry in entries.items():
        stat = (folder / entry["file"]).stat()
        assert (entry["size"], entry["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns)
    assert {s: e.get("sha256_from") for s, e in entries.items()} == {5: "recorded", 10: "recorded",
                                                                    15: "recorded", 20: None}
    assert all(entries[s]["sha256"] == sha256(folder / entries[s]["file"]) for s in (5, 10, 15))
    assert "sha256" not in entries[20]
    # outputs are recorded too, and a later run takes those records
    out_folder = tmp_path / "out" / "lawa-k2-nu5"
    assert_describes(out_folder, [f"step-{s:08d}.safetensors" for s in (10, 15, 20)])
    outputs = json.loads((out_folder / "manifest.json").read_text())["outputs"]
    assert {o["file"]: o["sha256"] for o in outputs} == {n: r.sha256 for n, r in read_sha256s(out_folder).items()}
    # the record stands for the file without reading it: a record with the file's size and mtime is believed
    forged = tmp_path / "forged"
    shutil.copytree(folder, forged)
    text = (forged / SUMS).read_text().replace(sha256(folder / "step-00000010.safetensors"), "ab" * 32)
    (forged / SUMS).write_text(text)
    average(forged, parse_jobs(["lawa"], LAWA), tmp_path / "out2", interval=5)
    assert input_entries(tmp_path / "out2", "lawa-k2-nu5")[10]["sha256"] == "ab" * 32
    monkeypatch.undo()
    # --hash-inputs reads every input: it fills in the unrecorded one and catches the forged record
    average(folder, parse_jobs(["lawa"], LAWA), tmp_path / "out3", interval=5, hash_inputs=True)
    entries = input_entries(tmp_path / "out3", "lawa-k2-nu5")
    assert {e["sha256_from"] for e in entries.values()} == {"hashed"}
    assert all(e["sha256"] == sha256(folder / e["file"]) for e in entries.values())
    with pytest.raises(PosthocError) as info:
        average(forged, parse_jobs(["lawa"], LAWA), tmp_path / "out4", interval=5, hash_inputs=True)
    assert str(info.value) == (f"1 problem with {forged}, nothing was written: step-00000010.safetensors: sha256 "
                               f"differs from the one its SHA256SUMS recorded when it was written (corrupted)")
    assert not (tmp_path / "out4").exists() and not list(tmp_path.glob(".out4*"))


def test_a_corrupted_input_with_a_stale_looking_record_is_caught_with_hash_inputs(tmp_path):
    folder = tmp_path / "traj"
    saved = recorded_trajectory(folder, [5, 10, 15])
    path = folder / "step-00000010.safetensors"
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x10  # same size, a bit of the last tensor's data flipped; the write moves the mtime
    path.write_bytes(bytes(data))
    logged: list[str] = []
    average(folder, parse_jobs(["lawa"], LAWA), tmp_path / "out", log=logged.append)
    entry = input_entries(tmp_path / "out", "lawa-k2-nu5")[10]
    assert "sha256" not in entry and entry["mtime_ns"] == path.stat().st_mtime_ns  # the record no longer describes it
    assert any(line.startswith("note: step-00000010.safetensors changed since their sha256 was recorded")
               for line in logged), logged
    with pytest.raises(PosthocError, match=r"^1 problem with .*, nothing was written: step-00000010.safetensors: "
                                           r"sha256 differs from the one its SHA256SUMS recorded when it was "
                                           r"written \(corrupted\)$"):
        average(folder, parse_jobs(["lawa"], LAWA), tmp_path / "bad", hash_inputs=True)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))
    # the mtime put back as recorded: only reading the file can tell
    record = read_sha256s(folder)[path.name]
    os.utime(path, ns=(record.mtime_ns, record.mtime_ns))
    average(folder, parse_jobs(["lawa"], LAWA), tmp_path / "trusted")
    assert input_entries(tmp_path / "trusted", "lawa-k2-nu5")[10]["sha256"] == record.sha256 != sha256(path)
    with pytest.raises(PosthocError, match="step-00000010.safetensors: sha256 differs"):
        average(folder, parse_jobs(["lawa"], LAWA), tmp_path / "bad", hash_inputs=True)
    assert load_file(str(folder / "step-00000015.safetensors"))["count"] == saved[15]["count"]


def test_hash_inputs_is_a_switch_of_suite_average(tmp_path):
    folder = tmp_path / "traj"
    folder.mkdir()
    for s in (5, 10):
        save_file(weights(s), str(folder / f"step-{s:08d}.safetensors"))
    result = runner.invoke(app, ["average", str(folder), "averager=lawa", "lawa.k=2", "lawa.nu=5",
                                 f"out={tmp_path / 'out'}", "--hash-inputs"])
    assert result.exit_code == 0, result.output
    entries = input_entries(tmp_path / "out", "lawa-k2-nu5")
    assert all(e["sha256_from"] == "hashed" and e["sha256"] == sha256(folder / e["file"]) for e in entries.values())
    result = runner.invoke(app, ["average", str(folder), "averager=lawa", "lawa.k=2", "lawa.nu=5",
                                 f"out={tmp_path / 'out2'}", "--hash-inputs=yes"])
    assert result.exit_code != 0 and not (tmp_path / "out2").exists()


# -- NaN/Inf: found where the averaging reads, every one named, left out ------------------------------------------
@pytest.mark.parametrize("where", ["an input no output uses", "a late slice", "two inputs", "half precision",
                                   "more outputs than inputs"])
def test_nan_and_inf_anywhere_are_found_and_each_input_named_once(tmp_path, where):
    """Inputs an output averages are checked through that output, the others (all of them when outputs outnumber
    inputs) ahead of the averaging: either way every bad tensor is named, and its input left out; where every output
    of an averager would stand for one (LAWA's only window), nothing is written."""
    folder = tmp_path / "traj"
    saved = recorded_trajectory(folder, [5, 10, 15, 20, 25])
    expect = []
    if where == "an input no output uses":  # LAWA nu=10 averages steps 10 and 20: step 15 is never averaged
        saved[15]["w"][0, 0] = float("nan")
        expect = ["step-00000015.safetensors: NaN or Inf in w"]
    elif where == "a late slice":  # past the first slices of the tensor (4096 elements a slice here)
        saved[25]["w"] = torch.randn(3, 4096)
        saved[25]["w"][2, 4000] = float("-inf")
        for s in (5, 10, 15, 20):
            saved[s]["w"] = torch.randn(3, 4096)
        expect = ["step-00000025.safetensors: NaN or Inf in w"]
    elif where == "two inputs":
        saved[10]["w"][3, 1] = float("inf")
        saved[20]["w"][0, 0] = float("nan")
        saved[20]["h"][4] = float("nan")
        expect = ["step-00000010.safetensors: NaN or Inf in w", "step-00000020.safetensors: NaN or Inf in h, w"]
    elif where == "half precision":
        saved[20]["h"][8] = float("inf")
        expect = ["step-00000020.safetensors: NaN or Inf in h"]
    elif where == "more outputs than inputs":
        saved[5]["w"][0, 0] = float("nan")
        saved[25]["h"][0] = float("-inf")
        expect = ["step-00000005.safetensors: NaN or Inf in w", "step-00000025.safetensors: NaN or Inf in h"]
    for s, w in saved.items():
        ckpt.save_tensors_atomic(folder / f"step-{s:08d}.safetensors", w, {"step": str(s)})
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    averagers = ["lawa"] if where == "an input no output uses" else ["lawa", "ema"]
    interval = 5 if where == "more outputs than inputs" else None  # 2 + 5 outputs of 5 inputs
    logged = []
    try:
        result = average(folder, parse_jobs(averagers, {"lawa.k": "2", "lawa.nu": "10" if interval is None else "5"}),
                         tmp_path / "out", interval=interval, limits=posthoc.Limits(block_elements=4096),
                         log=logged.append)
    except PosthocError as error:
        message = str(error)
        assert where in ("two inputs", "half precision"), message  # LAWA's one window holds step 20 or 10
        assert "nothing was written" in message and all(line in message for line in expect), message
        assert message.count("NaN or Inf") == len(expect) and not (tmp_path / "out").exists()
    else:
        assert [line.removeprefix("left out ") for line in logged if line.startswith("left out ")] == expect
        assert result.left_out == {int(line[5:13]): line.partition(": ")[2] for line in expect}
    assert not list(tmp_path.glob(".out*"))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_the_sum_check_is_exact_overflow_included():
    finite = torch.full((1000,), 3e38)  # finite values whose sum overflows: the exact check decides, and passes
    assert torch.isinf(finite.sum()) and slice_finite(finite)
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
                  torch.float8_e5m2):
        piece = torch.linspace(-2, 2, 5000).to(dtype)
        assert slice_finite(piece) and slice_finite(piece[:0])
        infinities = () if dtype == torch.float8_e4m3fn else (float("inf"), float("-inf"))  # it has none
        for bad in (float("nan"), *infinities):
            broken = piece.clone()
            broken[4321] = bad
            assert not slice_finite(broken), (dtype, bad)
    big = torch.tensor([6e4] * 2000, dtype=torch.float16)  # its float16 sum would overflow; float32's does not
    assert slice_finite(big)


def test_finite_inputs_whose_average_overflows_are_not_refused(tmp_path):
    """An output that is not finite is traced to its inputs; finite inputs are no input problem, and the output is
    what the arithmetic gives, as for any other inputs."""
    folder = tmp_path / "traj"
    big = {s: {"w": torch.full((8,), 3e38), "b": torch.ones(3) * s} for s in (1, 2)}
    folder.mkdir()
    for s, w in big.items():
        ckpt.save_tensors_atomic(folder / f"step-{s:08d}.safetensors", w)
    average(folder, parse_jobs(["lawa"], {"lawa.k": "2", "lawa.nu": "1"}), tmp_path / "out")
    out = load_file(str(tmp_path / "out" / "lawa-k2-nu1" / "step-00000002.safetensors"))
    assert torch.isinf(out["w"]).all() and torch.equal(out["b"], torch.full((3,), 1.5))
