"""LAWA's and wma's snapshots off the critical path (issue 28 part 6, issue 30 part 3), through the CUDA stand-in:
the host copy goes on a side stream into one pinned block per dtype and is read only after its event; the disk
store writes on the averager's own thread; that thread ends with ``close()`` or the averager, and nothing starts at
import."""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

import lawa_suite.averagers._window as window_module
from lawa_suite.averagers.lawa import LAWA
from lawa_suite.averagers.wma import WMA
from lawa_suite.testing.cuda_standin import StandInDevice, cuda_standin


def model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    return net.to(dtype)


def states(n: int, dtype: torch.dtype = torch.float32) -> list[dict[str, Tensor]]:
    """``n`` distinct weight sets of ``model()`` (host tensors), as a training run would pass through."""
    base = model(dtype).state_dict()
    gen = torch.Generator().manual_seed(1)
    return [{k: (v + 0.1 * i * torch.randn(v.shape, generator=gen).to(v.dtype)) if v.is_floating_point() else v + i
             for k, v in base.items()} for i in range(n)]


def run(avg: Any, weights: list[dict[str, Tensor]], live: dict[str, Tensor] | None = None) -> None:
    """Observe ``weights`` one step each; with ``live`` (a device model's tensors), written into it first, as an
    optimizer step does."""
    for step, state in enumerate(weights, start=1):
        if live is None:
            avg.observe(step, state)
            continue
        with torch.no_grad():
            for name, t in live.items():
                t.copy_(state[name])
        avg.observe(step, live, checked=True)


class Streams:
    """Which stream each device-to-host copy into pinned memory was queued on (the stand-in runs every stream at
    once and has no notion of the current one; this keeps it for the test)."""

    def __init__(self, device: StandInDevice) -> None:
        self.training = torch.cuda.current_stream()
        self.current = self.training
        self.copies: list[Any] = []  # the current stream at each queued device-to-host copy
        queue_into = device.queue_into

        def recording(t: Tensor) -> None:
            self.copies.append(self.current)
            queue_into(t)
        device.queue_into = recording  # type: ignore[method-assign]

    @contextlib.contextmanager
    def stream(self, stream: Any = None) -> Iterator[None]:
        outer, self.current = self.current, stream if stream is not None else self.current
        try:
            yield
        finally:
            self.current = outer


@contextlib.contextmanager
def tracked_streams() -> Iterator[tuple[StandInDevice, Streams]]:
    with cuda_standin() as device:
        streams = Streams(device)
        standin = torch.cuda.stream, torch.cuda.current_stream
        torch.cuda.stream, torch.cuda.current_stream = streams.stream, lambda device=None: streams.current
        try:
            yield device, streams
        finally:
            torch.cuda.stream, torch.cuda.current_stream = standin


@pytest.mark.parametrize("name", ["lawa", "wma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_snapshot_goes_to_one_pinned_block_per_dtype_on_a_side_stream(name, dtype):
    """Every device-to-host copy is queued on a stream other than the training one, one copy per snapshot and
    dtype (a copy per weight was ~150 transfers for GPT-2), into one pinned block. Before: all on the training
    stream, one per weight. The numbers are the CPU's, bit for bit."""
    weights = states(8, dtype)
    reference = LAWA(k=3, nu=1) if name == "lawa" else WMA(k=3, nu=1)
    run(reference, weights)
    with tracked_streams() as (device, streams):
        net = model(dtype).to("cuda")
        avg = LAWA(k=3, nu=1) if name == "lawa" else WMA(k=3, nu=1)
        run(avg, weights, net.state_dict())
        dtypes = {t.dtype for t in net.state_dict().values() if t.is_floating_point()}
        assert len(streams.copies) == len(weights) * len(dtypes), "one transfer a snapshot and dtype"
        assert all(s is not streams.training for s in streams.copies), "a transfer on the training stream"
        for snapshot in avg._store.members():
            assert all(t.is_pinned() for t in snapshot)
            assert len({t.untyped_storage().data_ptr() for t in snapshot}) == len(dtypes)
        got, expected = avg.state_dict()["state"], reference.state_dict()["state"]
        assert all(torch.equal(a.cpu(), b) for a, b in zip(got["snapshots"][-1], expected["snapshots"][-1]))
        if name == "lawa":
            assert all(torch.equal(a.cpu(), b) for a, b in zip(got["sum"], expected["sum"]))
        average = avg.average()
        assert all(torch.equal(average[n].cpu(), v) for n, v in reference.average().items())


@pytest.mark.parametrize("name", ["lawa", "wma"])
def test_every_host_read_of_a_snapshot_waits_for_its_copy(name):
    """The stand-in refuses a host read of a pinned buffer whose copy was not waited for. Iterating the window is a
    host read (wma's average, a checkpoint, anyone holding the store): it waits on the copy's event first. Before,
    the store handed out buffers still being written (only wma's average and state_dict waited)."""
    weights = states(5)
    with cuda_standin() as device:
        net = model().to("cuda")
        avg = LAWA(k=3, nu=1) if name == "lawa" else WMA(k=3, nu=1)
        run(avg, weights, net.state_dict())
        waits = device.waits
        snapshots = list(avg._store)
        assert device.waits == waits + 1, "one event wait before the host reads the copies"
        newest = snapshots[-1][0].sum()  # a host read: the stand-in raises if its copy is still in flight
        assert torch.equal(newest, weights[-1]["0.weight"].sum())


def test_a_snapshot_step_on_cuda_makes_the_host_wait_for_nothing():
    """The training thread queues a snapshot and goes on: no blocking read, upload or event wait, in the window's
    fill, slide and re-sum (before: a host wait on the previous snapshot's event at every snapshot while the device
    was behind)."""
    weights = states(10)
    with cuda_standin() as device:
        net = model().to("cuda")
        live = net.state_dict()
        lawa = LAWA(k=3, nu=1)
        on_device = [{name: t.to("cuda") for name, t in state.items()} for state in weights]
        for step, state in enumerate(on_device, start=1):
            before = device.syncs  # (the device is behind: no host wait since the previous snapshot)
            with torch.no_grad():
                for name, t in live.items():
                    t.copy_(state[name])  # (an optimizer step: device work only)
            lawa.observe(step, live, checked=True)
            assert device.syncs == before, f"step {step}: the snapshot made the host wait"


def test_disk_snapshots_are_written_off_the_training_thread_and_on_disk_before_a_checkpoint(tmp_path, monkeypatch):
    """``store=disk``: the training thread copies and goes on; the averager's own thread writes the file (atomic:
    a temporary name, then a rename, as before). A checkpoint (``state_dict``) and ``close()`` find every file of
    the window on disk. Before: written on the training thread."""
    writers: list[str] = []
    release = threading.Event()
    real_write = window_module.write_atomic

    def gated(path, write, durable=True):
        writers.append(threading.current_thread().name)
        if threading.current_thread() is not threading.main_thread():
            release.wait(60)  # (held until the test has looked; never on the training thread, which would hang)
        return real_write(path, write, durable=durable)
    monkeypatch.setattr(window_module, "write_atomic", gated)
    weights = states(4)
    lawa = LAWA(k=2, nu=1, store="disk", dir=str(tmp_path / "snaps"))
    lawa.observe(1, weights[0])
    assert os.listdir(tmp_path / "snaps") == [], "the training thread waited for the write"
    release.set()
    for step, state in enumerate(weights[1:], start=2):
        lawa.observe(step, state)
    saved = lawa.state_dict()["state"]
    assert sorted(os.listdir(tmp_path / "snaps")) == ["snapshot-0000000003.safetensors",
                                                      "snapshot-0000000004.safetensors"]
    assert writers and threading.main_thread().name not in writers
    for step, snapshot in zip(saved["steps"], saved["snapshots"]):
        on_disk = load_file(str(tmp_path / "snaps" / f"snapshot-{step:010d}.safetensors"))
        assert all(torch.equal(on_disk[str(i)], t) for i, t in enumerate(snapshot))
    lawa.close()
    assert sorted(os.listdir(tmp_path / "snaps")) == ["snapshot-0000000003.safetensors",
                                                      "snapshot-0000000004.safetensors"]


@pytest.mark.parametrize("name", ["lawa", "wma"])
def test_disk_snapshots_from_cuda_are_copied_without_a_host_wait(name, tmp_path):
    """From CUDA, a disk snapshot's host copy is queued like a memory one (before: a blocking copy, a host sync at
    every snapshot); the writer thread waits for its event, not the training thread."""
    weights = states(6)
    reference = LAWA(k=2, nu=1) if name == "lawa" else WMA(k=2, nu=1)
    run(reference, weights)
    with cuda_standin() as device:
        net = model().to("cuda")
        live = net.state_dict()
        avg = (LAWA if name == "lawa" else WMA)(k=2, nu=1, store="disk", dir=str(tmp_path / name))
        for step, state in enumerate(weights, start=1):
            with torch.no_grad():
                for t_name, t in live.items():
                    t.copy_(state[t_name])
            reads = device.reads
            avg.observe(step, live, checked=True)
            if name == "wma" or step == 1:  # (LAWA's inline disk arithmetic uploads the leaving file: a sync)
                assert device.reads == reads, f"step {step}: the training thread read the device for its copy"
        avg.close()  # (inside the stand-in: the writer waits on its events)
        got = avg.state_dict()["state"]
    assert sorted(os.listdir(tmp_path / name)) == ["snapshot-0000000005.safetensors", "snapshot-0000000006.safetensors"]
    expected = reference.state_dict()["state"]
    for a, b in zip(got["snapshots"], expected["snapshots"]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_closing_an_averager_ends_its_thread_and_so_does_collecting_it():
    weights = states(4)
    lawa = LAWA(k=2, nu=1)
    run(lawa, weights)
    threads = lawa._worker.threads
    assert len(threads) == 1 and threads[0].is_alive()
    average = lawa.average()
    lawa.close()
    assert not threads[0].is_alive() and lawa._worker.threads == []
    assert all(torch.equal(a, b) for a, b in zip(lawa.average().values(), average.values()))  # state kept
    lawa.observe(5, weights[0])  # a later snapshot starts a thread again
    [thread] = lawa._worker.threads
    del lawa
    gc.collect()
    thread.join(timeout=60)  # (a bound, not a measure: it ends at once when the worker is collected)
    assert not thread.is_alive()


def test_nothing_starts_at_import():
    """No thread and no at-fork hook at import; the hook comes with the first thread (fork safety is kept: see
    tests/test_averagers.py::test_lawa_keeps_working_in_a_forked_child)."""
    code = """
import os, threading
hooks = []
register = os.register_at_fork
def recording(**kwargs):
    hooks.extend(getattr(f, "__module__", None) or "" for f in kwargs.values())
    register(**kwargs)
os.register_at_fork = recording
import lawa_suite.averagers._window, lawa_suite.averagers.lawa, lawa_suite.averagers.wma
from lawa_suite import registry
import torch
at_import = ([m for m in hooks if m.startswith("lawa_suite")], [t.name for t in threading.enumerate()
                                                                 if "window" in t.name])
lawa = registry.averagers.create("lawa", k=2, nu=1)
lawa.observe(1, {"w": torch.ones(2)})
print(at_import, [m for m in hooks if m.startswith("lawa_suite")], len(lawa._worker.threads))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == f"([], []) {['lawa_suite.averagers._window_worker'] * 3} 1"
