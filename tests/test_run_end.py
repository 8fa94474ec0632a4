"""What a run leaves behind when it ends: no averager's background thread, whether it ended well, with an error or
by a stop; and the loop checks every averager's snapshot folder through the averager contract."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lawa_suite import registry
from lawa_suite.averagers.base import Averager, SnapshotFolder
from lawa_suite.config import ConfigError, resolve
from lawa_suite.training.loop import Preempted, train

from conftest import SimulatedCrash, ToyTask

WINDOW_THREADS = ("lawa-window", "wma-window")


@pytest.fixture
def kept(monkeypatch) -> list[Averager]:
    """Every averager a run builds, kept referenced after it: a thread must end because the run closed its
    averager, not because the averager happened to be collected first."""
    built: list[Averager] = []
    start_run = Averager.start_run

    def keep(self, total_steps):
        built.append(self)
        return start_run(self, total_steps)
    monkeypatch.setattr(Averager, "start_run", keep)
    return built


def window_threads(before: set[threading.Thread]) -> list[str]:
    """The averagers' window threads alive now that were not alive at ``before`` (``threading.enumerate()``)."""
    return [t.name for t in threading.enumerate() if t.name.startswith(WINDOW_THREADS) and t not in before]


def run(out: Path, *overrides: str):
    # lawa's store=cpu sums its window on its own thread; wma's store=disk writes its files on its own thread
    return train(resolve(["task=toy", f"out={out}", "steps=8", "eval.every=4", "averager=lawa,wma", "lawa.nu=1",
                          "lawa.k=2", "wma.k=2", "wma.nu=1", "wma.store=disk", *overrides]))


def test_no_window_thread_outlives_a_run(tmp_path, kept):
    before = set(threading.enumerate())
    assert run(tmp_path / "run").step == 8
    assert [type(a).__name__ for a in kept] == ["LAWA", "WMA"]
    assert window_threads(before) == []


def test_negative_control_the_threads_are_there_without_close(tmp_path, kept, monkeypatch):
    # proves the test above can fail: with close() doing nothing, both threads outlive the run
    for name in ("lawa", "wma"):
        monkeypatch.setattr(registry.averagers.get(name), "close", lambda self: None)
    before = set(threading.enumerate())
    run(tmp_path / "run")
    assert sorted(name.split("_")[0] for name in window_threads(before)) == ["lawa-window", "wma-window"]


def test_no_window_thread_outlives_a_run_that_fails(tmp_path, kept):
    before = set(threading.enumerate())
    ToyTask.crash_at = 5
    with pytest.raises(SimulatedCrash):
        run(tmp_path / "run")
    assert window_threads(before) == []


def test_no_window_thread_outlives_a_stopped_run(tmp_path, kept):
    before = set(threading.enumerate())
    ToyTask.sigterm_at = 5
    with pytest.raises(Preempted):
        run(tmp_path / "run")
    assert window_threads(before) == []


@dataclass
class _NoConfig:
    pass


class NoClose:
    """A plugin written before ``Averager.close`` existed: the whole contract but close (not a subclass)."""


def test_a_plugin_without_close_ends_its_run(tmp_path):
    from lawa_suite.averagers import base

    # every member of the base class but close, on a class that does not subclass it
    members = {name: getattr(base.Averager, name) for name in [*base.CONTRACT, "__init__", "_average_view"]
               if name != "Config"}
    members.update(name="noclose", Config=_NoConfig, ready=property(lambda self: False),
                   wants=lambda self, step: False, _extra_state=lambda self: {},
                   _load_extra_state=lambda self, state: None)
    plugin = type("NoClose", (), members)
    assert not hasattr(plugin, "close")
    registry.averagers.register("noclose")(plugin)
    try:
        result = train(resolve(["task=toy", f"out={tmp_path / 'run'}", "steps=4", "averager=noclose"]))
    finally:
        registry.averagers._builtins.pop("noclose", None)
    assert result.step == 4


# -- snapshot folders through the contract ------------------------------------------------------------------------
class Folders(Averager):
    """A plugin keeping its own files in a folder it names (not LAWA's ``dir``)."""

    name = "folders"

    @dataclass
    class Config:
        cache: str = ""

    ready = False

    def wants(self, step): return False
    def _update(self, step, floats): pass
    def _averaged_floats(self): return []
    def _extra_state(self): return {}
    def _load_extra_state(self, state): pass

    def snapshot_folder(self) -> SnapshotFolder | None:
        return SnapshotFolder("cache", Path(self.config.cache)) if self.config.cache else None


def test_a_plugins_snapshot_folder_gets_the_same_checks_as_lawas(tmp_path):
    registry.averagers.register("folders")(Folders)
    try:
        folder = tmp_path / "snaps"
        with pytest.raises(ConfigError, match=r"^folders\.cache: .* is lawa's snapshot folder too") as info:
            train(resolve(["task=toy", f"out={tmp_path / 'run'}", "averager=lawa,folders", "lawa.store=disk",
                           f"lawa.dir={folder}", f"folders.cache={folder}"]))
        assert "\n" not in str(info.value)
    finally:
        registry.averagers._builtins.pop("folders", None)


def test_lawa_and_wma_name_their_folder_only_when_they_keep_files_in_one(tmp_path):
    lawa, wma = registry.averagers.get("lawa"), registry.averagers.get("wma")
    assert lawa(store="disk", dir=str(tmp_path)).snapshot_folder() == SnapshotFolder("dir", tmp_path)
    assert wma(store="disk", dir=str(tmp_path)).snapshot_folder() == SnapshotFolder("dir", tmp_path)
    assert lawa(store="disk").snapshot_folder() is None   # a private temporary folder: nothing to collide with
    assert lawa(store="cpu", dir=str(tmp_path)).snapshot_folder() is None


def test_a_window_job_that_failed_still_ends_its_thread_at_close(tmp_path, monkeypatch):
    # a queued disk write that failed (a full disk): close() raises it, and the thread and its folder lock still end
    lawa = registry.averagers.create("lawa", k=2, nu=1)
    wma = registry.averagers.create("wma", k=2, nu=1, store="disk", dir=str(tmp_path / "wma"))
    before = set(threading.enumerate())
    for avg in (lawa, wma):
        avg.observe(1, {"w": torch.ones(3)})
    assert sorted(name.split("_")[0] for name in window_threads(before)) == ["lawa-window", "wma-window"]

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(lawa, "wait", full_disk)
    monkeypatch.setattr(wma._store, "flush", full_disk)
    for avg in (lawa, wma):
        with pytest.raises(OSError, match="No space left"):
            avg.close()
    assert window_threads(before) == []
