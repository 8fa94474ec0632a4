"""The suite's CUDA code paths, run on the CPU through the CUDA stand-in (``lawa_suite.testing.cuda_standin``).

First the stand-in itself: it must refuse what CUDA refuses and count what would make the host wait, or the
tests after it prove nothing. Then what a first GPU run does: every averager's fill, slide, exact re-sum, state
round trip, average and swap, against the same on the CPU, bit for bit (the stand-in computes on host data with
the CPU's kernels); the finite check of a state that mixes devices (a checkpoint); the collectives a GPU run
makes. Each of the three crashes the GPU review found (``../shared/research/gpu-readiness-2026-12.md``: LAWA's
window slide, every checkpoint's finite check, host tensors handed to NCCL) is one of these tests, and each
failed on the code before its fix. The tasks' loops through the stand-in are in ``test_cuda_loop.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lawa_suite.averagers.base import finite_flag
from lawa_suite.config import resolve
from lawa_suite.training.checkpointing import any_rank_poisoned, nonfinite_parts
from lawa_suite.training.scoring import WeightSwap
from lawa_suite.testing.cuda_standin import DEVICE, StandInTensor, cuda_standin

NAMES = ("lawa", "ema", "swa", "phema", "wma", "bema")
# LAWA and wma: k=3 every step, so 12 steps fill the window, slide it and re-sum it (every k evictions)
WINDOWS = ["lawa.k=3", "lawa.nu=1", "wma.k=3", "wma.nu=1", "swa.start=0", "ema.decay=0.8", "steps=12"]


# -- the stand-in --------------------------------------------------------------------------------------------
def test_it_reports_cuda_computes_on_host_data_and_puts_torch_back():
    available = torch.cuda.is_available()
    with cuda_standin():
        assert torch.cuda.is_available()
        x = torch.arange(4.0, device="cuda")
        assert isinstance(x, StandInTensor) and x.device == DEVICE and x.is_cuda
        y = (x * 2).sum()
        assert y.is_cuda and y.host.item() == 12.0
        assert torch.ones(2).to("cuda").is_cuda and not x.cpu().is_cuda
    assert torch.cuda.is_available() == available and torch.Generator is torch._C.Generator


def test_moving_a_model_keeps_tied_weights_tied():
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    model[1].weight = model[0].weight
    with cuda_standin():
        model.to("cuda")
        assert model[1].weight is model[0].weight and model[0].weight.is_cuda
        assert isinstance(model[0].weight, nn.Parameter)


def test_it_refuses_what_cuda_refuses():
    with cuda_standin():
        x = torch.ones(3, device="cuda")
        with pytest.raises(RuntimeError, match="same device"):
            x + torch.ones(3)  # a non-scalar host operand
        assert (x + torch.tensor(2.0)).host.tolist() == [3.0] * 3  # a 0-dim host tensor is a scalar: allowed
        with pytest.raises(RuntimeError, match="same device"):
            torch.stack([x.sum(), torch.tensor(1.0)])  # cat/stack take no host tensor, 0-dim or not
        with pytest.raises(RuntimeError, match="same device"):
            torch._foreach_sub_([x], [torch.ones(3)])  # foreach: position by position
        norms = torch._foreach_norm([x, torch.ones(2)], ord=math.inf)  # each list alone may mix devices
        assert [n.device.type for n in norms] == ["cuda", "cpu"]
        with pytest.raises(TypeError, match="numpy"):
            x.numpy()


def test_it_counts_what_makes_the_host_wait():
    with cuda_standin() as device:
        x = torch.ones(3, device="cuda")
        uploads = device.uploads
        float(x.sum()), x.sum().item(), x.tolist(), x.cpu()
        assert device.reads == 4
        pinned = torch.empty(3, pin_memory=True)
        assert pinned.is_pinned() and not torch.empty(3).is_pinned()
        pinned.copy_(x, non_blocking=True)  # queued into pinned memory: no wait
        torch.empty(3).copy_(x, non_blocking=True)  # pageable memory: the host waits
        assert device.reads == 5
        x.copy_(pinned, non_blocking=True)
        x.copy_(torch.ones(3))
        assert device.uploads == uploads + 1  # from pageable memory only
        torch.cuda.synchronize()
        assert device.waits == 1 and device.syncs == device.reads + device.uploads + 1


def test_a_pinned_buffer_is_read_only_after_its_copy_is_waited_for():
    with cuda_standin():
        x = torch.ones(3, device="cuda")
        pinned = torch.empty(3, pin_memory=True)
        torch._foreach_copy_([pinned], [x], non_blocking=True)
        x.copy_(pinned, non_blocking=True)  # an upload queued after the copy: stream order, no wait needed
        with pytest.raises(RuntimeError, match="before the device-to-host copy"):
            pinned.sum()  # a host read while the copy may still be running
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream())
        event.synchronize()
        assert pinned.sum().item() == 3.0


def test_a_collective_on_a_host_tensor_is_refused(tmp_path):
    """accelerate starts an nccl group on GPUs, which takes CUDA tensors only: the stand-in refuses host tensors
    in any collective (and runs those of stand-in tensors on their host data, here over a one-process gloo)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with cuda_standin() as device:
            with pytest.raises(RuntimeError, match="host tensor handed to a collective"):
                torch.distributed.all_reduce(torch.zeros(1))
            flag = torch.ones(1, device="cuda")
            torch.distributed.all_reduce(flag)
            assert device.collectives == 1 and flag.host.item() == 1.0
            # a checkpoint of a sharded run agrees on NaN/Inf over all ranks: on the device (was a host tensor)
            assert any_rank_poisoned(True, torch.device("cuda")) and not any_rank_poisoned(False, DEVICE)
    finally:
        torch.distributed.destroy_process_group()


def test_evaluation_sums_travel_on_the_accelerator_device_even_from_a_rank_without_batches(tmp_path):
    from lawa_suite.evaluators.base import reduce_sums

    class TwoProcesses:  # accelerate's reduce on a rank that got no evaluation batch
        num_processes, device = 2, DEVICE

        def reduce(self, tensor, reduction):
            torch.distributed.all_reduce(tensor)
            return tensor

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with cuda_standin():
            assert reduce_sums({"loss": 0.0, "count": 0.0}, TwoProcesses(), torch.device("cpu")) == {
                "count": 0.0, "loss": 0.0}
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_trains_on_the_stand_in_and_its_gradient_buckets_stay_on_the_device(tmp_path):
    """accelerate asks for an nccl group when CUDA is there: the stand-in gives gloo. DDP's C++ side makes its
    parameter-shape check on the device (a C++ copy to the stand-in's options) and all-reduces gradient buckets
    through c10d ops, which gloo runs on the host data and hands back through the collective's future: the copies
    out of it into the gradients are device copies, not uploads (before: one blocking upload per parameter a step)."""
    torch.manual_seed(0)
    reference = _model(torch.float32)[::2]  # the two Linear layers: no BatchNorm buffers to broadcast
    x = torch.randn(8, 4)
    reference(x).square().sum().backward()
    model = _model(torch.float32)[::2]
    with cuda_standin() as device:
        torch.distributed.init_process_group(backend="nccl", init_method=f"file://{tmp_path / 'store'}", rank=0,
                                             world_size=1)
        try:
            assert torch.distributed.get_backend() == "gloo"
            ddp = nn.parallel.DistributedDataParallel(model.to("cuda"), device_ids=[0])
            inputs = x.to("cuda")
            for _ in range(3):  # DDP rebuilds its buckets in the second forward (and reads their order back)
                ddp.zero_grad()
                before = (device.syncs, device.collectives)
                ddp(inputs).square().sum().backward()
            assert device.syncs == before[0], "the third step's backward made the host wait"
            assert device.collectives > before[1], "the gradients were all-reduced through the stand-in"
        finally:
            torch.distributed.destroy_process_group()
        for mine, theirs in zip(model.parameters(), reference.parameters()):
            assert mine.grad.is_cuda and torch.allclose(mine.grad.host, theirs.grad)


# -- averagers on CUDA ---------------------------------------------------------------------------------------
def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2)).to(dtype)
    return model


def _feed(averagers: dict, model: nn.Module, steps: range) -> None:
    for step in steps:
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                p.add_(torch.full_like(p, 0.01 * step * (i + 1)))
        for avg in averagers.values():
            if avg.wants(step):
                avg.observe(step, model)


def _averages_through(device: str | None, dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
    """Fill and slide every averager for 8 steps, save its state, load it into fresh averagers, go on to step 12
    (the window slides again and is re-summed), then each average, swapped into the model and back."""
    model = _model(dtype)
    if device:
        model = model.to(device)
    config = resolve(["task=toy", f"averager={','.join(NAMES)}", *WINDOWS])
    averagers = config.build_averagers()
    for avg in averagers.values():
        avg.start_run(12)
    _feed(averagers, model, range(1, 9))
    states = {name: avg.state_dict() for name, avg in averagers.items()}
    resumed = config.build_averagers()
    for name, avg in resumed.items():
        avg.start_run(12)
        avg.load_state_dict(states[name])
    _feed(resumed, model, range(9, 13))
    raw = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    swap, out = WeightSwap(model), {}
    swap.save_raw()
    for name, avg in resumed.items():
        swap.load(avg)
        out[name] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        swap.restore_raw()
    assert all(torch.equal(v.detach().cpu(), raw[k]) for k, v in model.state_dict().items()), "raw put back"
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_averager_on_cuda_equals_the_cpu_bit_for_bit(dtype):
    """fp32 weights are what every preset trains (bf16 is autocast): LAWA's first window slide then subtracted a
    host snapshot from the device sum unstaged (``staged_like`` decided its staging once, at a call that got
    device weights) and crashed; wma read its pinned snapshots before their copies were waited for."""
    expected = _averages_through(None, dtype)
    with cuda_standin():
        got = _averages_through("cuda", dtype)
    for name in NAMES:
        assert got[name].keys() == expected[name].keys()
        different = [k for k in expected[name] if not torch.equal(got[name][k], expected[name][k])]
        assert not different, (name, different)


# -- checkpoints: a state that mixes devices ----------------------------------------------------------------
def test_the_finite_check_of_a_state_that_mixes_devices():
    """A checkpoint's state holds device tensors (weights, AdamW's moments) and host tensors (AdamW's step
    counters, LAWA's pinned snapshots): the finite check once stacked norms from both devices and refused."""
    with cuda_standin():
        model = _model(torch.float32).to("cuda")
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        model(torch.ones(3, 4, device="cuda")).sum().backward()
        optimizer.step()
        lawa = resolve(["task=toy", "averager=lawa", "lawa.k=2", "lawa.nu=1"]).build_averagers()["lawa"]
        lawa.start_run(4)
        for step in (1, 2, 3):
            lawa.observe(step, model)
        state = {"optimizer": optimizer.state_dict(), "averagers": {"lawa": lawa.state_dict()}}
        devices = {t.device.type for t in optimizer.state_dict()["state"][0].values()}
        assert devices == {"cpu", "cuda"}, "the state this test is about mixes devices"
        assert nonfinite_parts(state) == []
        assert finite_flag([torch.ones(2, device="cuda"), torch.ones(2)]).is_cuda
        optimizer.state_dict()["state"][0]["exp_avg"].view(-1)[0] = float("nan")  # on the device
        assert nonfinite_parts(state) == ["optimizer/state/0/exp_avg"]
        optimizer.state_dict()["state"][0]["exp_avg"].view(-1)[0] = 0.0
        host = [t for t in lawa.state_dict()["state"]["snapshots"][0]]
        host[0].view(-1)[0] = float("inf")  # in a host snapshot
        assert nonfinite_parts({"averagers": {"lawa": lawa.state_dict()}}) == ["averagers/lawa/state/snapshots/0/0"]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_the_finite_flag_finds_nan_and_inf_on_either_device_without_overflow(value):
    big = torch.full((4,), 3e38)  # a sum of squares would overflow to Inf: a max-abs or min/max does not
    with cuda_standin():
        for where in ("cpu", "cuda"):
            assert finite_flag([big.to(where), torch.ones(3, device="cuda")]).item() == 1.0
            bad = torch.ones(5)
            bad[2] = value
            assert finite_flag([bad.to(where), big]).item() == 0.0
    assert finite_flag([big, torch.ones(3, dtype=torch.bfloat16)]).item() == 1.0


def test_a_snapshot_is_one_pinned_block_per_dtype():
    """LAWA's host snapshots: one pinned buffer a dtype, each weight a view into it (the caching host allocator
    rounds every block up to a power of two: a block per weight cost about 1.5x the model in pinned memory)."""
    from lawa_suite.averagers._host_copies import pinned_snapshot_copy

    with cuda_standin():
        weights = [torch.randn(5, 3, device="cuda"), torch.randn(7, device="cuda"),
                   torch.randn(2, device="cuda").to(torch.bfloat16)]
        copies = pinned_snapshot_copy(weights)
        torch.cuda.synchronize()
        assert all(c.is_pinned() and not c.is_cuda for c in copies)
        assert copies[0].untyped_storage().data_ptr() == copies[1].untyped_storage().data_ptr()
        assert copies[0].untyped_storage().nbytes() == (15 + 7) * 4
        assert all(torch.equal(c, w.cpu()) for c, w in zip(copies, weights))
