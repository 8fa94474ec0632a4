"""`suite average` on the checkpoints other tools write: nanoGPT, timm, Lightning, DDP and torch.compile prefixes,
their step names; where the weights are (key=), which prefix goes (prefix=), what was skipped, and the errors.

Every format is built here with the toy task's model (tiny), written the way the tool writes it, and averaged through
the CLI; the result is checked against the mean computed here from the weights that went in."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from typer.testing import CliRunner

from lawa_suite.cli import app
from lawa_suite.posthoc import WeightsAt, read_checkpoint
from lawa_suite.posthoc.discover import split_name, step_of

runner = CliRunner()
STEPS = (100, 200, 300)


def toy_weights(step: int) -> dict[str, Tensor]:
    """The toy task's model (tests/conftest.py) with weights that differ per step, BatchNorm counter included."""
    torch.manual_seed(step)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 4))
    model.train()
    model(torch.randn(32, 8))  # running statistics and num_batches_tracked move
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def optimizer_state() -> dict[str, Any]:
    """A real AdamW state_dict (its per-parameter state is keyed by index: not weights)."""
    layer = nn.Linear(3, 2)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
    layer(torch.ones(1, 3)).sum().backward()
    opt.step()
    return opt.state_dict()


def prefixed(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def brute_mean(sds: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The uniform mean of float tensors (in float64, back to the dtype); others from the newest."""
    return {k: (torch.stack([sd[k].double() for sd in sds]).mean(0).to(v.dtype) if v.is_floating_point() else v)
            for k, v in sds[-1].items()}


def average_cli(folder: Path, out: Path, *words: str) -> Any:
    return runner.invoke(app, ["average", str(folder), "averager=lawa", "lawa.k=3", "lawa.nu=100", f"out={out}",
                               "--allow-torch-load", *words])


def averaged(out: Path) -> dict[str, Tensor]:
    return load_file(str(out / "lawa-k3-nu100" / "step-00000300.safetensors"))


def assert_mean(out: Path, sds: list[dict[str, Tensor]]) -> None:
    got, want = averaged(out), brute_mean(sds)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype
        torch.testing.assert_close(got[k], want[k], rtol=2e-7, atol=2e-7)


# -- the formats ----------------------------------------------------------------------------------------------------
def nanogpt(step: int, sd: dict[str, Tensor]) -> tuple[str, dict[str, Any]]:
    """nanoGPT's train.py: compiled model (``_orig_mod.``), its optimizer, args and a tensor loss beside them."""
    return f"ckpt_{step}.pt", {"model": prefixed(sd, "_orig_mod."), "optimizer": optimizer_state(),
                               "model_args": {"n_layer": 2, "bias": False}, "iter_num": step,
                               "best_val_loss": torch.tensor(3.2), "config": {"dataset": "shakespeare"}}


def timm(step: int, sd: dict[str, Tensor]) -> tuple[str, dict[str, Any]]:
    """timm's CheckpointSaver: weights and their EMA side by side, argparse args (allowlisted, as timm does)."""
    ema = {k: (v * 0.5 if v.is_floating_point() else v) for k, v in sd.items()}
    return f"checkpoint-{step}.pth.tar", {"epoch": step // 100, "arch": "toy", "state_dict": sd,
                                          "state_dict_ema": prefixed(ema, "module."), "optimizer": optimizer_state(),
                                          "version": 2, "args": argparse.Namespace(model="toy", lr=0.1),
                                          "metric": 0.5}


def lightning(step: int, sd: dict[str, Tensor]) -> tuple[str, dict[str, Any]]:
    """Lightning's ModelCheckpoint: the LightningModule's state_dict (the network under ``model.``), and loops,
    callbacks, optimizer and scheduler states."""
    return f"epoch=0-step={step}.ckpt", {
        "epoch": 0, "global_step": step, "pytorch-lightning_version": "2.4.0", "state_dict": prefixed(sd, "model."),
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 1}}}},
        "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": None, "dirpath": "/ckpts"}},
        "optimizer_states": [optimizer_state()], "lr_schedulers": [{"last_epoch": step, "_last_lr": [0.1]}],
        "hparams_name": "kwargs", "hyper_parameters": {"lr": 0.1}}


def ddp(step: int, sd: dict[str, Tensor]) -> tuple[str, dict[str, Any]]:
    """A DDP-wrapped, compiled model (plainLM-style names and keys)."""
    return f"ckpt_step_{step}.pth", {"state_dict": prefixed(sd, "module._orig_mod."), "optimizer": optimizer_state(),
                                     "scheduler": {"last_epoch": step}, "step": step}


def compiled_flat(step: int, sd: dict[str, Tensor]) -> tuple[str, dict[str, Any]]:
    """A bare state_dict of a compiled model."""
    return f"model_{step}.pt", prefixed(sd, "_orig_mod.")


def write(folder: Path, fmt: Callable[[int, dict[str, Tensor]], tuple[str, Any]]) -> list[dict[str, Tensor]]:
    folder.mkdir(parents=True, exist_ok=True)
    sds = []
    for step in STEPS:
        sd = toy_weights(step)
        name, obj = fmt(step, sd)
        torch.save(obj, folder / name)
        sds.append(sd)
    return sds


WRAPPED = "every key stripped of {!r} (the prefix DDP and torch.compile wrappers add)"


@pytest.mark.parametrize("fmt, key, stripped", [
    (nanogpt, "model", "_orig_mod."),
    (ddp, "state_dict", "module._orig_mod."),
    (compiled_flat, None, "_orig_mod."),
])
def test_peer_formats_average_to_the_mean(tmp_path, fmt, key, stripped):
    sds = write(tmp_path / "in", fmt)
    result = average_cli(tmp_path / "in", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert_mean(tmp_path / "out", sds)
    said = f"reading the weights{f' under {key!r}' if key else ''} in each checkpoint: {WRAPPED.format(stripped)}"
    assert result.stderr.count("reading the weights") == 1 and said in result.stderr, result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [i["step"] for i in manifest["inputs"]] == list(STEPS) and "key" not in manifest
    read = {**({"key": key} if key else {}), "renamed": [WRAPPED.format(stripped)]}
    assert all(i["read"] == read for i in manifest["inputs"])


def test_timm_weights_and_ema_need_key_and_the_error_lists_them(tmp_path):
    sds = write(tmp_path / "in", timm)
    ambiguous = average_cli(tmp_path / "in", tmp_path / "out")
    assert ambiguous.exit_code == 2 and not (tmp_path / "out").exists()
    error = ambiguous.stderr.strip()
    # one cause, every file on one line in step order
    assert error.startswith("error: 1 problem with ") and "\n" not in error, error
    assert ("checkpoint-100.pth.tar, checkpoint-200.pth.tar, checkpoint-300.pth.tar: weights under 2 keys: "
            "state_dict (9 tensors), state_dict_ema (9 tensors); pass key=<name> to choose one") in error
    raw = average_cli(tmp_path / "in", tmp_path / "raw", "key=state_dict")
    assert raw.exit_code == 0, raw.output
    assert_mean(tmp_path / "raw", sds)
    assert "reading the weights under 'state_dict' in each checkpoint" in raw.stderr
    ema = average_cli(tmp_path / "in", tmp_path / "ema", "key=state_dict_ema")
    assert ema.exit_code == 0, ema.output
    assert_mean(tmp_path / "ema", [{k: (v * 0.5 if v.is_floating_point() else v) for k, v in sd.items()}
                                   for sd in sds])
    assert f"under 'state_dict_ema' in each checkpoint: {WRAPPED.format('module.')}" in ema.stderr
    assert json.loads((tmp_path / "ema" / "manifest.json").read_text())["key"] == "state_dict_ema"


@pytest.mark.parametrize("key, expected", [
    ("nope", "key=nope: no such key; the weights can be under state_dict (9 tensors), state_dict_ema (9 tensors)"),
    ("optimizer", "key=optimizer: it holds no mapping of name -> tensor; the weights can be under state_dict"),
    ("args", "key=args: it holds no mapping of name -> tensor; the weights can be under state_dict"),
])
def test_key_naming_no_weights_lists_the_candidates(tmp_path, key, expected):
    write(tmp_path / "in", timm)
    result = average_cli(tmp_path / "in", tmp_path / "out", f"key={key}")
    assert result.exit_code == 2 and expected in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_lightning_keeps_model_prefix_unless_asked_and_says_how(tmp_path):
    sds = write(tmp_path / "in", lightning)
    kept = average_cli(tmp_path / "in", tmp_path / "kept")
    assert kept.exit_code == 0, kept.output
    assert set(averaged(tmp_path / "kept")) == {"model." + k for k in sds[0]}
    assert "reading the weights under 'state_dict' in each checkpoint" in kept.stderr
    assert "note: every key starts with 'model.' (the LightningModule's attribute); prefix=model strips it" \
        in kept.stderr
    stripped = average_cli(tmp_path / "in", tmp_path / "stripped", "prefix=model")
    assert stripped.exit_code == 0, stripped.output
    assert_mean(tmp_path / "stripped", sds)
    assert "note:" not in stripped.stderr
    assert "under 'state_dict' in each checkpoint: only the keys under 'model.', stripped of it\n" in stripped.stderr
    assert json.loads((tmp_path / "stripped" / "manifest.json").read_text())["prefix"] == "model."


def test_prefix_leaves_other_keys_out_and_says_which(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    sds = []
    for step in STEPS:
        sd = toy_weights(step)
        sds.append(sd)
        torch.save({"state_dict": {**prefixed(sd, "model."), "loss.weight": torch.ones(4),
                                   "teacher.w": torch.zeros(2)}}, folder / f"step={step}.ckpt")
    result = average_cli(folder, tmp_path / "out", "prefix=model.")
    assert result.exit_code == 0, result.output
    assert_mean(tmp_path / "out", sds)
    assert "(2 other key(s) left out: loss.weight, teacher.w)" in result.stderr
    missing = average_cli(folder, tmp_path / "out2", "prefix=student")
    assert missing.exit_code == 2
    assert "prefix=student: no key starts with 'student.' (they start with loss., model., teacher.)" in missing.stderr


def test_step_names_of_other_tools():
    names = {"step-100.safetensors": 100, "step100": 100, "checkpoint-100": 100, "checkpoint-100.pth.tar": 100,
             "ckpt_100.pt": 100, "ckpt_step_100.pth": 100, "iter_0000100": 100, "iter_100.pt": 100,
             "global_step100": 100, "model_100.pt": 100, "epoch=3-step=100.ckpt": 100, "step=100.ckpt": 100,
             "epoch=3-step=100-val_loss=0.25.ckpt": 100, "CHECKPOINT-7.PTH.TAR": 7,
             "last.ckpt": None, "model.safetensors": None, "epoch=3.ckpt": None, "model-00001-of-00002": None,
             "notes.txt": None, "checkpoint-100.pth.tar.bak": None}
    assert {n: step_of(split_name(n)[0]) if split_name(n)[1] != ".bak" else None for n in names} == names
    assert split_name("checkpoint-100.pth.tar") == ("checkpoint-100", ".pth.tar")
    assert split_name("epoch=0-step=5.ckpt") == ("epoch=0-step=5", ".ckpt")


def test_skipped_entries_are_listed_with_the_reason(tmp_path):
    folder = tmp_path / "in"
    sds = write(folder, ddp)
    (folder / "notes.txt").write_text("x")
    (folder / "last.ckpt").write_bytes((folder / "ckpt_step_300.pth").read_bytes())
    (folder / "runs").mkdir()
    (folder / "step-5.json").write_text("{}")
    (folder / ".hidden").write_text("editor file")
    result = average_cli(folder, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert_mean(tmp_path / "out", sds)
    skipped = [line for line in result.stderr.splitlines() if line.startswith("skipped: ")]
    assert skipped == ["skipped: last.ckpt (not named by step)", "skipped: notes.txt (not a checkpoint)",
                       "skipped: runs/ (not named by step)",
                       "skipped: step-5.json (named by step, but not a weights file: .safetensors, or a torch file "
                       "with --allow-torch-load)"], result.stderr


def test_no_checkpoints_names_what_was_skipped_and_what_is_accepted(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("last.ckpt", "notes.txt", "best.pth.tar"):
        (folder / name).write_bytes(b"x")
    result = average_cli(folder, tmp_path / "out")
    assert result.exit_code == 2
    error = result.stderr.strip()  # the skipped entries are in the error, not before it
    assert "\n" not in error and "no checkpoints named by step (skipped 3: best.pth.tar (not named by step), " \
        "last.ckpt (not named by step), notes.txt (not a checkpoint)); accepted: step-N.safetensors files" in error
    assert "ckpt_step_N" in error and "epoch=E-step=N" in error and ".pth.tar files" in error


def test_hostile_torch_inputs_each_name_the_file_and_the_cause(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    good = toy_weights(100)
    torch.save({"model": good}, folder / "ckpt_100.pt")
    torch.save({"epoch": 1, "args": {"lr": 0.1}, "metric": 0.5}, folder / "ckpt_200.pt")  # no tensors at all
    torch.save({"model": good, "rng": torch.get_rng_state()}, folder / "ckpt_300.pt")      # a byte tensor: not weights
    torch.save({"model": good, "extra": Unlisted()}, folder / "ckpt_1000.pt")              # not allowlisted
    (folder / "ckpt_20.pt").write_bytes(b"not a torch file at all")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    result = average_cli(folder, tmp_path / "out")
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: 4 problems with ") and lines[0].endswith("nothing was written:"), lines
    # files in step order (20 before 200 before 1000, not as their names sort), one a line, each cause kept; then
    # the problems of no one file
    assert lines[4] == "  lawa-k3-nu100: the window of step 1000 needs step(s) 800, 900, which the input does not hold"
    assert lines[1] == ("  ckpt_20.pt: unreadable (not a torch.save file, or a damaged one "
                        "(torch.load(weights_only=True): Unsupported operand 110))"), lines
    assert lines[2] == ("  ckpt_200.pt: no mapping of name -> tensor (a state_dict) in it (its keys: epoch, args, "
                        "metric)")
    assert lines[3].startswith("  ckpt_1000.pt: unreadable (torch.load(weights_only=True) refuses it: Unsupported "
                               "global: GLOBAL tests.test_posthoc_peers.Unlisted") or \
        lines[3].startswith("  ckpt_1000.pt: unreadable (torch.load(weights_only=True) refuses it: Unsupported "
                            "global: GLOBAL test_posthoc_peers.Unlisted"), lines
    assert lines[3].endswith("save the weights alone (torch.save(model.state_dict())) or convert them to safetensors)")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


class Unlisted:
    """A class torch.load(weights_only=True) must refuse to build."""


def test_key_on_safetensors_inputs_is_refused(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for step in STEPS:
        save_file(toy_weights(step), str(folder / f"step-{step}.safetensors"))
    result = average_cli(folder, tmp_path / "out", "key=model")
    assert result.exit_code == 2
    assert ("step-100.safetensors, step-200.safetensors, step-300.safetensors: key=model names a mapping inside a "
            "torch checkpoint") in result.stderr
    empty = average_cli(folder, tmp_path / "out", "key=")
    assert empty.exit_code == 2 and "key: expected the mapping that holds the weights" in empty.stderr


def test_read_checkpoint_finds_and_strips_as_averaging_does(tmp_path):
    name, obj = timm(100, toy_weights(100))
    torch.save(obj, tmp_path / name)
    said: list[str] = []
    weights = read_checkpoint(tmp_path / name, allow_torch_load=True, at=WeightsAt("state_dict_ema"), log=said.append)
    assert set(weights) == set(toy_weights(100))
    assert said == [f"reading the weights under 'state_dict_ema' in each checkpoint: {WRAPPED.format('module.')}"]


def test_eval_reads_the_raw_checkpoints_as_the_averaging_did(tmp_path):
    """``suite average ... eval=true`` and ``suite eval`` score the raw Lightning checkpoints with the prefix the
    averaging was given (recorded in its manifest), so the toy model loads them."""
    write(tmp_path / "in", lightning)
    result = average_cli(tmp_path / "in", tmp_path / "out", "prefix=model", "eval=true", "task=toy")
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert {m["weights"] for m in metrics} == {"raw", "lawa-k3-nu100"} and {m["step"] for m in metrics} == {300}
    again = runner.invoke(app, ["eval", str(tmp_path / "out"), "task=toy", "--allow-torch-load"])
    assert again.exit_code == 0, again.output
    assert again.stderr.count("reading the weights under 'state_dict' in each checkpoint: only the keys under") == 1
    wrong = runner.invoke(app, ["eval", str(tmp_path / "out"), "task=toy", "prefix=nope", "--allow-torch-load"])
    assert wrong.exit_code == 2 and "prefix=nope: no key starts with 'nope.'" in wrong.stderr, wrong.output
