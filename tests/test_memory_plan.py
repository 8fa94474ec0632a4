"""The memory plan that ``suite run --dry-run`` prints (``training/memory_plan.py``), checked against real tensors.

The plan builds nothing real: it reads a fake-device model. Here the tiny presets are built for real on the CPU (and
through the CUDA stand-in, for where things live on a GPU) and the plan's byte counts must equal theirs exactly:
parameters, gradients after a backward pass, the optimizer's state after a step, every averager's tensors after it
has filled, slid and re-summed its window. The activation estimate must match the bytes a real forward saves for
backward. The full-size presets (GPT-2 small, the 420M ImageNet-128 UNet) are planned through the CLI only: built on
the fake device, never for real (the UNet would take 8 GB and ~40 s on a CPU).
"""

from __future__ import annotations

import re
from collections import deque

import pytest
import torch
import yaml
from torch import Tensor
from typer.testing import CliRunner

from lawa_suite import registry
from lawa_suite.cli import app
from lawa_suite.config import resolve
from lawa_suite.training.memory_facts import (_facts_of, averager_checkpoint_bytes, averager_parts, build_model,
                                              example_loss, fake_device, measure_activations, model_facts)
from lawa_suite.training.memory_plan import GIB, Setup, _optimizer_bytes
from lawa_suite.testing.cuda_standin import StandInTensor, cuda_standin

TASKS = ("gpt2", "ddpm", "cifar")
AVERAGERS = ["averager=lawa,ema,swa,bema,phema,wma", "lawa.k=3", "lawa.nu=1", "wma.k=2", "wma.nu=1", "swa.start=0",
             "phema.sigma_rel=0.05,0.1", "steps=12"]


def tiny(task: str, *words: str):
    cfg = resolve([f"task={task}", "preset=tiny", *words])
    return cfg, registry.tasks.get(task)(cfg.task, cfg.run)


def real_model(task):
    torch.manual_seed(0)
    return build_model(task)


def nbytes(tensors) -> int:
    """Bytes of distinct storages (a view and its base, or a tied weight under two names, count once)."""
    seen = {}
    for t in tensors:
        host = t.host if isinstance(t, StandInTensor) else t
        seen[host.untyped_storage().data_ptr()] = host.untyped_storage().nbytes()
    return sum(seen.values())


def held(obj) -> list[Tensor]:
    """Every tensor an averager holds: its attributes, through lists, dicts, deques and its own helper objects (the
    snapshot store), so spares and staging buffers are counted as well as what its state_dict shows."""
    found, visited = [], set()

    def visit(x) -> None:
        if isinstance(x, Tensor):
            found.append(x)
        elif isinstance(x, (list, tuple, deque, set)):
            for v in x:
                visit(v)
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif type(x).__module__.startswith("lawa_suite.averagers") and hasattr(x, "__dict__") and id(x) not in visited:
            visited.add(id(x))
            for v in vars(x).values():
                visit(v)
    visit(obj)
    return found


def feed(averagers, model, steps) -> None:
    """Move the weights a little each step and show them to every averager: k=3 windows fill, slide and re-sum."""
    for avg in averagers.values():
        avg.start_run(steps)
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        for avg in averagers.values():
            if avg.wants(step):
                avg.observe(step, model)
    for avg in averagers.values():
        if hasattr(avg, "wait"):
            avg.wait()  # LAWA's window arithmetic runs on a background thread (CPU) or is queued (CUDA)


# -- parameters, gradients, optimizer ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TASKS)
def test_parameters_gradients_and_optimizer_state_are_counted_exactly(name):
    cfg, task = tiny(name)
    facts, _, _ = model_facts(task, cfg.run.lr)
    model = real_model(task)
    unique = list({id(p): p for p in model.parameters()}.values())
    assert sum(e.local_bytes(1) for e in facts.parameters) == nbytes(unique)
    assert facts.parameter_count == sum(p.numel() for p in unique)
    example_loss(task, model, 2).backward()
    grads = [p.grad for p in unique if p.grad is not None]
    assert sum(e.local_bytes(1) for e, _ in facts.optimizer) == nbytes(grads)
    optimizer = task.build_optimizer(model, cfg.run.lr)
    optimizer.step()
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, Tensor)]
    whole = Setup(1, "ddp")
    assert _optimizer_bytes(facts, whole, True) + _optimizer_bytes(facts, whole, False) == nbytes(state)
    # the checkpoint's and trajectory's weights: every state_dict name (safetensors stores a tied weight twice)
    assert sum(e.local_bytes(1) for e in facts.state) == sum(t.numel() * t.element_size()
                                                               for t in model.state_dict().values())


def test_fsdp_shards_dim_0_over_the_ranks_rank_0_holding_the_most():
    cfg, task = tiny("gpt2")
    facts, _, _ = model_facts(task, cfg.run.lr)
    for world in (2, 3, 8):
        local = sum(e.local_bytes(world) for e in facts.parameters)
        expected = sum(-(-e.shape[0] // world) * e.numel // e.shape[0] * e.dtype.itemsize for e in facts.parameters)
        assert local == expected
        assert sum(e.local_bytes(1) for e in facts.parameters) / world <= local


# -- averagers -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TASKS)
def test_every_averagers_state_is_counted_exactly_on_the_cpu(name):
    cfg, task = tiny(name, *AVERAGERS)
    facts, _, _ = model_facts(task, cfg.run.lr)
    model = real_model(task)
    averagers = cfg.build_averagers()
    feed(averagers, model, 12)
    for avg_name, avg in averagers.items():
        base, config = cfg.registered(avg_name), cfg.averagers[avg_name]
        parts = averager_parts(base, config, facts, on_cuda=False)
        assert sum(p.bytes for p in parts) == nbytes(held(avg)), (avg_name, parts)
        in_state = [t for t in held(avg.state_dict()) if isinstance(t, Tensor)]
        assert averager_checkpoint_bytes(base, config, facts) == nbytes(in_state), avg_name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_on_cuda_each_averager_keeps_what_the_plan_says_where_it_says(dtype):
    """Through the CUDA stand-in: accumulators and staging on the device, LAWA's and wma's snapshots pinned on the
    host. With fp32 weights LAWA still stages (its leaving host snapshot is uploaded before it is subtracted); with
    bf16 weights every accumulating averager stages its float32 copy of the weights."""
    cfg, task = tiny("gpt2", *AVERAGERS)
    torch.manual_seed(0)
    model = build_model(task).to(dtype)
    with fake_device("cuda"):
        fake = build_model(task)
        for t in [*fake.parameters(), *fake.buffers()]:
            if t.is_floating_point():
                t.data = t.data.to(dtype)  # (Module.to swaps tensors, which fake ones refuse)
        facts = _facts_of(task, fake, cfg.run.lr)
    with cuda_standin() as device:
        model = model.to("cuda")
        model.tie_weights()  # (moving to the stand-in unties GPT-2's head; on a GPU it stays the embedding)
        averagers = cfg.build_averagers()
        feed(averagers, model, 12)
        for avg_name, avg in averagers.items():
            tensors = held(avg)
            on_device = [t for t in tensors if isinstance(t, StandInTensor)]
            pinned = [t for t in tensors if not isinstance(t, StandInTensor) and device.is_pinned(t)]
            assert len(on_device) + len(pinned) == len(tensors), f"{avg_name}: unpinned host tensors"
            parts = averager_parts(cfg.registered(avg_name), cfg.averagers[avg_name], facts, on_cuda=True)
            assert sum(p.bytes for p in parts if p.where == "device") == nbytes(on_device), (avg_name, parts)
            assert sum(p.bytes for p in parts if p.where == "pinned") == nbytes(pinned), (avg_name, parts)
            # as allocated: each pinned block (one a snapshot and dtype) rounded up to a power of two
            blocks = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in pinned}
            rounded = sum(1 << (n - 1).bit_length() for n in blocks.values())
            assert sum(p.allocated for p in parts if p.where == "pinned") == rounded, (avg_name, parts)


# -- activations -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TASKS)
def test_the_fake_forward_saves_what_a_real_cpu_forward_saves(name):
    """On the CPU the fake forward runs PyTorch's own CPU kernels' shapes: the same tensors, byte for byte, in fp32;
    under bf16 autocast within 0.2% (measured: gpt2 0, ddpm 0.11%, cifar 0.15% fewer). The plan's CUDA forward
    (flash / memory-efficient attention kernels, which save the same q, k, v, output and log-sum-exp as the CPU's
    flash kernel) is within 64 bytes of the CPU's in fp32: the attention kernels' random-number seed and offset."""
    cfg, task = tiny(name)
    real = real_model(task)
    for precision, tolerance in (("no", 0.0), ("bf16", 0.002)):
        measured = measure_activations(task, real, 4, precision)
        with fake_device("cpu"):
            estimate = measure_activations(task, build_model(task), 4, precision)
        assert abs(estimate.saved - measured.saved) <= tolerance * measured.saved, (precision, estimate, measured)
        assert estimate.largest == measured.largest
    fp32 = measure_activations(task, real, 4, "no")
    with fake_device("cuda"):
        on_cuda = measure_activations(task, build_model(task), 4, "no")
    assert 0 <= on_cuda.saved - fp32.saved <= 64, (on_cuda, fp32)


def test_under_bf16_the_plan_follows_cuda_autocast():
    """CUDA's autocast rules (not the CPU's) decide what a GPU run saves: the plan's fake CUDA forward against the
    CUDA stand-in's real forward (its own copy of those rules, with math attention) agrees within 8% (measured: gpt2
    0.966, ddpm 0.936, cifar 1.000; the stand-in's math attention saves the attention matrix as well). bf16 saves
    less than fp32: matmul and convolution outputs are halved, GroupNorm and LayerNorm stay fp32."""
    for name in TASKS:
        cfg, task = tiny(name)
        with fake_device("cuda"):
            planned = measure_activations(task, build_model(task), 4, "bf16")
            full = measure_activations(task, build_model(task), 4, "no")
        assert planned.saved < full.saved
        model = real_model(task)
        with cuda_standin():
            model = model.to("cuda")
            skip = {t.host.untyped_storage().data_ptr() for t in model.state_dict(keep_vars=True).values()}
            saved: dict[int, int] = {}

            def pack(t: Tensor) -> Tensor:
                host = t.host if isinstance(t, StandInTensor) else t
                if host.untyped_storage().data_ptr() not in skip:
                    saved[host.untyped_storage().data_ptr()] = host.untyped_storage().nbytes()
                return t
            hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
            with torch.autocast("cuda", dtype=torch.bfloat16), hooks:
                example_loss(task, model, 4)
        ratio = planned.saved / sum(saved.values())
        assert 0.92 <= ratio <= 1.01, (name, ratio)


# -- the full-size presets, through the command line ----------------------------------------------------------------
def dry_run(*words: str) -> str:
    result = CliRunner().invoke(app, ["run", *words, "--dry-run"], env={"WORLD_SIZE": ""})
    assert result.exit_code == 0, result.output
    return result.output


def verdicts(output: str) -> dict[str, str]:
    """``{"1 process": "FITS: ...", "8 x ddp": ...}`` from the plan's verdict lines."""
    found = (re.match(r"# (1 process|\d+ x (?:ddp|fsdp)): (.*)", line) for line in output.splitlines())
    return {m.group(1): m.group(2) for m in found if m}


def row(output: str, label: str) -> list[float]:
    line = next(line for line in output.splitlines() if line.startswith(f"#   {label}"))
    return [0.0 if v == "-" else float(v) for v in line[len(f"#   {label}"):].split()]


@pytest.fixture(scope="module")
def imagenet128() -> str:
    return dry_run("task=ddpm", "preset=imagenet128")


def test_the_imagenet128_preset_fits_one_gpu_and_eight_as_configured(imagenet128):
    """ADM's 420M UNet at batch 256: 1.25 GiB of activations an image in bf16 (the GPU review's meta probe: ~1.3 GB),
    about 14 GiB of weights, gradients, fused AdamW, LAWA, EMA, SWA and the swap buffer. All 256 images at once need
    351 GiB; the preset takes micro-batches of 32 (grad_accum=8 on one GPU, one a GPU on eight), which fit."""
    config = yaml.safe_load(imagenet128)  # the plan is comments: the dry run's output is still the config
    assert config["task"] == "ddpm" and config["batch_size"] == 256 and config["ddpm"]["image_size"] == 128
    assert config["grad_accum"] == 8
    found = verdicts(imagenet128)
    assert list(found) == ["1 process", "8 x ddp", "8 x fsdp"]
    assert all(v.startswith("FITS: ") and "micro-batch 32 per rank" in v for v in found.values()), found
    one, ddp, fsdp = row(imagenet128, "activations of one micro-batch")
    assert 1.2e9 <= one * GIB / 32 <= 1.45e9 and ddp == fsdp == one
    params = row(imagenet128, "parameters (float32)")
    assert params[0] == params[1] == pytest.approx(420_496_643 * 4 / GIB, abs=0.01) and params[2] < params[0] / 7
    assert "lawa:   as allocated (power-of-two blocks)" in imagenet128 and "420,496,643 parameters" in imagenet128
    whole = dry_run("task=ddpm", "preset=imagenet128", "grad_accum=1", "processes=1")
    assert "DOES NOT FIT" in verdicts(whole)["1 process"] and "fits with grad_accum=8 (micro-batch 32 per rank)" in \
        verdicts(whole)["1 process"]


def test_gpt2_small_fits_one_gpu_and_eight():
    output = dry_run("task=gpt2", "preset=small")
    assert yaml.safe_load(output)["gpt2"]["n_layer"] == 12
    found = verdicts(output)
    assert list(found) == ["1 process", "8 x ddp", "8 x fsdp"]
    assert all(v.startswith("FITS: ") for v in found.values()), found
    # grad_accum is divided by the processes: 16 sequences a micro-batch on one GPU and on each of eight
    assert all("micro-batch 16 per rank" in v for v in found.values()), found
    assert "124,439,808 parameters" in output
    # one micro-batch a step on 8 processes: fsdp keeps no whole gradients; ddp reduces through a second copy
    gradients = row(output, "gradients")
    whole = pytest.approx(124_439_808 * 4 / GIB, abs=0.01)
    assert gradients == [whole, whole, pytest.approx(gradients[0] / 8, abs=0.01)]
    assert "fsdp unsharded gradients" not in output
    assert row(output, "ddp gradient buckets (a second copy)") == [0, gradients[0], 0]
    two = dry_run("task=gpt2", "preset=small", "processes=2")  # 4 micro-batches a step each: fsdp keeps them whole
    assert row(two, "fsdp unsharded gradients (grad_accum > 1)") == [0, gradients[0]]  # (2 x ddp, 2 x fsdp)


def test_processes_and_gpu_memory_are_words_of_the_dry_run_only():
    output = dry_run("task=ddpm", "preset=imagenet128", "processes=4", "gpu_memory=40")
    found = verdicts(output)
    assert list(found) == ["4 x ddp", "4 x fsdp"] and "of 38.00 GiB usable" in found["4 x ddp"]
    assert found["4 x ddp"].startswith("DOES NOT FIT") and "micro-batch 32 per rank" in found["4 x ddp"]
    # (LAWA's device staging for the host copy, 1.6 GiB of fp32 weights, takes it past grad_accum=16's 38 GiB)
    assert "fits with grad_accum=32 (micro-batch 8 per rank)" in found["4 x ddp"], found
    refused = CliRunner().invoke(app, ["run", "task=toy", "processes=8"])
    assert refused.exit_code == 2 and "processes: a setting of the --dry-run memory plan" in refused.output
    bad = CliRunner().invoke(app, ["run", "task=toy", "gpu_memory=1", "--dry-run"])
    assert bad.exit_code == 2 and "gpu_memory: expected" in bad.output


def test_a_task_without_example_inputs_gets_a_plan_without_activations():
    output = dry_run("task=toy", "processes=1,3")
    assert yaml.safe_load(output)["task"] == "toy"
    assert "# activations: not estimated (no example inputs for task 'toy')" in output
    found = verdicts(output)
    assert list(found) == ["1 process", "3 x ddp", "3 x fsdp"]
    assert found["3 x ddp"].startswith("DOES NOT SPLIT")  # batch 16 over 3 processes
