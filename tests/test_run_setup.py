"""What ``suite run`` checks before it creates anything in ``out=`` (issue 29 item 16 and the audit after it): the
checkpoint ``resume=`` names, and the folders its averagers keep files in. A refused command leaves no trace."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from lawa_suite.cli import app

runner = CliRunner()
WORDS = ["task=toy", "steps=4", "eval.every=2", "averager=ema"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A finished toy run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("saved") / "run"
    result = runner.invoke(app, ["run", *WORDS, f"out={out}"])
    assert result.exit_code == 0, result.output
    return out


def _corrupt(saved, tmp_path):
    copy = tmp_path / "copy" / "step-00000004"
    shutil.copytree(saved / "checkpoints" / "step-00000004", copy)
    with open(copy / "model.safetensors", "r+b") as file:
        file.truncate(100)
    return copy


# (what resume= names, extra words, exit code, what the one line says). Each was refused only after config.yaml and
# metrics-meta.json were written into out=; the run folder's line said "manifest.json: missing (the checkpoint was
# never committed)"
CASES = {
    "missing": (lambda saved, tmp: tmp / "nowhere", [], 2, "does not exist or is not a folder"),
    "a run folder": (lambda saved, tmp: saved, [], 2,
                     "is a run folder; resume= takes one checkpoint folder (the newest valid one here is "),
    "its checkpoints/": (lambda saved, tmp: saved / "checkpoints", [], 2, "is a folder of checkpoints; resume= takes"),
    "not a checkpoint": (lambda saved, tmp: tmp, [], 2, "is not a checkpoint folder (no manifest.json)"),
    "invalid": (_corrupt, [], 1, "model.safetensors"),
    "another width": (lambda saved, tmp: saved / "checkpoints" / "step-00000004", ["toy.hidden=32"], 1,
                      "holds another model's state (saved by task toy; "),
    "other averager settings": (lambda saved, tmp: saved / "checkpoints" / "step-00000004", ["ema.decay=0.5"], 1,
                                "averager ema in "),
    "an averager it lacks": (lambda saved, tmp: saved / "checkpoints" / "step-00000004", ["averager=ema,swa"], 1,
                             "holds no state for averager(s) swa; pass reset_averagers=true"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_refused_resume_creates_nothing(saved, tmp_path, case):
    source, extra, code, said = CASES[case]
    out = tmp_path / "new"
    words = [w for w in WORDS if not any(w.startswith(e.partition("=")[0] + "=") for e in extra)] + extra
    result = runner.invoke(app, ["run", *words, f"out={out}", f"resume={source(saved, tmp_path)}"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == code and "Traceback" not in result.output, result.output
    assert lines[-1].startswith("error: resume: ") and said in lines[-1], lines[-1]
    assert not out.exists(), sorted(p.name for p in out.iterdir())


def test_a_checkpoint_that_fits_resumes_into_a_new_folder(saved, tmp_path):
    out = tmp_path / "new"
    result = runner.invoke(app, ["run", *WORDS, f"out={out}", f"resume={saved / 'checkpoints' / 'step-00000002'}"])
    assert result.exit_code == 0 and "resumed from" in result.output, result.output
    named = runner.invoke(app, ["run", *WORDS[:-1], f"out={tmp_path / 'reset'}", "averager=ema,swa",
                                "reset_averagers=true", f"resume={saved / 'checkpoints' / 'step-00000002'}"])
    assert named.exit_code == 0, named.output


# -- the folders the averagers keep files in ----------------------------------------------------------------------
def test_a_snapshot_folder_another_run_uses_is_refused_before_anything_is_written(tmp_path):
    """Two runs with one lawa.dir: the second was refused at its first snapshot, after its out/config.yaml,
    metrics-meta.json and metrics.jsonl were written."""
    folder = tmp_path / "snaps"
    folder.mkdir()
    hold = ("import fcntl, json, os, socket, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, json.dumps({'pid': os.getpid(), 'host': "
            "socket.gethostname(), 'since': 'now'}).encode()); print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path / ".snaps.lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        out = tmp_path / "run"
        result = runner.invoke(app, ["run", *WORDS[:-1], "averager=lawa", "lawa.k=2", "lawa.nu=1", "lawa.store=disk",
                                     f"lawa.dir={folder}", f"out={out}"])
    finally:
        holder.kill()
        holder.wait()
    line = result.output.strip().splitlines()[-1]
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert line.startswith(f"error: lawa.dir: {folder} is in use by another run's averager (held by pid {holder.pid} "
                           f"on this host"), line
    assert not out.exists() and os.listdir(folder) == []


def test_the_run_folder_itself_is_no_snapshot_folder(tmp_path):
    # was "holds the snapshots of another window in use": the run's lock and the folder's are one file
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", *WORDS[:-1], "averager=lawa", "lawa.k=2", "lawa.nu=1", "lawa.store=disk",
                                 f"lawa.dir={out}", f"out={out}"])
    line = result.output.strip().splitlines()[-1]
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert line.startswith(f"error: lawa.dir: '{out}' is the run folder itself (out=)"), line
    assert f"{out / 'lawa-snapshots'} is fine" in line and not out.exists()
    inside = runner.invoke(app, ["run", *WORDS[:-1], "averager=lawa", "lawa.k=2", "lawa.nu=1", "lawa.store=disk",
                                 f"lawa.dir={out / 'lawa-snapshots'}", f"out={out}"])
    assert inside.exit_code == 0, inside.output
    assert sorted(p.name for p in (out / "lawa-snapshots").iterdir()) == ["snapshot-0000000003.safetensors",
                                                                          "snapshot-0000000004.safetensors"]
    # the same into an empty out= made beforehand (its subfolder's lock, taken first, is not "a folder not empty")
    made = tmp_path / "made-before"
    made.mkdir()
    again = runner.invoke(app, ["run", *WORDS[:-1], "averager=lawa", "lawa.k=2", "lawa.nu=1", "lawa.store=disk",
                                f"lawa.dir={made / 'lawa-snapshots'}", f"out={made}"])
    assert again.exit_code == 0, again.output


def test_a_run_leaves_no_lock_file_beside_its_snapshot_folder(tmp_path):
    """The snapshot folder's lock file (.snaps.lock beside it) was left behind after every run; the run folder's
    lock goes as its holder lets go, and so does this one now (here at the end of the run's process)."""
    folder = tmp_path / "snaps"
    result = subprocess.run([sys.executable, "-m", "lawa_suite.cli", "run", "task=cifar", "preset=tiny", "steps=2",
                             "eval.every=2", "averager=lawa", "lawa.k=1", "lawa.nu=1", "lawa.store=disk",
                             f"lawa.dir={folder}", f"out={tmp_path / 'run'}", "progress=false"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert os.listdir(folder) and sorted(os.listdir(tmp_path)) == ["run", "snaps"]


# -- the checks issue 29 item 16 named (they refused only after out/config.yaml was written) ------------------------
def _offline_tiktoken(monkeypatch, tmp_path):
    import tiktoken.load
    import tiktoken.registry

    def offline(url: str) -> bytes:
        raise ConnectionError(f"no network for {url}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})


REFUSED = {
    "compile=true on tiny cifar": (["task=cifar", "preset=tiny", "compile=true"], 2, "cifar.width: expected >= 8"),
    "a missing data.path": (["task=gpt2", "preset=tiny", "data=text", "data.path={tmp}/nope.txt"], 2,
                            "data.path: "),
    "tokenizer=gpt2 offline": (["task=gpt2", "preset=tiny", "gpt2.tokenizer=gpt2"], 1, "TIKTOKEN_CACHE_DIR"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_refused_run_creates_nothing(tmp_path, monkeypatch, case):
    words, code, said = REFUSED[case]
    _offline_tiktoken(monkeypatch, tmp_path)
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", *[w.format(tmp=tmp_path) for w in words], "averager=", f"out={out}"])
    line = result.output.strip().splitlines()[-1]
    assert result.exit_code == code and "Traceback" not in result.output, result.output
    assert line.startswith("error: ") and said in line, line
    assert not out.exists()
