"""distributed=fsdp: FSDP2 over 2 gloo processes on CPU, every averager on its rank's shards, sharded checkpoints.

One torchrun of ``tests/_fsdp_child.py`` (the flat toy task with an odd hidden width, so the first dimension splits
unevenly: 9 rows and 8) serves most tests here; rank 1 alone finds NaN in its shard of the weights after step 6.
It checkpoints (torch.distributed.checkpoint) at steps 4, 8 and 12.

What is exact and what is not:
- the gathered shard averages equal averagers fed, in one process, the gathered raw weights of every step (the
  trajectory the same run saved), bit for bit: each method is elementwise, so a shard's average is the average's
  shard, and the refused step is refused on both ranks;
- a resume on 2 processes from step 8 ends with the same averages bit for bit;
- against a one-process run of the same global batch (or a resume on one process) the weights agree to a
  tolerance, not bit for bit: FSDP's reduce-scatter sums the two halves' gradients in another order than one
  backward over the whole batch, a rounding difference that AdamW carries on (measured: at most 3e-7 of each
  tensor's largest value after 12 steps).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import _fsdp_child
from helpers import torchrun
from lawa_suite import checkpoints as ckpt
from lawa_suite.config import ConfigError, resolve
from lawa_suite.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).with_name("_fsdp_child.py")
STEPS, NAN_STEP = 12, 6
NAMES = ("lawa", "ema", "swa", "phema", "wma", "bema")
ARGS = ["task=toyflat", "hidden=17", f"steps={STEPS}", "eval.every=4", f"averager={','.join(NAMES)}", "lawa.k=3",
        "lawa.nu=2", "ema.decay=0.9", "swa.start=0.25", "wma.k=3", "wma.nu=2", "progress=false"]
FSDP = ["distributed=fsdp", "checkpoint.every=4", "checkpoint.keep=3", "trajectory.every=1"]


def torchrun_fsdp(result: Path, out: Path, *args: str, env: dict[str, str] | None = None) -> None:
    done = torchrun(CHILD, str(result), *ARGS, *FSDP, f"out={out}", *args, env=env)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    result = tmp_path_factory.mktemp("fsdp")
    torchrun_fsdp(result, result / "run", env={"FSDP_NAN_AT": f"{NAN_STEP}:1"})
    return result


def copy_without_last(run: Path, to: Path) -> Path:
    """The run folder as if the process had died after the checkpoint of step 8: resume=auto continues from it."""
    shutil.copytree(run, to)
    shutil.rmtree(to / "checkpoints" / ckpt.step_dir_name(STEPS))
    return to


def rank_info(result: Path, rank: int) -> dict:
    return json.loads((result / f"rank{rank}.json").read_text())


def gathered(result: Path, prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix + "/"): v for k, v in load_file(str(result / "averages.safetensors")).items()
            if k.startswith(prefix + "/")}


def replayed_averages(result: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The averagers of the same config fed the run's gathered raw weights of every step, in one process, refusing
    the poisoned step as the loop does."""
    averagers = resolve([*ARGS, *FSDP]).build_averagers()
    for avg in averagers.values():
        avg.start_run(STEPS)
    for step in range(1, STEPS + 1):
        weights = load_file(str(result / "run" / "trajectory" / f"step-{step:08d}.safetensors"))
        for avg in averagers.values():
            if step == NAN_STEP and avg.wants(step):
                avg.refuse(step)
            else:
                avg.observe(step, weights)
    return {name: avg.average() for name, avg in averagers.items()}


@pytest.mark.slow
def test_parameters_are_sharded_and_nan_in_one_shard_is_refused_by_every_rank(fsdp_run):
    for rank in (0, 1):
        info = rank_info(fsdp_run, rank)
        assert info["sharded"] and info["param_types"] == ["DTensor"]
        assert info["refused"] == dict.fromkeys(NAMES, 1), info  # each wanted step 6 (lawa, wma: every 2nd)


@pytest.mark.slow
def test_shard_averages_equal_full_weight_averages_bit_for_bit(fsdp_run):
    reference = replayed_averages(fsdp_run)
    for name in NAMES:
        ours = gathered(fsdp_run, name)
        assert ours.keys() == reference[name].keys()
        for key, value in ours.items():
            assert torch.equal(value, reference[name][key]), f"{name}/{key}"
    # the final raw weights are the trajectory's last step: every evaluation put them back bit for bit
    last = load_file(str(fsdp_run / "run" / "trajectory" / f"step-{STEPS:08d}.safetensors"))
    assert all(torch.equal(v, last[k]) for k, v in gathered(fsdp_run, "raw").items())


@pytest.mark.slow
def test_evaluation_scores_the_swapped_in_shards(fsdp_run):
    """The scores the sharded run logged for each averager are those of its average in a plain model (FSDP2 keeps
    the root's gathered weights after an eval forward: without a reshard it would score the previous weights)."""
    records = [json.loads(line) for line in (fsdp_run / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["weights"]: r for r in records if r["split"] == "val" and r["step"] == STEPS}
    assert set(logged) == {"raw", *NAMES}
    plain = _fsdp_child.FlatToyTask(resolve(ARGS).task, resolve(ARGS).run)
    plain.setup()
    model = plain.build_model()
    from lawa_suite import registry
    evaluator = registry.evaluators.create(plain.evaluator, task=plain)
    scores = {}
    for name in ("raw", *NAMES):
        model.load_state_dict(gathered(fsdp_run, name))
        model.eval()
        scores[name] = evaluator.evaluate(model, plain.eval_batches())
    assert len({round(s["loss"], 12) for s in scores.values()}) == 1 + len(NAMES), "the weights scored must differ"
    # each rank scored its share of the batches on gathered weights (was: every rank all of them), sums reduced
    shares = [rank_info(fsdp_run, rank)["eval_batches"] for rank in (0, 1)]
    assert sum(shares) == len(plain.eval_batches()) and min(shares) >= 1, shares
    for name, values in scores.items():
        for metric, value in values.items():  # the same weights, the same kernels: equal up to summation order
            assert math.isclose(logged[name][metric], value, rel_tol=1e-6), (name, metric, logged[name], value)


@pytest.mark.slow
def test_two_processes_match_one_process_and_each_rank_holds_half(fsdp_run, tmp_path):
    single = _fsdp_child.run_and_capture([*ARGS, f"out={tmp_path / 'one'}"], nan_at=(NAN_STEP, 0))
    raw = gathered(fsdp_run, "raw")
    for key, value in single.unwrapped.state_dict().items():
        torch.testing.assert_close(raw[key], value, rtol=1e-5, atol=1e-6)  # reduce-scatter order (module doc)
    for name, avg in single.averagers.items():
        assert avg.refused == rank_info(fsdp_run, 0)["refused"][name]
        for key, value in avg.average().items():
            torch.testing.assert_close(gathered(fsdp_run, name)[key], value, rtol=1e-5, atol=1e-6)
    # memory: the shards partition the single process's state; each rank holds its rows (9 or 8 of 17 in layer 1)
    whole = {name: _fsdp_child.state_bytes(avg) for name, avg in single.averagers.items()}
    ranks = [rank_info(fsdp_run, r)["bytes"] for r in (0, 1)]
    for name, total in whole.items():
        assert ranks[0][name] + ranks[1][name] == total, name
        assert max(ranks[0][name], ranks[1][name]) <= 0.53 * total, (name, ranks, total)


@pytest.mark.slow
def test_each_rank_writes_its_shards_into_one_committed_checkpoint(fsdp_run):
    folders = ckpt.list_checkpoints(fsdp_run / "run" / "checkpoints")
    assert [c.step for c in folders] == [4, 8, 12]
    assert not [p for p in (fsdp_run / "run" / "checkpoints").iterdir() if p.name.startswith(".")]
    for checkpoint in folders:
        assert not ckpt.verify(checkpoint.path)
        manifest = json.loads((checkpoint.path / "manifest.json").read_text())
        assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(manifest["files"]), "every rank's file is hashed"
        assert manifest["sharded"] == 2 and not (checkpoint.path / "model.safetensors").exists()


@pytest.mark.slow
def test_export_reads_a_sharded_checkpoint_whole(fsdp_run):
    """suite export's reader assembles raw weights and each average from every rank's shards, in one process."""
    from lawa_suite.export import select_weights
    from lawa_suite.rundir import find_run_config, load_resolved

    cfg = load_resolved(find_run_config(fsdp_run / "run"))
    for name in ("raw", *NAMES):  # the run folder: its newest checkpoint, step 12
        state, _ = select_weights(fsdp_run / "run", name, cfg)
        expected = gathered(fsdp_run, name)
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected), name


@pytest.mark.slow
def test_resume_on_two_processes_is_bit_for_bit(fsdp_run, tmp_path):
    run = copy_without_last(fsdp_run / "run", tmp_path / "run")
    torchrun_fsdp(tmp_path, run, "resume=auto")
    ours, uninterrupted = (load_file(str(d / "averages.safetensors")) for d in (tmp_path, fsdp_run))
    assert ours.keys() == uninterrupted.keys()
    assert [k for k in ours if not torch.equal(ours[k], uninterrupted[k])] == []


@pytest.mark.slow
def test_resume_on_one_process_reads_the_shards_of_two(fsdp_run, tmp_path):
    run = copy_without_last(fsdp_run / "run", tmp_path / "run")
    single = _fsdp_child.run_and_capture([*ARGS, *FSDP, f"out={run}", "resume=auto"])
    assert single.state.step == STEPS and not single.sharded
    for name, avg in single.averagers.items():  # steps 9-12 on one process: the reduction order again (module doc)
        assert avg.refused == 1, "the refused step is part of the state read back"
        for key, value in avg.average().items():
            torch.testing.assert_close(gathered(fsdp_run, name)[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_kill_while_committing_a_sharded_checkpoint_loses_nothing(tmp_path):
    """One process (distributed=fsdp: the same DCP save, without a process group) killed before the manifest of step
    8: the scratch and staging folders are leftovers, step 4 is intact, and resume=auto continues from it."""
    out = tmp_path / "run"
    killed = subprocess.run([sys.executable, str(CHILD), str(tmp_path), *ARGS, *FSDP, f"out={out}"], cwd=ROOT,
                            env={**os.environ, "SUITE_FAULT": "before_manifest@8"}, capture_output=True, text=True,
                            timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert [c.step for c in ckpt.list_checkpoints(out / "checkpoints")] == [4]
    assert [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")], "the kill left its staging"
    resumed = _fsdp_child.run_and_capture([*ARGS, *FSDP, f"out={out}", "resume=auto"])
    assert resumed.state.step == STEPS
    assert [c.step for c in ckpt.list_checkpoints(out / "checkpoints")] == [4, 8, 12]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def test_a_whole_checkpoint_is_not_resumed_sharded(tmp_path):
    out, short = tmp_path / "run", [a for a in ARGS if not a.startswith("steps=")] + ["steps=4"]
    _fsdp_child.run_and_capture([*short, f"out={out}"])
    whole = out / "checkpoints" / ckpt.step_dir_name(4)
    with pytest.raises(CheckpointError) as info:  # (in the same out= the config check already refuses the change)
        _fsdp_child.run_and_capture([*short, f"out={tmp_path / 'other'}", "distributed=fsdp", f"resume={whole}"])
    assert "saved whole" in str(info.value) and "distributed=ddp" in str(info.value) and "\n" not in str(info.value)


def test_fsdp_refuses_compile_in_one_line():
    with pytest.raises(ConfigError) as info:
        resolve(["task=toy", "distributed=fsdp", "compile=true"])
    message = str(info.value)
    assert message.startswith("compile:") and "distributed=fsdp" in message and "\n" not in message, message


def test_distributed_names_its_choices():
    with pytest.raises(ConfigError, match="distributed") as info:
        resolve(["task=toy", "distributed=zero3"])
    assert "fsdp" in str(info.value) and "ddp" in str(info.value)


@pytest.mark.slow
def test_suite_average_reads_sharded_checkpoints(fsdp_run, tmp_path):
    """`suite average` takes a distributed=fsdp run's checkpoints (every rank's DCP files) as it takes any others,
    a tensor at a time: LAWA over steps 4, 8 and 12 equals, bit for bit, `suite average` of the same steps' whole
    weights from the trajectory, and the float64 mean of those weights to float32 rounding."""
    from typer.testing import CliRunner

    from lawa_suite.cli import app

    steps = (4, 8, 12)
    whole = tmp_path / "trajectory"
    whole.mkdir()
    for step in steps:
        name = f"step-{step:08d}.safetensors"
        shutil.copyfile(fsdp_run / "run" / "trajectory" / name, whole / name)
    runner = CliRunner()
    for source, out in ((fsdp_run / "run" / "checkpoints", "sharded"), (whole, "whole")):
        result = runner.invoke(app, ["average", str(source), "averager=lawa", "lawa.k=3", "lawa.nu=4",
                                     f"out={tmp_path / out}"])
        assert result.exit_code == 0, result.output
    ours, theirs = (load_file(str(tmp_path / out / "lawa-k3-nu4" / "step-00000012.safetensors"))
                    for out in ("sharded", "whole"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    saved = [load_file(str(whole / f"step-{step:08d}.safetensors")) for step in steps]
    for key, value in ours.items():
        mean = sum(s[key].double() for s in saved) / len(saved)
        torch.testing.assert_close(value.double(), mean, rtol=1e-6, atol=1e-7)
    manifest = json.loads((tmp_path / "sharded" / "manifest.json").read_text())
    inputs = json.dumps(manifest)
    assert "__1_0.distcp" in inputs and "recorded" in inputs, "every rank's file is an input, hash from the manifest"


@pytest.mark.slow
def test_suite_average_names_a_missing_rank_file(fsdp_run, tmp_path):
    from typer.testing import CliRunner

    from lawa_suite.cli import app

    ckpts = tmp_path / "checkpoints"
    shutil.copytree(fsdp_run / "run" / "checkpoints", ckpts)
    (ckpts / ckpt.step_dir_name(8) / "__1_0.distcp").unlink()
    result = CliRunner().invoke(app, ["average", str(ckpts), "averager=lawa", "lawa.k=3", "lawa.nu=4",
                                      f"out={tmp_path / 'post'}"])
    assert result.exit_code != 0 and not (tmp_path / "post").exists()
    assert "step-00000008" in result.output and "__1_0.distcp" in result.output, result.output
