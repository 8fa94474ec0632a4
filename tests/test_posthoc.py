"""Post-hoc averaging (`suite average`): the math against online averagers, validation, output safety, determinism."""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import json
import os
import pickle
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from typer.testing import CliRunner

from lawa_suite import posthoc, registry
from lawa_suite.averagers.wma import merge_coefficients
from lawa_suite.cli import app
from lawa_suite.config import ConfigError, resolve
from lawa_suite.export import select_weights
from lawa_suite.posthoc import PosthocError, average, parse_jobs
from lawa_suite.posthoc.writer import in_memory
from lawa_suite.training.loop import train

from helpers import same_bits, tree_digest

runner = CliRunner()


# -- helpers --------------------------------------------------------------------------------------------
def weights_at(step: int, shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, Tensor]:
    """Deterministic weights for a step: fp32 and bf16 floats and an integer counter."""
    g = torch.Generator().manual_seed(step)
    shapes = shapes or {"w": (4, 6), "b": (6,)}
    out = {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}
    out["h"] = torch.randn(5, generator=g).to(torch.bfloat16)
    out["count"] = torch.tensor(step, dtype=torch.int64)
    return out


def write_trajectory(folder: Path, steps: list[int], **kwargs: Any) -> dict[int, dict[str, Tensor]]:
    folder.mkdir(parents=True, exist_ok=True)
    saved = {}
    for step in steps:
        saved[step] = weights_at(step, **kwargs)
        save_file(saved[step], str(folder / f"step-{step:08d}.safetensors"), metadata={"step": str(step)})
    return saved


def online(name: str, saved: dict[int, dict[str, Tensor]], until: int, clock: str = "steps", **config: Any):
    """The online averager fed the saved weights in step order up to ``until`` (steps or observation counts)."""
    averager = registry.averagers.create(name, **config)
    averager.start_run(len(saved))
    for i, step in enumerate(sorted(saved), start=1):
        if step > until:
            break
        averager.observe(step if clock == "steps" else i, saved[step])
    return averager


@pytest.fixture
def traj(tmp_path: Path) -> tuple[Path, dict[int, dict[str, Tensor]]]:
    folder = tmp_path / "traj"
    return folder, write_trajectory(folder, list(range(100, 1001, 100)))


# -- the math ---------------------------------------------------------------------------------------------
def test_lawa_windows_equal_online_lawa_and_the_window_mean(traj, tmp_path):
    folder, saved = traj
    result = average(folder, parse_jobs(["lawa"], {"lawa.k": "3", "lawa.nu": "200"}), tmp_path / "out", interval=400)
    # step 400's window (400, 200, 0) reaches before the first saved step: not ready, no output, no error
    assert result.outputs == {"lawa-k3-nu200": [800]}
    out = load_file(str(tmp_path / "out" / "lawa-k3-nu200" / "step-00000800.safetensors"))
    assert same_bits(out, online("lawa", saved, 800, k=3, nu=200).average())
    brute = (saved[400]["w"] + saved[600]["w"] + saved[800]["w"]) / 3
    torch.testing.assert_close(out["w"], brute)
    assert out["h"].dtype == torch.bfloat16 and out["count"].item() == 800  # ints: copied from the newest


def test_wma_phema_and_bema_post_hoc_equal_their_online_classes(traj, tmp_path):
    """wma's window is LAWA's (in steps); phema's profile is in steps too (dt = the gap between saved steps); bema,
    like EMA, counts observations."""
    folder, saved = traj
    jobs = parse_jobs(["wma", "phema", "bema"], {"wma.k": "3", "wma.nu": "200", "wma.shape": "cosine",
                                                 "phema.sigma_rel": "0.1", "bema.every": "1"})
    result = average(folder, jobs, tmp_path / "out", interval=1000)
    assert set(result.outputs) == {"wma-k3-nu200-shapecosine", "phema-sigma_rel0.1", "bema-every1"}
    wma = load_file(str(tmp_path / "out" / "wma-k3-nu200-shapecosine" / "step-00001000.safetensors"))
    assert same_bits(wma, online("wma", saved, 1000, k=3, nu=200, shape="cosine").average())
    c = merge_coefficients(3, "cosine")  # oldest first: steps 600, 800, 1000
    torch.testing.assert_close(wma["w"], c[0] * saved[600]["w"] + c[1] * saved[800]["w"] + c[2] * saved[1000]["w"])
    phema = load_file(str(tmp_path / "out" / "phema-sigma_rel0.1" / "step-00001000.safetensors"))
    assert same_bits(phema, online("phema", saved, 1000, sigma_rel=[0.1]).average())
    bema = load_file(str(tmp_path / "out" / "bema-every1" / "step-00001000.safetensors"))
    assert same_bits(bema, online("bema", saved, 1000, clock="observations", every=1).average())


def test_ema_and_swa_count_observations_of_saved_steps(traj, tmp_path):
    folder, saved = traj
    jobs = parse_jobs(["ema", "swa"], {"ema.decay": "0.5", "ema.every": "2", "swa.start": "0.5"})
    result = average(folder, jobs, tmp_path / "out", interval=500)
    assert result.outputs == {"ema-decay0.5-every2": [500, 1000], "swa-start0.5": [500, 1000]}
    for job, config in (("ema-decay0.5-every2", {"decay": 0.5, "every": 2}), ("swa-start0.5", {"start": 0.5})):
        name = job.split("-")[0]
        for step in (500, 1000):
            out = load_file(str(tmp_path / "out" / job / f"step-{step:08d}.safetensors"))
            assert same_bits(out, online(name, saved, step, clock="observations", **config).average())
    # SWA from observation 5 of 10 (step 500) to step 1000: the plain mean of six checkpoints
    swa = load_file(str(tmp_path / "out" / "swa-start0.5" / "step-00001000.safetensors"))
    torch.testing.assert_close(swa["w"], torch.stack([saved[s]["w"] for s in range(500, 1001, 100)]).mean(0))


def test_slices_of_large_tensors_give_the_same_bits(tmp_path, monkeypatch):
    # 10,000-element tensors in 4,096-element slices; LAWA with evictions and the exact recompute
    folder = tmp_path / "traj"
    saved = write_trajectory(folder, list(range(1, 13)), shapes={"big": (100, 100), "odd": (4097,)})
    jobs = parse_jobs(["lawa", "ema", "swa"], {"lawa.k": "3", "lawa.nu": "1", "ema.decay": "0.9", "swa.start": "2"})
    average(folder, jobs, tmp_path / "out", limits=posthoc.Limits(block_elements=4096))
    for job, name, config in (("lawa-k3-nu1", "lawa", {"k": 3, "nu": 1}), ("ema-decay0.9", "ema", {"decay": 0.9}),
                              ("swa-start2.0", "swa", {"start": 2})):
        out = load_file(str(tmp_path / "out" / job / "step-00000012.safetensors"))
        assert same_bits(out, online(name, saved, 12, clock="observations", **config).average()), job


def test_real_run_post_hoc_equals_online_bit_for_bit(tmp_path):
    # The toy preset: LAWA k=3 nu=2, EMA decay 0.9, SWA from half of 20 steps; a snapshot every step, so the
    # observation clock of EMA and SWA is the step itself and every averager must match its online twin.
    run = tmp_path / "run"
    train(resolve(["task=toy", f"out={run}", "trajectory.every=1", "eval.every=10"]))
    keys = {"lawa.k": "3", "lawa.nu": "2", "ema.decay": "0.9", "swa.start": "0.5"}
    result = runner.invoke(app, ["average", str(run / "trajectory"), "averager=lawa,ema,swa",
                                 *[f"{k}={v}" for k, v in keys.items()], f"out={tmp_path / 'post'}"])
    assert result.exit_code == 0, result.output
    cfg = resolve(["task=toy", f"out={run}"])
    final = run / "checkpoints" / "step-00000020"
    for name, folder in (("lawa", "lawa-k3-nu2"), ("ema", "ema-decay0.9"), ("swa", "swa-start0.5")):
        held_online, _ = select_weights(final, name, cfg)
        post = load_file(str(tmp_path / "post" / folder / "step-00000020.safetensors"))
        assert same_bits(post, held_online), name


def test_a_grid_averages_reading_each_checkpoint_once(traj, tmp_path, monkeypatch):
    folder, saved = traj
    reads: dict[tuple[int, str], int] = {}
    flat = posthoc.Reader.flat

    def counting(self, name):
        if threading.current_thread() is threading.main_thread():  # the averaging (worker threads check values)
            key = (self.snapshot.step, name)
            reads[key] = reads.get(key, 0) + 1
        return flat(self, name)

    monkeypatch.setattr(posthoc.Reader, "flat", counting)
    jobs = parse_jobs(["lawa", "ema"], {"lawa.k": "2,3", "lawa.nu": "100,200", "ema.decay": "0.9,0.99"})
    result = average(folder, jobs, tmp_path / "out", interval=200)
    assert sorted(result.outputs) == sorted(["lawa-k2-nu100", "lawa-k2-nu200", "lawa-k3-nu100", "lawa-k3-nu200",
                                             "ema-decay0.9", "ema-decay0.99"])
    assert set(reads.values()) == {1} and len(reads) == len(saved) * 4  # once for all six settings
    out = load_file(str(tmp_path / "out" / "lawa-k2-nu200" / "step-00000600.safetensors"))
    assert same_bits(out, online("lawa", saved, 600, k=2, nu=200).average())


SPY_PLUGIN = '''
from dataclasses import dataclass
from lawa_suite.averagers.base import Averager

SEEN = []

class SpyAverager(Averager):
    """A third-party averager: the newest observation, with no elementwise promise; records what it is fed."""
    name = "spy_last"

    @dataclass
    class Config:
        every: int = 1

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._last = []

    @property
    def ready(self):
        return bool(self._last)

    def wants(self, step):
        return step % self.config.every == 0

    def _update(self, step, floats):
        SEEN.append(tuple(floats[0].shape))
        self._last = [t.clone() for t in floats]

    def _averaged_floats(self):
        return [t.clone() for t in self._last]

    def _extra_state(self):
        return {}

    def _load_extra_state(self, state):
        pass
'''


# A step-clocked third-party averager: the mean of the observations at t and t - gap, online from a kept copy,
# post hoc from the input re-read. It plans its own replay, as LAWA does; post hoc names neither.
PAIR_PLUGIN = '''
from dataclasses import dataclass
import torch
from lawa_suite.averagers.base import Averager, ReplayTrack, accumulator_copy

class PairMean(Averager):
    name = "pair"
    elementwise = True
    posthoc_clock = "steps"

    @dataclass
    class Config:
        gap: int = 100

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._read = None
        self._steps, self._kept = [], []

    @classmethod
    def plan_replay(cls, config, steps, targets):
        have = set(steps)
        targets = targets if targets is not None else [steps[-1]]
        ready = [t for t in targets if t - config.gap >= steps[0]]
        problems = [f"step {t} needs step {t - config.gap}" for t in ready if t - config.gap not in have]
        return [ReplayTrack(list(steps), steps[-1], [t for t in ready if t - config.gap in have])], problems

    def replay_from(self, read):
        self._read = read

    def averaged_clocks(self):
        return self._steps[-2:]

    @property
    def ready(self):
        return len(self._steps) >= 2 and self._steps[-1] - self._steps[-2] == self.config.gap

    def wants(self, step):
        return step % self.config.gap == 0

    def _update(self, step, floats):
        self._steps.append(step)
        self._kept = self._kept[-1:] + ([] if self._read else [[t.clone() for t in floats]])

    def _averaged_floats(self):
        first, second = (self._read(s) for s in self._steps[-2:]) if self._read else self._kept[-2:]
        return [(a.float() + b.float()) / 2 for a, b in zip(first, second)]

    def _extra_state(self):
        return {}

    def _load_extra_state(self, state):
        pass
'''


def install_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, source: str, name: str,
                   target: str) -> None:
    """``source`` installed as a real third-party plugin: a fake distribution with an entry point."""
    root = tmp_path / f"site-{module}"
    info = root / f"{module}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[lawa_suite.averagers]\n{name} = {module}:{target}\n")
    (root / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    registry.averagers.reset()


@pytest.fixture
def spy_plugin(tmp_path, monkeypatch):
    """``spy_last`` installed as a real third-party plugin (a fake distribution with an entry point)."""
    install_plugin(tmp_path, monkeypatch, "fake_spy_plugin", SPY_PLUGIN, "spy_last", "SpyAverager")
    yield
    sys.modules.pop("fake_spy_plugin", None)
    registry.averagers.reset()


@pytest.fixture
def pair_plugin(tmp_path, monkeypatch):
    install_plugin(tmp_path, monkeypatch, "fake_pair_plugin", PAIR_PLUGIN, "pair", "PairMean")
    yield
    sys.modules.pop("fake_pair_plugin", None)
    registry.averagers.reset()


def test_a_step_clocked_plugin_plans_its_own_replay_with_a_grid_an_interval_and_manifests(traj, tmp_path,
                                                                                         pair_plugin):
    folder, saved = traj
    result = average(folder, parse_jobs(["pair"], {"pair.gap": "100,200"}), tmp_path / "out", interval=400)
    assert result.outputs == {"pair-gap100": [400, 800], "pair-gap200": [400, 800]}
    for gap in (100, 200):
        manifest = json.loads((tmp_path / "out" / f"pair-gap{gap}" / "manifest.json").read_text())
        assert manifest["averager"] == "pair" and manifest["clock"] == "steps" and manifest["config"] == {"gap": gap}
        assert [o["inputs"] for o in manifest["outputs"]] == [[400 - gap, 400], [800 - gap, 800]]
        for step in (400, 800):
            out = load_file(str(tmp_path / "out" / f"pair-gap{gap}" / f"step-{step:08d}.safetensors"))
            a, b = saved[step - gap], saved[step]
            expected = {n: ((a[n].float() + b[n].float()) / 2).to(a[n].dtype) if a[n].is_floating_point() else b[n]
                        for n in a}
            assert same_bits(out, expected), (gap, step)
    with pytest.raises(PosthocError, match=r"pair-gap300: step 700 needs step 400"):  # its own problems, named
        average(write_folder_without(folder, tmp_path / "gappy", 400), parse_jobs(["pair"], {"pair.gap": "300"}),
                tmp_path / "bad", interval=700)


def write_folder_without(folder: Path, into: Path, step: int) -> Path:
    into.mkdir()
    for f in folder.iterdir():
        if f"{step:08d}" not in f.name:
            (into / f.name).write_bytes(f.read_bytes())
    return into


def test_a_plugin_averager_works_post_hoc_and_sees_whole_tensors(tmp_path, spy_plugin):
    folder = tmp_path / "traj"
    saved = write_trajectory(folder, [1, 2, 3, 4], shapes={"big": (90, 100)})
    result = average(folder, parse_jobs(["spy_last"], {"spy_last.every": "2"}), tmp_path / "out", interval=2,
                     limits=posthoc.Limits(block_elements=4096))
    assert result.outputs == {"spy_last-every2": [2, 4]}
    out = load_file(str(tmp_path / "out" / "spy_last-every2" / "step-00000004.safetensors"))
    assert same_bits(out, saved[4])
    import fake_spy_plugin
    assert (90, 100) in fake_spy_plugin.SEEN  # not elementwise: fed whole tensors, never slices
    # its arithmetic is its own, so NaN/Inf are found in every input before it sees any, the one it never averages
    # too: that input is left out (and named), and the outputs are those of the healthy inputs
    broken = load_file(str(folder / "step-00000003.safetensors"))
    broken["big"][89, 99] = float("nan")
    save_file(broken, str(folder / "step-00000003.safetensors"))
    logged = []
    result = average(folder, parse_jobs(["spy_last"], {"spy_last.every": "2"}), tmp_path / "bad", interval=2,
                     limits=posthoc.Limits(block_elements=4096), log=logged.append)
    assert result.outputs == {"spy_last-every2": [2, 4]} and result.left_out == {3: "NaN or Inf in big"}
    assert "left out step-00000003.safetensors: NaN or Inf in big" in logged
    assert same_bits(load_file(str(tmp_path / "bad" / "spy_last-every2" / "step-00000004.safetensors")), saved[4])


# -- inputs ---------------------------------------------------------------------------------------------------
def test_hugging_face_folders_sharded_and_not(tmp_path):
    flat, hf = tmp_path / "flat", tmp_path / "hf"
    saved = write_trajectory(flat, [1000, 2000, 3000])
    hf.mkdir()
    (hf / "checkpoint-1000").mkdir()
    save_file(saved[1000], str(hf / "checkpoint-1000" / "model.safetensors"))
    (hf / "checkpoint-1000" / "config.json").write_text("{}")
    (hf / "step2000").mkdir()  # Pythia-style revision name, sharded
    names = sorted(saved[2000])
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    for shard, keys in shards.items():
        save_file({k: saved[2000][k] for k in keys}, str(hf / "step2000" / shard))
    (hf / "step2000" / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}))
    save_file(saved[3000], str(hf / "step-3000.safetensors"))
    jobs = parse_jobs(["lawa"], {"lawa.k": "3", "lawa.nu": "1000"})
    average(flat, jobs, tmp_path / "a")
    average(hf, jobs, tmp_path / "b")
    a = load_file(str(tmp_path / "a" / "lawa-k3-nu1000" / "step-00003000.safetensors"))
    b = load_file(str(tmp_path / "b" / "lawa-k3-nu1000" / "step-00003000.safetensors"))
    assert same_bits(a, b)


def test_suite_checkpoints_folder_and_its_recorded_hashes(tmp_path):
    run = tmp_path / "run"
    train(resolve(["task=toy", f"out={run}", "checkpoint.every=5", "checkpoint.keep=10", "eval.every=10"]))
    ckpts = run / "checkpoints"
    ok = average(ckpts, parse_jobs(["lawa"], {"lawa.k": "2", "lawa.nu": "5"}), tmp_path / "ok")
    assert ok.steps == [5, 10, 15, 20] and ok.outputs == {"lawa-k2-nu5": [20]}
    # same size, one flipped byte in the data: only the recorded sha256 can tell, read in full (--hash-inputs)
    model = ckpts / "step-00000010" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-3] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(PosthocError, match=r"step-00000010/model.safetensors: sha256 differs"):
        average(ckpts, parse_jobs(["lawa"], {"lawa.k": "2", "lawa.nu": "5"}), tmp_path / "bad", hash_inputs=True)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))
    # listed beside the other problems
    with pytest.raises(PosthocError) as info:
        average(ckpts, parse_jobs(["lawa"], {"lawa.k": "2", "lawa.nu": "5"}), tmp_path / "bad", interval=4,
                hash_inputs=True)
    assert "sha256 differs" in str(info.value) and "interval=4 asks for step(s) 8, 12, 16" in str(info.value)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_torch_files_need_the_flag_and_never_unpickle_code(tmp_path):
    folder = tmp_path / "pt"
    folder.mkdir()
    saved = {s: weights_at(s) for s in (1, 2)}
    for s, w in saved.items():
        torch.save(w, folder / f"step-{s}.pt")
    jobs = parse_jobs(["lawa"], {"lawa.k": "2", "lawa.nu": "1"})
    with pytest.raises(PosthocError, match=r"step-1.pt, step-2.pt: a pickle-based file; pass --allow-torch-load"):
        average(folder, jobs, tmp_path / "out")
    average(folder, jobs, tmp_path / "out", allow_torch_load=True)
    out = load_file(str(tmp_path / "out" / "lawa-k2-nu1" / "step-00000002.safetensors"))
    assert same_bits(out, online("lawa", saved, 2, k=2, nu=1).average())

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    with open(folder / "step-3.pt", "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(PosthocError, match=r"step-3.pt: unreadable"):
        average(folder, jobs, tmp_path / "out2", allow_torch_load=True)
    assert not marker.exists() and not (tmp_path / "out2").exists()


def _every_format(nonfinite: bool) -> dict[str, Tensor]:
    """One tensor per dtype post-hoc averaging reads (empty and 0-dim ones too), each float one holding
    NaN or Inf past the first scan piece when ``nonfinite``."""
    g = torch.Generator().manual_seed(0)
    floats = {f"f_{str(d).removeprefix('torch.')}": torch.randn(3000, generator=g).to(d)
              for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16,
                        torch.float8_e4m3fn, torch.float8_e5m2)}
    if nonfinite:
        for name, t in floats.items():
            bits = t.view(torch.uint8) if t.element_size() == 1 else None
            if bits is not None:  # float8: e4m3fn has no Inf, its NaN is S.1111.111; e5m2 Inf is S.11111.00
                bits[2999] = 0x7F if "e4m3" in name else 0x7C
            else:
                t[2999] = float("inf") if t.dtype == torch.float16 else float("nan")
    others = {"i_bool": torch.tensor([True, False]), "i_uint8": torch.arange(7, dtype=torch.uint8),
              "i_int32": torch.arange(5, dtype=torch.int32), "i_scalar": torch.tensor(3),
              "f_empty": torch.zeros(0, 4), "f_scalar": torch.tensor(1.5)}
    return {**floats, **others}


@pytest.mark.parametrize("nonfinite", [False, True])
def test_nan_and_inf_are_found_in_every_float_format(tmp_path, nonfinite):
    path = tmp_path / "step-1.safetensors"
    save_file(_every_format(nonfinite), str(path))
    reader = posthoc.Reader(posthoc.Snapshot(1, path.name, (path.resolve(),)))
    try:
        # 4 KiB pieces: several per tensor, so the bad value is in a later one
        found = posthoc.nonfinite_keys(reader, sorted(reader.layout), check_bytes=4096)
    finally:
        reader.close()
    floats = sorted(n for n in _every_format(False) if n.startswith("f_") and n not in ("f_empty", "f_scalar"))
    assert found == (floats if nonfinite else [])


def test_input_hashes_cover_every_byte_including_tensors_the_reader_skips(tmp_path):
    path = tmp_path / "step-1.safetensors"
    skipped = {"z_complex": torch.ones(3, dtype=torch.complex64)}  # a dtype post-hoc averaging does not handle
    save_file({**_every_format(False), **skipped}, str(path), metadata={"note": "x" * 13})
    reader = posthoc.Reader(posthoc.Snapshot(1, path.name, (path.resolve(),)))
    try:
        assert "z_complex" not in reader.layout and any("z_complex has dtype C64" in p for p in reader.problems)
        assert posthoc.hash_input(reader, path.resolve()) == hashlib.sha256(path.read_bytes()).hexdigest()
    finally:
        reader.close()


# -- validation: one error listing everything, nothing written, inputs untouched -----------------------------
def _break(kind: str, folder: Path) -> str:
    """Damage a 10-step trajectory one way; return the text the error must contain."""
    path = folder / "step-00000500.safetensors"
    w = load_file(str(path))
    if kind == "missing key":
        del w["b"]
        expect = "step-00000500.safetensors: missing keys b"
    elif kind == "extra key":
        w["stray"] = torch.zeros(2)
        expect = "step-00000500.safetensors: extra keys stray"
    elif kind == "broadcastable shape":
        w["b"] = torch.zeros(1)
        expect = "step-00000500.safetensors: key b has shape [1], the others [6]"
    elif kind == "dtype":
        w["b"] = w["b"].to(torch.bfloat16)
        expect = "step-00000500.safetensors: key b has dtype BF16, the others F32"
    elif kind in ("nan", "inf"):
        w["w"][1, 2] = float("nan") if kind == "nan" else float("-inf")
        w["h"][0] = float("inf")
        expect = "step-00000500.safetensors: NaN or Inf in h, w"
    elif kind == "missing window step":
        path.unlink()
        return "the window of step 800 needs step(s) 500"
    elif kind == "symlink outside":
        outside = folder.parent / "elsewhere"
        outside.mkdir()
        save_file(w, str(outside / "x.safetensors"))
        (folder / "step-00001100.safetensors").symlink_to(outside / "x.safetensors")
        return "step-00001100.safetensors: a link that leads outside the input folder"
    elif kind == "dotdot shard":
        shard_dir = folder / "step-00001100"
        shard_dir.mkdir()
        save_file(w, str(folder.parent / "secret.safetensors"))
        (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            k: "../../secret.safetensors" for k in w}}))
        return "shard '../../secret.safetensors' lies outside the checkpoint folder"
    elif kind == "garbage file":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
        return "step-00000500.safetensors: unreadable"
    elif kind == "truncated file":
        path.write_bytes(path.read_bytes()[:-8])
        return "step-00000500.safetensors: unreadable"
    elif kind == "step saved twice":
        (folder / "checkpoint-500").mkdir()
        save_file(w, str(folder / "checkpoint-500" / "model.safetensors"))
        return "step 500 is saved twice"
    elif kind == "metadata step":
        save_file(w, str(path), metadata={"step": "7"})
        return "named step 500, but its metadata says step 7"
    else:
        raise AssertionError(kind)
    save_file(w, str(path), metadata={"step": "500"})
    return expect


@pytest.mark.parametrize("kind", ["missing key", "extra key", "broadcastable shape", "dtype",
                                  "missing window step", "symlink outside", "dotdot shard", "garbage file",
                                  "truncated file", "step saved twice", "metadata step"])
def test_each_validation_failure_is_named_and_nothing_is_written(traj, tmp_path, kind):
    folder, _ = traj
    expect = _break(kind, folder)
    before = tree_digest(folder)
    with pytest.raises(PosthocError) as info:
        average(folder, parse_jobs(["lawa", "ema"], {"lawa.k": "4", "lawa.nu": "100"}), tmp_path / "out", interval=400)
    message = str(info.value)
    assert expect in message and "nothing was written" in message and "\n" not in message
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    assert tree_digest(folder) == before


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_an_input_holding_nan_or_inf_is_left_out_and_named(traj, tmp_path, kind):
    """Not a problem that stops the command: the input is left out, the outputs that would stand for it are not
    written (LAWA's window of step 800 holds step 500), the others are, and the inputs are untouched."""
    folder, _ = traj
    expect = _break(kind, folder)
    before = tree_digest(folder)
    result = average(folder, parse_jobs(["lawa", "ema"], {"lawa.k": "4", "lawa.nu": "100"}), tmp_path / "out",
                     interval=400)
    assert result.left_out == {500: expect.partition(": ")[2]}
    assert result.outputs == {"lawa-k4-nu100": [400], "ema": [400, 800]}
    assert tree_digest(folder) == before


def test_all_problems_come_in_one_error(traj, tmp_path):
    folder, _ = traj
    expected = [_break("missing key", folder), _break("symlink outside", folder)]
    w = load_file(str(folder / "step-00000300.safetensors"))
    w["w"][0, 0] = float("nan")
    w["b"] = torch.zeros(1)  # broadcastable: must not slip through
    save_file(w, str(folder / "step-00000300.safetensors"))
    with pytest.raises(PosthocError) as info:
        average(folder, parse_jobs(["lawa"], {"lawa.k": "2", "lawa.nu": "100"}), tmp_path / "out", interval=250)
    message = str(info.value)
    for part in expected + ["step-00000300.safetensors: key b has shape [1], the others [6]",
                            "interval=250 asks for step(s) 250, 750", "step-00000300.safetensors: NaN or Inf in w"]:
        assert part in message, part
    # one problem a line, the files' in step order (then the rest), each line naming its file
    head, *lines = message.split("\n  ")
    assert head.startswith("5 problems with ") and len(lines) == 5 and not any("\n" in line for line in lines)
    steps = [int(line[5:13]) for line in lines if line.startswith("step-")]
    assert steps == sorted(steps) and len(steps) == 4 and lines[-1].startswith("interval=250")


def test_lawa_window_before_the_first_step_or_never_fitting(traj, tmp_path):
    folder, _ = traj
    with pytest.raises(PosthocError, match=r"lawa-k20-nu100: no window fits"):
        average(folder, parse_jobs(["lawa"], {"lawa.k": "20", "lawa.nu": "100"}), tmp_path / "out")
    with pytest.raises(PosthocError, match=r"no saved step is a multiple of nu=3000"):
        average(folder, parse_jobs(["lawa"], {"lawa.k": "1", "lawa.nu": "3000"}), tmp_path / "out")
    # interval not a multiple of nu: windows on another residue class (t, t - nu, ...) still work
    result = average(folder, parse_jobs(["lawa"], {"lawa.k": "2", "lawa.nu": "200"}), tmp_path / "out", interval=300)
    assert result.outputs == {"lawa-k2-nu200": [300, 600, 900]}


def test_bad_settings_are_one_line_config_errors():
    with pytest.raises(ConfigError, match=r"lawa.k: expected an integer >= 1, got 0"):
        parse_jobs(["lawa"], {"lawa.k": "2,0"})
    with pytest.raises(ConfigError, match=r"lawa.kk: unknown key for averager 'lawa'; known: k, nu"):
        parse_jobs(["lawa"], {"lawa.kk": "2"})
    with pytest.raises(ConfigError, match=r"ema.decay: averager 'ema' is not selected"):
        parse_jobs(["lawa"], {"ema.decay": "0.9"})
    with pytest.raises(ConfigError, match=r"averager: .*nosuch"):
        parse_jobs(["nosuch"], {})
    with pytest.raises(ConfigError, match=r"task: not a key of suite average"):
        posthoc.parse_command(["averager=lawa", "out=x", "task=toy"])
    with pytest.raises(ConfigError, match=r"interval: expected an integer >= 1"):
        posthoc.parse_command(["averager=lawa", "out=x", "interval=-3"])


# -- output safety ----------------------------------------------------------------------------------------------
def test_output_inside_or_around_the_input_or_existing_is_refused(traj, tmp_path):
    folder, _ = traj
    jobs = parse_jobs(["ema"], {})
    with pytest.raises(PosthocError, match=r"is or lies in the input"):
        average(folder, jobs, folder / "avg")
    with pytest.raises(PosthocError, match=r"holds the input"):
        average(folder, jobs, tmp_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(PosthocError, match=r"already exists and is not empty; choose another folder or pass --force"):
        average(folder, jobs, tmp_path / "taken")
    # --force replaces only a folder suite average made: the old code deleted the user's keep.txt here
    with pytest.raises(PosthocError, match=r"was not made by suite average \(no suite-output.json says"):
        average(folder, jobs, tmp_path / "taken", force=True)
    assert sorted(p.name for p in (tmp_path / "taken").iterdir()) == ["keep.txt"]
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    average(folder, jobs, tmp_path / "made")
    assert json.loads((tmp_path / "made" / "suite-output.json").read_text())["command"] == "suite average"
    average(folder, parse_jobs(["swa"], {}), tmp_path / "made", force=True)
    assert sorted(p.name for p in (tmp_path / "made").iterdir()) == ["manifest.json", "suite-output.json", "swa"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".taken", ".made"))]  # no staging or old copy


def test_manifests_record_inputs_outputs_and_settings(traj, tmp_path):
    folder, _ = traj
    average(folder, parse_jobs(["lawa"], {"lawa.k": "2", "lawa.nu": "200"}), tmp_path / "out", interval=400)
    manifest = json.loads((tmp_path / "out" / "lawa-k2-nu200" / "manifest.json").read_text())
    from lawa_suite import __version__
    assert manifest["suite_version"] == __version__ and manifest["averager"] == "lawa"
    assert manifest["config"]["k"] == 2 and manifest["config"]["nu"] == 200 and manifest["interval"] == 400
    outputs = {o["step"]: o for o in manifest["outputs"]}
    assert sorted(outputs) == [400, 800] and outputs[800]["inputs"] == [600, 800]
    out_file = tmp_path / "out" / "lawa-k2-nu200" / "step-00000800.safetensors"
    assert outputs[800]["sha256"] == hashlib.sha256(out_file.read_bytes()).hexdigest()
    for step in ("200", "400", "600", "800"):  # written by safetensors itself: no sha256 recorded, none read
        entry = manifest["inputs"][step][0]
        stat = (folder / entry["file"]).stat()
        assert (entry["size"], entry["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns) and "sha256" not in entry
    top = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [i["step"] for i in top["inputs"]] == list(range(100, 1001, 100))


def test_output_bytes_do_not_depend_on_runs_or_directory_order(traj, tmp_path, monkeypatch):
    folder, _ = traj
    jobs = parse_jobs(["lawa", "ema", "swa"], {"lawa.k": "3", "lawa.nu": "100", "swa.start": "0.3"})
    average(folder, jobs, tmp_path / "first", interval=300)
    average(folder, jobs, tmp_path / "second", interval=300)
    listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda path: list(reversed(listdir(path))))
    average(folder, jobs, tmp_path / "reversed", interval=300)
    first = tree_digest(tmp_path / "first", ignore_sums_dates=True)
    assert len(first) == 2 + 3 * 5  # top manifest and mark + per averager: manifest, SHA256SUMS, 3 derived checkpoints
    assert all(tree_digest(tmp_path / name, ignore_sums_dates=True) == first for name in ("second", "reversed"))


def test_output_bytes_do_not_depend_on_how_many_threads_average(tmp_path):
    folder = tmp_path / "traj"
    write_trajectory(folder, list(range(100, 1001, 100)), shapes={"w": (50, 300), "b": (7,)})  # w: 4 slices below
    jobs = parse_jobs(["lawa", "ema", "swa"], {"lawa.k": "3", "lawa.nu": "100", "swa.start": "0.3"})
    for threads, batch in ((1, 1), (2, 1), (2, 3), (5, 2)):  # batches of 3 slices: b with w's first two, ...
        average(folder, jobs, tmp_path / f"t{threads}-{batch}", interval=300,
                limits=posthoc.Limits(block_elements=4096, average_threads=threads, batch_slices=batch))
    reference = tree_digest(tmp_path / "t1-1", ignore_sums_dates=True)
    assert all(tree_digest(tmp_path / name, ignore_sums_dates=True) == reference for name in ("t2-1", "t2-3", "t5-2"))


@pytest.mark.parametrize("how", ["direct", "no O_DIRECT", "refused at open", "refused at write", "reopened"])
def test_output_bytes_do_not_depend_on_how_they_reach_the_disk(traj, tmp_path, monkeypatch, how):
    folder, _ = traj
    jobs = parse_jobs(["lawa", "ema"], {"lawa.k": "3", "lawa.nu": "100"})
    average(folder, jobs, tmp_path / "reference", interval=300)
    # a 64 KiB buffer (several flushes per file), also for the smallest buffer the budget allows
    limits = posthoc.Limits(direct_buffer=16 * 4096, block_budget=1)
    real_open, real_write = os.open, os.write
    direct = getattr(os, "O_DIRECT", 0)
    if how == "no O_DIRECT":
        monkeypatch.delattr(os, "O_DIRECT", raising=False)
    elif how == "refused at open":  # as tmpfs did before Linux 6.6: the file is created, then EINVAL
        def refusing_open(path, flags, *args):
            if flags & direct:
                real_open(path, flags & ~direct, *args)
                raise OSError(22, "Invalid argument")
            return real_open(path, flags, *args)
        monkeypatch.setattr(os, "open", refusing_open)
    elif how == "refused at write":
        def refusing_write(fd, data):
            if direct and fcntl.fcntl(fd, fcntl.F_GETFL) & direct:
                raise OSError(22, "Invalid argument")
            return real_write(fd, data)
        monkeypatch.setattr(os, "write", refusing_write)
    elif how == "reopened":  # more outputs than open descriptors allowed: each write reopens its file
        limits = posthoc.Limits(direct_buffer=16 * 4096, block_budget=1, max_open_outputs=1)
    average(folder, jobs, tmp_path / "out", interval=300, limits=limits)
    reference = tree_digest(tmp_path / "reference", ignore_sums_dates=True)
    assert tree_digest(tmp_path / "out", ignore_sums_dates=True) == reference


@pytest.mark.skipif(not os.path.isdir("/dev/shm") or not in_memory(Path("/dev/shm")),
                    reason="needs a tmpfs at /dev/shm (Linux)")
def test_outputs_on_tmpfs_skip_o_direct_and_are_the_same_bytes(traj, tmp_path, monkeypatch):
    folder, _ = traj
    jobs = parse_jobs(["lawa", "ema"], {"lawa.k": "3", "lawa.nu": "100"})
    average(folder, jobs, tmp_path / "reference", interval=300)
    flags_seen, real_open = [], os.open
    monkeypatch.setattr(os, "open", lambda path, flags, *args, **kwargs: flags_seen.append(flags)
                        or real_open(path, flags, *args, **kwargs))
    memory = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        average(folder, jobs, memory / "out", interval=300)
        reference = tree_digest(tmp_path / "reference", ignore_sums_dates=True)
        assert tree_digest(memory / "out", ignore_sums_dates=True) == reference
    finally:
        shutil.rmtree(memory)
    assert flags_seen and not any(f & getattr(os, "O_DIRECT", 0) for f in flags_seen)
    assert not in_memory(Path("/proc"))  # procfs: neither tmpfs nor ramfs


_FAULTS_OF_SLICES = '''
import ctypes, resource, sys, torch
from lawa_suite.posthoc.limits import keep_slices_in_heap
if sys.argv[1] == "tuned":
    applied = keep_slices_in_heap()
else:  # the control: every slice mapped fresh and unmapped when freed (an explicit threshold: glibc's default one
    # moves as chunks are freed, so an untuned process faults a round's pages anew only most of the time)
    applied = bool(ctypes.CDLL(None).mallopt(-3, 1 << 20))  # M_MMAP_THRESHOLD = 1 MiB
x = torch.ones(1 << 19)
counts = []
for _ in range(3):  # 24 slices of 2 MiB waiting for the writers, then written and freed, three times
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    held = [x * 2 for _ in range(24)]
    del held
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, *counts)
'''


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's allocator; elsewhere it does nothing")
def test_keep_slices_in_heap_keeps_freed_slices_mapped():
    def faults(mode: str) -> tuple[str, list[int]]:
        done = subprocess.run([sys.executable, "-c", _FAULTS_OF_SLICES, mode], capture_output=True, text=True,
                              check=True)
        applied, *counts = done.stdout.split()
        return applied, [int(c) for c in counts]
    (mapped_applied, mapped), (tuned_applied, tuned) = faults("mmap"), faults("tuned")
    assert (mapped_applied, tuned_applied) == ("True", "True")
    # 48 MiB is 12,288 pages: each round faults them in anew when freed memory goes back to the kernel, as it always
    # does in the control. A tuned round after the first may still fault a few hundred pages where the heap's top
    # moves (512 in CI, 1,024 here), so the bound is a quarter of a round, not a fixed count.
    assert all(count > 10_000 for count in mapped), mapped
    assert tuned[0] > 10_000 and all(later < tuned[0] // 4 for later in tuned[1:]), tuned


# -- the command line -------------------------------------------------------------------------------------------
def test_cli_average_leaves_the_allocator_alone(traj, tmp_path, monkeypatch):
    # the glibc tweak is process-wide and for good: an opt-in for a process that only averages (the benchmark),
    # never something `suite average` does to the process that called it (scoring, tests, a notebook)
    import lawa_suite.posthoc.limits as limits
    calls = []
    monkeypatch.setattr(limits, "keep_slices_in_heap", lambda: calls.append(1) or True)
    folder, _ = traj
    result = runner.invoke(app, ["average", str(folder), "averager=ema", f"out={tmp_path / 'e'}"])
    assert result.exit_code == 0, result.output
    assert calls == []


def test_cli_average_grid_and_errors(traj, tmp_path):
    folder, _ = traj
    result = runner.invoke(app, ["average", str(folder), "averager=lawa", "lawa.k=2,3", "lawa.nu=100",
                                 "interval=500", f"out={tmp_path / 'g'}"])
    assert result.exit_code == 0, result.output
    assert "lawa-k2-nu100: 2 derived checkpoint(s) at step(s) 500, 1000" in result.output
    assert (tmp_path / "g" / "lawa-k3-nu100" / "step-00001000.safetensors").is_file()
    bad = runner.invoke(app, ["average", str(folder), "averager=lawa", "lawa.k=abc", f"out={tmp_path / 'x'}"])
    assert bad.exit_code == 2 and "lawa.k" in bad.output and len(bad.output.strip().splitlines()) == 1
    again = runner.invoke(app, ["average", str(folder), "averager=ema", f"out={tmp_path / 'g'}"])
    assert again.exit_code == 2 and "already exists" in again.output
    forced = runner.invoke(app, ["average", str(folder), "averager=ema", f"out={tmp_path / 'g'}", "--force"])
    assert forced.exit_code == 0 and not (tmp_path / "g" / "lawa-k3-nu100").exists()


def test_cli_average_then_eval_writes_the_raw_versus_averaged_report(tmp_path):
    run = tmp_path / "run"
    train(resolve(["task=toy", f"out={run}", "trajectory.every=2", "eval.every=10"]))
    out = tmp_path / "post"
    result = runner.invoke(app, ["average", str(run), "averager=lawa,ema", "lawa.k=3", "lawa.nu=2", "interval=10",
                                 f"out={out}", "eval=true", "eval.bn_batches=1"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {(r["step"], r["weights"]) for r in records} == {(s, w) for s in (10, 20)
                                                            for w in ("raw", "lawa-k3-nu2", "ema")}
    assert all(0 <= r["accuracy"] <= 1 for r in records)
    # the raw scores are the ones the training run logged at the same steps (same batches, same weights)
    logged = {r["step"]: r["accuracy"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if r.get("weights") == "raw" and r.get("split") == "val"}
    assert all(r["accuracy"] == logged[r["step"]] for r in records if r["weights"] == "raw")
    report = (out / "report.md").read_text()
    assert "| lawa-k3-nu2 |" in report and (out / "curves.png").stat().st_size > 0
    rerun = runner.invoke(app, ["eval", str(out)])
    assert rerun.exit_code == 0 and "report:" in rerun.output
    orphan = runner.invoke(app, ["eval", str(tmp_path)])
    assert orphan.exit_code == 2 and "not a suite average output" in orphan.output
    typo = runner.invoke(app, ["average", str(run), "averager=ema", f"out={tmp_path / 'never'}", "eval=true",
                               "eval.batchez=1"])
    assert typo.exit_code == 2 and "eval.batchez" in typo.output and not (tmp_path / "never").exists()


def test_an_average_that_is_its_first_checkpoint_in_all_but_name_is_called_out(traj, tmp_path):
    # decay 0.999 was chosen per optimizer step; over 10 saved checkpoints the EMA is 99.1% the first one
    folder, _ = traj
    said: list[str] = []
    jobs = parse_jobs(["ema", "lawa"], {"ema.decay": "0.999,0.5", "lawa.k": "3", "lawa.nu": "100"})
    average(folder, jobs, tmp_path / "out", log=said.append)
    warned = [line for line in said if line.startswith("warning: ")]
    assert len(warned) == 1 and warned[0].startswith("warning: ema-decay0.999: 1 output(s) give most of their weight")
    assert "gives 99.1% to step 100, of the 10 checkpoints it averages" in warned[0]  # 0.999 ** 9
    assert "averages over about 1,000 observations (1/(1 - decay))" in warned[0]
    manifest = json.loads((tmp_path / "out" / "ema-decay0.999" / "manifest.json").read_text())
    assert manifest["warnings"] == [warned[0].removeprefix("warning: ")]
    assert "warnings" not in json.loads((tmp_path / "out" / "ema-decay0.5" / "manifest.json").read_text())


def test_tensors_at_unaligned_offsets_are_read_right(tmp_path):
    """The reader maps each safetensors file once and views tensors in it; a writer that does not align a tensor to
    its element size (a 3-byte U8 tensor before an F32 one) still gets its values read, through a copy."""
    import struct

    def write(path: Path, values: list[float]) -> None:
        head = {"b": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
                "f": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]}}
        text = json.dumps(head).encode()
        text += b" " * (-len(text) % 8)
        data = bytes([1, 2, 3]) + torch.tensor(values, dtype=torch.float32).numpy().tobytes()
        path.write_bytes(struct.pack("<Q", len(text)) + text + data)

    (tmp_path / "in").mkdir()
    write(tmp_path / "in" / "step-1.safetensors", [1.5, -2.0])
    write(tmp_path / "in" / "step-2.safetensors", [2.5, 4.0])
    result = runner.invoke(app, ["average", str(tmp_path / "in"), "averager=lawa", "lawa.k=2", "lawa.nu=1",
                                 f"out={tmp_path / 'out'}"])
    assert result.exit_code == 0, result.output
    out = load_file(str(tmp_path / "out" / "lawa-k2-nu1" / "step-00000002.safetensors"))
    assert out["f"].tolist() == [2.0, 1.0] and out["b"].tolist() == [1, 2, 3]
