"""Plain helpers the tests share (fixtures live in conftest.py): the toy run and its files, bitwise comparison of
nested states, digests of folders, and launching a script on two processes with torchrun.

Each helper exists once, with the strictest semantics of the copies it replaced.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml
import torch
from safetensors.torch import load_file

from lawa_suite import checkpoints as ckpt
from lawa_suite import registry
from lawa_suite.config import resolve
from lawa_suite.training.loop import train

ROOT = Path(__file__).resolve().parents[1]


# -- real data some tests read (nothing downloads at test time) ---------------------------------------------------
def local_data() -> Path:
    """The folder of real data files a few tests read (``cifar10-jpg.tar.gz``, ``tiktoken-cache/``):
    ``$LAWA_SUITE_TEST_DATA``, else ``../shared/data`` beside this checkout (where this project's workspace keeps
    it). A test needing a file that is not there skips, naming the file and this variable; ``.ci/run`` says which."""
    given = os.environ.get("LAWA_SUITE_TEST_DATA")
    return Path(given).expanduser() if given else ROOT.parent / "shared" / "data"


# -- runs and their files --------------------------------------------------------------------------------------
def run_toy(out: Path, *overrides: str, task: str = "toy"):
    """``suite run task=toy out=...`` in this process; returns the loop's result."""
    return train(resolve([f"task={task}", f"out={out}", *overrides]))


def read_metrics(out: Path) -> list[dict]:
    """Every record of a run's metrics.jsonl, in order."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_state(out: Path) -> tuple[dict, dict]:
    """The newest checkpoint's raw weights and its training state (optimizer, averagers, stream, rng, counters)."""
    last = ckpt.list_checkpoints(out / "checkpoints")[-1].path
    return load_file(str(last / "model.safetensors")), ckpt.read_state(last, "state")


def final_state_at(out: Path, step: int) -> dict:
    """The raw weights of the checkpoint of ``step``."""
    return load_file(str(out / "checkpoints" / ckpt.step_dir_name(step) / "model.safetensors"))


def tree_digest(folder: Path, ignore_sums_dates: bool = False) -> dict[str, str]:
    """sha256 of every file under ``folder`` by relative path (so the list of files too): what must stay unchanged.

    ``ignore_sums_dates``: of a SHA256SUMS record, its hash lines only; its '#' lines give each file's mtime, which
    two separate runs never share (for comparing the outputs of two runs, not one folder before and after)."""
    def content(p: Path) -> bytes:
        if not (ignore_sums_dates and p.name == "SHA256SUMS"):
            return p.read_bytes()
        return b"".join(line for line in p.read_bytes().splitlines(keepends=True) if not line.startswith(b"#"))
    return {str(p.relative_to(folder)): hashlib.sha256(content(p)).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# -- bitwise comparison --------------------------------------------------------------------------------------------
def _raw_bytes(t: torch.Tensor) -> torch.Tensor:
    # The bits themselves: -0.0 differs from 0.0 and a NaN equals only the same NaN (torch.equal says otherwise).
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_same(a: Any, b: Any, path: str = "", key_order: bool = True) -> None:
    """``a`` and ``b`` identical: nested dicts (same keys in the same order), lists and tuples (same length), tensors
    and numpy arrays (same dtype, shape and bits), other values equal and of the same type (NaN equals NaN: the same
    bits). Nested ``None`` equals ``None``; ``a`` or ``b`` itself ``None`` fails: nothing to compare (an averager's
    ``average()`` before it is ready). ``path`` names where a difference is. ``key_order=False``: the same keys in
    any order (a safetensors file does not keep the order its mapping had)."""
    where = path or "/"
    if not path:
        assert a is not None and b is not None, f"nothing to compare: {type(a)} and {type(b)}"
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), f"a tensor and a {type(b)} at {where}"
        assert a.dtype == b.dtype, f"dtypes differ at {where}: {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"shapes differ at {where}: {tuple(a.shape)} != {tuple(b.shape)}"
        assert torch.equal(_raw_bytes(a), _raw_bytes(b)), f"tensors differ at {where}"
    elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):  # numpy's RNG state
        assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray), f"an array and a {type(b)} at {where}"
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), f"arrays differ at {where}"
    elif isinstance(a, dict):
        assert isinstance(b, dict), f"a dict and a {type(b)} at {where}"
        keys_a, keys_b = (list(a), list(b)) if key_order else (sorted(a), sorted(b))
        assert keys_a == keys_b, f"keys differ at {where}: {keys_a} != {keys_b}"
        for key in a:
            assert_same(a[key], b[key], f"{path}/{key}", key_order)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)), f"a sequence and a {type(b)} at {where}"
        assert len(a) == len(b), f"lengths differ at {where}: {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}/{i}", key_order)
    else:
        assert type(a) is type(b), f"{type(a)} != {type(b)} at {where}"
        both_nan = isinstance(a, float) and math.isnan(a) and math.isnan(b)
        assert a == b or both_nan, f"{a!r} != {b!r} at {where}"


def same_tree(a: Any, b: Any, key_order: bool = True) -> bool:
    """``assert_same`` as a yes or no (for tests that expect a difference too)."""
    try:
        assert_same(a, b, key_order=key_order)
    except AssertionError:
        return False
    return True


def same_bits(a: Any, b: Any) -> bool:
    """Weights identical bit for bit (names, dtypes, shapes, bits), whatever order the names come in."""
    return same_tree(a, b, key_order=False)


# -- several processes ---------------------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port free on this machine now, for a torchrun rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, *args: str, env: dict[str, str] | None = None, processes: int = 2,
             timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun`` of ``script`` on ``processes`` local processes (the venv's torchrun, a free port, run from the
    repository root); output captured as text. The caller checks the exit code: some tests expect a failure."""
    command = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(processes), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), str(script), *args]
    return subprocess.run(command, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


# -- hand-written run folders for the report -----------------------------------------------------------------
# held-out loss (lower is better) at steps 10..50: raw is noisy at the high lr; lawa settles below it sooner
REPORT_CURVES = {
    (0.1, 0): {"raw": [3.0, 2.5, 2.4, 2.2, 2.3], "lawa": [None, 2.3, 2.1, 2.0, 2.0],
               "swa": [None, None, None, 2.1, 2.05], "swa_early": [None, 2.6, 2.4, 2.3, 2.25]},
    (0.1, 1): {"raw": [3.2, 2.7, 2.6, 2.4, 2.5], "lawa": [None, 2.5, 2.3, 2.2, 2.2],
               "swa": [None, None, None, 2.3, 2.25], "swa_early": [None, 2.8, 2.6, 2.5, 2.45]},
    (0.01, 0): {"raw": [3.5, 3.0, 2.8, 2.7, 2.6], "lawa": [None, 3.1, 2.85, 2.72, 2.61],
                "swa": [None, None, None, 2.7, 2.62], "swa_early": [None, 3.2, 2.9, 2.8, 2.7]},
}


def report_run(root: Path, lr: float, seed: int, curves: dict[str, list[float | None]]) -> Path:
    """A gpt2 run folder written by hand (config.yaml, metrics.jsonl) for the report, at steps 10..50 of 50."""
    run = root / f"lr{lr:g}-seed{seed}"
    run.mkdir(parents=True)
    config = {"task": "gpt2", "preset": "cpu", "lr": lr, "seed": seed, "steps": 50,
              "averager": ["lawa", "swa", "swa_early"], "swa": {"start": 0.75, "every": 1},
              "swa_early": {"of": "swa", "start": 0.2, "every": 1}, "lawa": {"k": 2, "nu": 5}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    lines = [{"step": 10, "weights": "raw", "split": "train", "loss": 9.0, "lr": lr}]
    for i, step in enumerate(range(10, 51, 10)):
        for weights, values in curves.items():
            if values[i] is not None:
                lines.append({"step": step, "weights": weights, "split": "val", "loss": values[i]})
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


def report_bench(tmp_path: Path) -> Path:
    """A bench folder of hand-written gpt2 runs: lr 0.1 (seeds 0, 1) and 0.01 (seed 0), curves ``REPORT_CURVES``."""
    root = tmp_path / "bench" / "gpt2"
    for (lr, seed), curves in REPORT_CURVES.items():
        report_run(root, lr, seed, curves)
    return tmp_path / "bench"


# -- schedule-free runs -----------------------------------------------------------------------------------------
def sf_run(task: str, out: Path, *extra: str) -> list[str]:
    """A tiny schedule-free run's overrides; ``extra`` ones replace the defaults of the same key."""
    words = [f"task={task}", "preset=tiny", "optimizer=schedulefree", f"out={out}", "steps=4", "eval.every=2",
             "checkpoint.every=2", "checkpoint.keep=5", "progress=false", "averager=ema,swa", "swa.start=1", *extra]
    return [f"{k}={v}" for k, v in dict(word.split("=", 1) for word in words).items()]


def raw_scores(out: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if r.get("weights") == "raw" and r.get("split") == "val"}


def restored(cfg, out: Path, step: int):
    """The task, its model and optimizer as saved at ``step``, rebuilt by hand (the live, train-mode weights)."""
    folder = out / "checkpoints" / ckpt.step_dir_name(step)
    task = registry.tasks.get(cfg.run.task)(cfg.task, cfg.run)
    task.setup()
    model = task.build_model()
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    optimizer = task.build_optimizer(model, cfg.run.lr)
    optimizer.load_state_dict(ckpt.read_state(folder, "state")["optimizer"])
    return task, model, optimizer


# -- the ddpm task at its tiny preset ----------------------------------------------------------------------------
def ddpm_tiny_config(tmp_path: Path, *overrides: str):
    """ddpm's tiny preset with its cache and run folder in ``tmp_path``."""
    return resolve(["task=ddpm", "preset=tiny", f"data.cache={tmp_path / 'cache'}", f"out={tmp_path / 'run'}",
                    "progress=false", *overrides])


def ddpm_tiny_task(tmp_path: Path, *overrides: str):
    """The ddpm task of ``ddpm_tiny_config``, set up (its data read)."""
    from lawa_suite.tasks.ddpm import DdpmTask

    cfg = ddpm_tiny_config(tmp_path, *overrides)
    task = DdpmTask(cfg.task, cfg.run)
    task.setup()
    return task

