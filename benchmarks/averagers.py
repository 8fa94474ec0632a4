"""One averaging update, timed side by side: the suite's ``ema``, ``swa`` and ``lawa`` against the libraries people
use today and against the floor, on a GPT-2-small-shaped parameter set (124,439,808 parameters).

The floor is what nothing can beat: one fused ``torch._foreach_lerp_`` over the model's (unique) parameters for an
EMA or a running mean (read weights + average, write average: 12 bytes per fp32 parameter), and one
``torch._foreach_copy_`` into preallocated buffers for a LAWA snapshot. The parameter set has GPT-2 small's Hugging
Face names and shapes, including the output head tied to the input embedding: ``state_dict()`` lists
``lm_head.weight`` beside ``transformer.wte.weight`` (163,037,184 values, 38.6M of them twice), ``parameters()``
lists it once. Two settings: fp32 weights, and bf16 weights with an fp32 average (where a library cannot keep an
fp32 average of bf16 weights it is timed with a bf16 one and says so).

Every candidate is built once; then each round times one update of every candidate, in a shuffled order, and the
table reports the median over rounds and the ratio to the floor's median. The suite's averagers are fed exactly as
the training loop feeds them, ``observe(step, model)``. LAWA (``nu=2``) alternates plain steps (no snapshot) with
snapshot steps; a snapshot step either slides the window (subtracts the snapshot that leaves it) or, every ``k``-th
eviction, recomputes the window sum from scratch; both are reported.

Memory: "state" is the bytes of tensor storage an averager holds (found by walking the object, storages of the
live model excluded); "peak" is the growth of the process's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs``) while a fresh subprocess builds the candidate and runs a few updates: transient
allocations included. The parent's RSS says nothing useful about torch tensors, so neither number uses it.

    python benchmarks/averagers.py                      # ~4 minutes on 2 CPU cores (fp32 and bf16, peaks)
    python benchmarks/averagers.py --dtypes fp32 --no-peak --rounds 5      # ~1 minute
    python benchmarks/averagers.py --layers 2 --rounds 3                    # a smoke test
    python benchmarks/averagers.py --json benchmarks/results/averagers.json
    python benchmarks/averagers.py --device cuda --layers 36 --width 1280 --no-peak    # GPT-2 large (774M) on a GPU

On CUDA each dtype's results also hold LAWA's snapshot cost on the training stream (``lawa_stream_cost``).

Libraries that are not installed are skipped with a printed reason (``pip install timm ema-pytorch diffusers``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from _shapes import gpt2_small_shapes  # noqa: E402 - benchmarks/ is sys.path[0] when this script runs
from lawa_suite.files import first_line  # noqa: E402

DECAY = 0.999
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# -- the parameter set ------------------------------------------------------------------------------------------
def build_model(dtype: torch.dtype, layers: int, device: str = "cpu", width: int = 768) -> nn.Module:
    """A module tree with GPT-2's parameter names and shapes (small by default; ``layers=36, width=1280`` is GPT-2
    large, 774M), ``lm_head.weight`` tied to the embedding. Off the CPU the values are drawn on the device (a 774M
    draw on one CPU thread takes seconds; the values do not matter to the timings)."""
    root = nn.Module()
    generator = torch.Generator(device).manual_seed(0)
    for name, shape in gpt2_small_shapes(layers, width).items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if part not in module._modules:
                module.add_module(part, nn.Module())
            module = module._modules[part]
        weight = torch.empty(shape, dtype=torch.float32, device=device)
        weight.normal_(0.0, 0.02, generator=generator)
        module.register_parameter(leaf, nn.Parameter(weight.to(device=device, dtype=dtype)))
    root.add_module("lm_head", nn.Module())
    root.lm_head.weight = root.transformer.wte.weight  # tied, as GPT2LMHeadModel ties it
    return root


def check_against_transformers(model: nn.Module) -> str:
    """Compare names and shapes with transformers' GPT2LMHeadModel on the meta device (no memory), if installed."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return "transformers not installed: names not cross-checked"
    with torch.device("meta"):
        width = model.transformer.wpe.weight.shape[1]
        hf = GPT2LMHeadModel(GPT2Config(n_layer=sum(1 for _ in model.transformer.h.children()), n_embd=width,
                                        n_head=max(1, width // 64) if width % 64 == 0 else 1))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    return "same state_dict names and shapes as transformers GPT2LMHeadModel" if ours == theirs else \
        f"DIFFERS from GPT2LMHeadModel: {sorted(set(ours) ^ set(theirs))[:4]}"


# -- candidates -----------------------------------------------------------------------------------------------------
@dataclass
class Built:
    update: Callable[[], None]   # one timed update
    holder: Any                  # the object whose tensors are the averager's state
    note: str = ""
    kind: Callable[[], str] | None = None  # sub-row of the update just timed (lawa: plain / slide / recompute)
    settle: Callable[[], None] | None = None  # untimed, after each timed update (waits for background work)


@dataclass
class Candidate:
    name: str
    build: Callable[[nn.Module, torch.dtype], Built]
    needs: str = ""              # module to import first (skipped with a reason if missing)
    group: str = "ema"           # which floor it is compared with: ema (lerp) or copy
    max_rounds: int = 0          # 0 = every round
    warmup: int = 2              # untimed updates first (the first update of an EMA copies)


def _unique_params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach() for p in model.parameters()]


def floor_lerp(model: nn.Module, dtype: torch.dtype) -> Built:
    params = _unique_params(model)
    if dtype == torch.float32:
        avg = [p.clone() for p in params]
        return Built(lambda: torch._foreach_lerp_(avg, params, 1 - DECAY), avg,
                     "one _foreach_lerp_ over the unique parameters")
    # a bf16 -> fp32 lerp has no fused kernel; the floor is the fp32 lerp over the same shapes
    avg = [p.to(torch.float32, copy=True) for p in params]
    src = [p.to(torch.float32, copy=True) for p in params]
    return Built(lambda: torch._foreach_lerp_(avg, src, 1 - DECAY), [avg, src],
                 "one fp32 _foreach_lerp_ over the same shapes (bf16->fp32 lerp has no fused kernel)")


def floor_cast_lerp(model: nn.Module, dtype: torch.dtype) -> Built:
    if dtype == torch.float32:
        raise NotImplementedError("only for bf16 weights")
    params = _unique_params(model)
    avg = [p.to(torch.float32, copy=True) for p in params]
    scratch = [p.to(torch.float32, copy=True) for p in params]

    def update() -> None:
        torch._foreach_copy_(scratch, params)
        torch._foreach_lerp_(avg, scratch, 1 - DECAY)
    return Built(update, [avg, scratch], "_foreach_copy_ into a preallocated fp32 scratch, then _foreach_lerp_")


def floor_copy(model: nn.Module, dtype: torch.dtype) -> Built:
    params = _unique_params(model)
    buffers = [torch.empty_like(p) for p in params]
    return Built(lambda: torch._foreach_copy_(buffers, params), buffers,
                 "one _foreach_copy_ into preallocated buffers (model dtype)")


def ours(name: str, checked: bool = False, **kwargs: Any) -> Callable[[nn.Module, torch.dtype], Built]:
    """``observe(step, model)``. With ``checked=True`` as the training loop calls it: the loop runs one NaN/Inf
    pass over the weights per step for all its averagers (``Run.feed_averagers``), timed on its own row."""
    def build(model: nn.Module, dtype: torch.dtype) -> Built:
        from lawa_suite import registry
        avg = registry.averagers.create(name, **kwargs)
        avg.start_run(10**9)
        step = [0]

        def update() -> None:
            step[0] += 1
            avg.observe(step[0], model, checked=checked)
        how = "checked=True, as the loop calls it" if checked else "its own NaN/Inf check"
        return Built(update, avg, f"observe(step, model), {how}")
    return build


def shared_finite_check(model: nn.Module, dtype: torch.dtype) -> Built:
    """The loop's one NaN/Inf pass per step over the weights, shared by every averager (Run.feed_averagers)."""
    from lawa_suite.averagers.base import Layout, all_finite, named_tensors
    tensors = named_tensors(model)
    floats = [tensors[n] for n in Layout.of(tensors).float_names]
    return Built(lambda: all_finite(floats), [], "all_finite over the weights, once per step for all averagers")


def ours_lawa(k: int, blocking_only: bool = False) -> Callable[[nn.Module, torch.dtype], Built]:
    """LAWA with nu=2: each timed update is one plain step then one snapshot step, timed separately.

    LAWA's window-sum arithmetic runs on a background thread. By default the timed update includes waiting for
    it (all the work); with ``blocking_only`` only what the training thread pays is timed, and the wait follows
    untimed (before the floor of the next pair, so the two never overlap)."""
    def build(model: nn.Module, dtype: torch.dtype) -> Built:
        from lawa_suite import registry
        avg = registry.averagers.create("lawa", k=k, nu=2)
        state = {"step": 0, "snapshots": 0, "kind": ""}

        def update() -> None:
            state["step"] += 1
            if state["step"] % 2:
                state["kind"] = "plain"
            else:
                state["snapshots"] += 1
                evictions = state["snapshots"] - k
                state["kind"] = ("filling" if evictions <= 0 else "recompute" if evictions % k == 0 else "slide")
            avg.observe(state["step"], model, checked=blocking_only)  # the loop's shared check has its own row
            if not blocking_only:
                avg.wait()
        if blocking_only:
            return Built(update, avg, f"k={k}, nu=2; observe(step, model) as the loop calls it (checked=True), "
                         f"without the background sum: the training thread's cost",
                         kind=lambda: state["kind"], settle=avg.wait)
        return Built(update, avg, f"k={k}, nu=2; observe(step, model) and the background window sum",
                     kind=lambda: state["kind"])
    return build


def ours_eval_swap(model: nn.Module, dtype: torch.dtype) -> Built:
    """What the loop's Scorer does per averager at an evaluation (its WeightSwap): save raw, load the average,
    restore."""
    from lawa_suite import registry
    from lawa_suite.training.scoring import WeightSwap
    avg = registry.averagers.create("ema", decay=DECAY)
    avg.observe(1, model)
    swap = WeightSwap(model)

    def update() -> None:
        swap.save_raw()
        swap.load(avg)
        swap.restore_raw()
    return Built(update, avg,
                 "Scorer.score_all's WeightSwap: save raw, copy the average in, restore raw (floor: 3 copies)")


def torch_averaged(kind: str) -> Callable[[nn.Module, torch.dtype], Built]:
    def build(model: nn.Module, dtype: torch.dtype) -> Built:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        fn = get_ema_multi_avg_fn(DECAY) if kind == "ema" else None
        averaged = AveragedModel(model, multi_avg_fn=fn)
        note = "get_ema_multi_avg_fn" if kind == "ema" else "default (SWA running mean)"
        if dtype != torch.float32:
            averaged.module.float()
            try:
                averaged.update_parameters(model)
                averaged.update_parameters(model)
            except RuntimeError as exc:
                averaged = AveragedModel(model, multi_avg_fn=fn)
                note += f"; bf16 average (an fp32 one fails: {str(exc).splitlines()[0][:60]})"
        return Built(lambda: averaged.update_parameters(model), averaged, note)
    return build


def timm_v3(model: nn.Module, dtype: torch.dtype) -> Built:
    from timm.utils.model_ema import ModelEmaV3
    ema = ModelEmaV3(model, decay=DECAY, dtype=None if dtype == torch.float32 else torch.float32)
    step = [0]

    def update() -> None:
        step[0] += 1
        ema.update(model, step=step[0])
    return Built(update, ema, "foreach=True" + ("" if dtype == torch.float32 else ", dtype=float32"))


def timm_v2(model: nn.Module, dtype: torch.dtype) -> Built:
    from timm.utils.model_ema import ModelEmaV2
    ema = ModelEmaV2(model, decay=DECAY)
    if dtype != torch.float32:
        ema.module.float()
    return Built(lambda: ema.update(model), ema, "per-tensor state_dict loop" +
                 ("" if dtype == torch.float32 else "; module.float()"))


def ema_pytorch(foreach: bool) -> Callable[[nn.Module, torch.dtype], Built]:
    def build(model: nn.Module, dtype: torch.dtype) -> Built:
        from ema_pytorch import EMA
        mixed = dtype != torch.float32
        ema = EMA(model, beta=DECAY, update_after_step=0, update_every=1, use_foreach=foreach,
                  include_online_model=False, coerce_dtype=mixed)
        if mixed:
            ema.ema_model.float()
        note = f"update_every=1, use_foreach={foreach}" + (", coerce_dtype, ema_model.float()" if mixed else "")
        return Built(ema.update, ema, note)
    return build


def diffusers_ema(foreach: bool) -> Callable[[nn.Module, torch.dtype], Built]:
    def build(model: nn.Module, dtype: torch.dtype) -> Built:
        from diffusers.training_utils import EMAModel
        ema = EMAModel(model.parameters(), decay=DECAY, foreach=foreach)
        note = f"foreach={foreach}"
        if dtype != torch.float32:
            ema.to(dtype=torch.float32)
            note += ", .to(float32)"
            try:
                ema.step(model.parameters())
            except RuntimeError as exc:
                ema = EMAModel(model.parameters(), decay=DECAY, foreach=foreach)
                note += f"; bf16 average (fp32 fails: {str(exc).splitlines()[0][:60]})"
        return Built(lambda: ema.step(model.parameters()), ema, note)
    return build


def candidates(lawa_k: int) -> list[Candidate]:
    return [
        Candidate("floor: _foreach_lerp_", floor_lerp),
        Candidate("floor: _foreach_copy_", floor_copy, group="copy"),
        Candidate("ref: copy to fp32 + lerp", floor_cast_lerp),
        Candidate("suite ema", ours("ema", decay=DECAY)),
        Candidate("suite swa", ours("swa", start=0)),
        Candidate("suite ema, in the loop", ours("ema", checked=True, decay=DECAY)),
        Candidate("suite swa, in the loop", ours("swa", checked=True, start=0)),
        Candidate("suite loop's shared NaN/Inf check", shared_finite_check),
        Candidate("suite lawa", ours_lawa(lawa_k), group="copy", warmup=2 * (lawa_k + 1)),
        Candidate("suite lawa, training thread", ours_lawa(lawa_k, blocking_only=True), group="copy",
                  warmup=2 * (lawa_k + 1)),
        Candidate("suite eval swap, ema", ours_eval_swap, group="copy", max_rounds=5, warmup=1),
        Candidate("torch AveragedModel EMA", torch_averaged("ema")),
        Candidate("torch AveragedModel SWA", torch_averaged("swa")),
        Candidate("timm ModelEmaV3", timm_v3, needs="timm"),
        Candidate("timm ModelEmaV2", timm_v2, needs="timm", max_rounds=3, warmup=1),
        Candidate("ema-pytorch EMA", ema_pytorch(False), needs="ema_pytorch"),
        Candidate("ema-pytorch EMA foreach", ema_pytorch(True), needs="ema_pytorch"),
        Candidate("diffusers EMAModel", diffusers_ema(False), needs="diffusers", max_rounds=5, warmup=1),
        Candidate("diffusers EMAModel foreach", diffusers_ema(True), needs="diffusers"),
    ]


# -- memory ------------------------------------------------------------------------------------------------------
def held_bytes(obj: Any, exclude: set[int]) -> int:
    """Bytes of the distinct tensor storages reachable from ``obj`` (containers, modules, plain objects), except
    storages whose data pointer is in ``exclude`` (the live model's)."""
    storages: dict[int, int] = {}
    seen: set[int] = set()
    stack = [obj]
    while stack:
        item = stack.pop()
        if id(item) in seen or item is None or isinstance(item, (str, bytes, int, float, bool, type)):
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            if storage.data_ptr() and storage.data_ptr() not in exclude:
                storages[storage.data_ptr()] = storage.nbytes()
            continue
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset, deque)):
            stack.extend(item)
        elif hasattr(item, "__dict__") and not callable(item) or isinstance(item, nn.Module):
            stack.extend(vars(item).values())
    return sum(storages.values())


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def peak_child(name: str, dtype_name: str, layers: int, lawa_k: int, updates: int, width: int = 768) -> None:
    """Subprocess body: build the model, reset the peak RSS, build the candidate, run updates, print the growth."""
    torch.set_num_threads(1)
    candidate = next(c for c in candidates(lawa_k) if c.name == name)
    if candidate.needs:
        __import__(candidate.needs)
    import lawa_suite.averagers  # noqa: F401 (imported before the baseline, like the libraries)
    from lawa_suite import registry
    registry.averagers.names()
    model = build_model(DTYPES[dtype_name], layers, width=width)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _status("VmRSS")
    built = candidate.build(model, DTYPES[dtype_name])
    for _ in range(max(updates, candidate.warmup + 2 * lawa_k)):  # lawa: through a window recompute
        built.update()
    print(json.dumps({"peak_extra": _status("VmHWM") - base}))


def measure_peak(name: str, dtype_name: str, args: argparse.Namespace) -> int | None:
    command = [sys.executable, __file__, "--_peak", name, "--dtypes", dtype_name, "--layers", str(args.layers),
               "--width", str(args.width), "--lawa-k", str(args.lawa_k)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"  peak of {name}: child failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_extra"]


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def device_peak(candidate: Candidate, dtype: torch.dtype, args: argparse.Namespace) -> int | None:
    """Peak accelerator memory above the model while ``candidate`` is built and updated (fresh model)."""
    gc.collect()
    torch.cuda.empty_cache()
    model = build_model(dtype, args.layers, args.device, args.width)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        built = candidate.build(model, dtype)
        for _ in range(candidate.warmup + 2 * args.lawa_k):
            built.update()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    except Exception:  # noqa: BLE001 (a candidate that cannot run here was reported as skipped)
        return None


# -- LAWA on the training stream (CUDA) ---------------------------------------------------------------------------
def standin_device() -> Any:
    """The CUDA stand-in's counters when benchmarks/gpu/standin_run.py runs this script, else None."""
    return getattr(sys.modules.get("standin_run"), "DEVICE", None)


def lawa_stream_cost(model: nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """What a LAWA snapshot step adds to the training (current) CUDA stream, and whether it makes the host wait.

    A device sleep is queued first, longer than the host's part of the call, so the events recorded just before and
    after ``observe`` time only the work the call queued on the current stream: since the side-stream copy
    (``_window.DeviceToHost``) that is one device-to-device copy of the weights into staging blocks.
    A host time near the sleep's means the call waited for the device. The floor is what a snapshot must move: one
    non-blocking ``_foreach_copy_`` of the unique parameters into pinned host buffers, timed the same way. LAWA runs
    with ``nu=1`` (every step a snapshot) as the loop calls it (``checked=True``); the first ``2 (k + 1)`` steps fill
    the window and are not timed."""
    from lawa_suite import registry
    params = _unique_params(model)
    pinned = [torch.empty(p.shape, dtype=p.dtype, pin_memory=True) for p in params]
    avg = registry.averagers.create("lawa", k=args.lawa_k, nu=1)
    avg.start_run(10**9)
    step = [0]

    def snapshot() -> None:
        step[0] += 1
        avg.observe(step[0], model, checked=True)

    def floor() -> None:
        torch._foreach_copy_(pinned, params, non_blocking=True)

    def sleep_cycles(ms: float) -> int:  # calibrate torch.cuda._sleep (cycles) to milliseconds of this device
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(10**7)
        end.record()
        end.synchronize()
        return int(10**7 * ms / max(start.elapsed_time(end), 1e-3))

    def timed(fn: Callable[[], None], cycles: int) -> tuple[float, float, float]:
        torch.cuda.synchronize()
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        marks[0].record()
        torch.cuda._sleep(cycles)
        marks[1].record()
        start = time.perf_counter()
        fn()
        host = 1e3 * (time.perf_counter() - start)
        marks[2].record()
        torch.cuda.synchronize()
        return marks[1].elapsed_time(marks[2]), host, marks[0].elapsed_time(marks[1])

    for _ in range(2 * (args.lawa_k + 1)):
        snapshot()
    standin = standin_device()
    if standin is not None:
        # No device timing through the stand-in, but it counts what blocks the host: reads and blocking copies.
        # Event waits are counted apart (a snapshot step should make none: the training stream waits for LAWA's side
        # stream on the device, not the host).
        n, waited, events = max(args.rounds, args.lawa_k + 1), 0, 0
        for _ in range(n):
            transfers, waits = standin.reads + standin.uploads, standin.waits
            snapshot()
            waited += standin.reads + standin.uploads > transfers
            events += standin.waits > waits
        avg.wait()
        return {"standin": True, "host_waited": waited, "event_waits": events, "n": n, "snapshot_stream_ms": None,
                "snapshot_stream_max_ms": None, "snapshot_host_ms": None, "sleep_ms": None,
                "floor_d2h_stream_ms": None, "ratio_to_floor": None}
    floor()
    cycles = sleep_cycles(200.0)
    stream, host, slept, floor_stream = [], [], [], []
    for _ in range(max(args.rounds, args.lawa_k + 1)):  # through a window recompute
        floor_stream.append(timed(floor, cycles)[0])
        s, h, z = timed(snapshot, cycles)
        stream.append(s)
        host.append(h)
        slept.append(z)
    avg.wait()
    return {"snapshot_stream_ms": statistics.median(stream), "snapshot_stream_max_ms": max(stream),
            "snapshot_host_ms": statistics.median(host), "sleep_ms": statistics.median(slept),
            "host_waited": sum(h >= 0.5 * z for h, z in zip(host, slept)), "n": len(stream),
            "floor_d2h_stream_ms": statistics.median(floor_stream),
            "ratio_to_floor": statistics.median(stream) / max(statistics.median(floor_stream), 1e-9)}


# -- where the suite's observe() spends its time ---------------------------------------------------------------
def breakdown(model: nn.Module, rounds: int) -> list[dict[str, Any]]:
    """Time the pieces of ``Averager.observe(step, model)`` one by one (fp32)."""
    from lawa_suite.averagers.base import Layout, all_finite, named_tensors
    tensors = named_tensors(model)
    layout = Layout.of(tensors)
    floats = [tensors[n] for n in layout.float_names]
    unique = _unique_params(model)
    avg = [t.clone() for t in floats]
    pieces: dict[str, Callable[[], Any]] = {
        "model.state_dict() (named_tensors)": lambda: named_tensors(model),
        "Layout.mismatch (per-step layout check)": lambda: layout.mismatch(tensors),
        "all_finite (a _foreach_norm pass + host sync)": lambda: all_finite(floats),
        "_foreach_lerp_ over state_dict floats (tied twice)": lambda: torch._foreach_lerp_(avg, floats, 1 - DECAY),
        "_foreach_lerp_ over unique parameters (the floor)": lambda: torch._foreach_lerp_(avg[:len(unique)], unique,
                                                                                            1 - DECAY),
    }
    times: dict[str, list[float]] = {k: [] for k in pieces}
    for _ in range(rounds):
        for key, fn in pieces.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return [{"piece": k, "ms": 1e3 * statistics.median(v)} for k, v in times.items()]


# -- the run ---------------------------------------------------------------------------------------------------------
def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[:3].__str__()


def bench_dtype(dtype_name: str, args: argparse.Namespace) -> dict[str, Any]:
    dtype = DTYPES[dtype_name]
    model = build_model(dtype, args.layers, args.device, args.width)
    model_ptrs = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    unique = sum(p.numel() for p in model.parameters())
    listed = sum(t.numel() for t in model.state_dict().values())
    print(f"\n[{dtype_name}] {unique:,} parameters ({listed:,} in state_dict: lm_head tied to wte)", file=sys.stderr)

    built: dict[str, Built] = {}
    skipped: dict[str, str] = {}
    todo = [c for c in candidates(args.lawa_k)  # the floors always run: every ratio is taken against them
            if (not args.only or c.name.startswith("floor") or any(s in c.name for s in args.only))
            and not (c.name.startswith("ref:") and dtype == torch.float32)]
    for c in todo:
        if c.needs:
            try:
                __import__(c.needs)
            except ImportError as exc:
                skipped[c.name] = f"not installed ({exc.name}); pip install {c.needs.replace('_', '-')}"
                print(f"  skip {c.name}: {skipped[c.name]}", file=sys.stderr)
                continue
        try:
            b = c.build(model, dtype)
            for _ in range(c.warmup):
                b.update()
            built[c.name] = b
        except Exception as exc:  # noqa: BLE001 - a library that cannot do this setting is reported, not fatal
            skipped[c.name] = f"{type(exc).__name__}: {first_line(exc)[:100]}"
            print(f"  skip {c.name}: {skipped[c.name]}", file=sys.stderr)
    by_name = {c.name: c for c in todo}

    # Each timed update is paired with a floor update timed just before it (lerp or copy, by the candidate's
    # group): on a shared machine the interference of the moment cancels in the ratio.
    floor_of = {"ema": "floor: _foreach_lerp_", "copy": "floor: _foreach_copy_"}
    times: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}

    def timed(b: Built) -> float:
        sync()
        start = time.perf_counter()
        b.update()
        sync()
        elapsed = time.perf_counter() - start
        if b.settle is not None:
            b.settle()
        return elapsed

    rng = random.Random(0)
    for r in range(args.rounds):
        order = [n for n in built if not by_name[n].max_rounds or r < by_name[n].max_rounds]
        rng.shuffle(order)
        for name in order:
            b = built[name]
            floor_name = floor_of[by_name[name].group]
            subs = 2 if name.startswith("suite lawa") else 1  # lawa: a plain step and a snapshot step each round
            for _ in range(subs):
                floor_time = timed(built[floor_name]) if floor_name in built and name != floor_name else None
                elapsed = timed(b)
                key = f"{name} ({b.kind()})" if b.kind else name
                times.setdefault(key, []).append(elapsed)
                if floor_time is not None:
                    times.setdefault(floor_name, []).append(floor_time)
                    ratios.setdefault(key, []).append(elapsed / floor_time)
        print(f"  round {r + 1}/{args.rounds} done (load {loadavg()})", file=sys.stderr)

    floor_mins = {g: min(times[n]) for g, n in floor_of.items() if n in times}
    rows = []
    position = {c.name: i for i, c in enumerate(todo)}
    for key, values in sorted(times.items(), key=lambda kv: (position[kv[0].split(" (")[0]], kv[0])):
        base = key.split(" (")[0] if key.startswith("suite lawa") else key
        c, b = by_name[base], built[base]
        paired = ratios.get(key, [1.0])
        rows.append({"candidate": key, "median_ms": 1e3 * statistics.median(values), "min_ms": 1e3 * min(values),
                     "n": len(values), "floor": "copy" if c.group == "copy" else "lerp",
                     "ratio": statistics.median(paired), "ratio_min": min(values) / floor_mins[c.group],
                     "state_bytes": held_bytes(b.holder, model_ptrs), "note": b.note})
    tied = {}
    if "suite ema" in built:
        floats = built["suite ema"].holder.layout.float_names
        averaged = sum(t.numel() for name, t in model.state_dict().items() if name in set(floats))
        tied = {"lm_head_and_wte_both_averaged": "lm_head.weight" in floats and "transformer.wte.weight" in floats,
                "values_averaged": averaged, "unique_parameters": unique}
    result = {"dtype": dtype_name, "parameters": unique, "state_dict_values": listed, "rows": rows,
              "skipped": skipped, "tied": tied, "model_check": check_against_transformers(model),
              "device": str(next(model.parameters()).device), "standin": standin_device() is not None,
              "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
    if dtype_name == "fp32" and not args.only:
        result["breakdown"] = breakdown(model, max(3, args.rounds))
    del built
    gc.collect()
    if args.device.startswith("cuda"):
        result["lawa_stream"] = lawa_stream_cost(model, args)
    del model
    gc.collect()
    if args.peak and args.device != "cpu":
        for row in rows:  # on an accelerator: allocator statistics of a fresh build and a few updates
            name = row["candidate"].split(" (")[0] if row["candidate"].startswith("suite lawa") else row["candidate"]
            row["peak_bytes"] = device_peak(next(c for c in todo if c.name == name), dtype, args)
    elif args.peak:
        for row in rows:
            name = row["candidate"].split(" (")[0] if row["candidate"].startswith("suite lawa") else row["candidate"]
            if name.startswith("suite eval swap"):
                continue
            if "peak_cache" not in result:
                result["peak_cache"] = {}
            if name not in result["peak_cache"]:
                result["peak_cache"][name] = measure_peak(name, dtype_name, args)
            row["peak_bytes"] = result["peak_cache"][name]
        result.pop("peak_cache", None)
    return result


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"Machine: {meta['machine']}; torch {meta['torch']}, {meta['threads']} threads; "
             f"load average before {meta['load_before']}, after {meta['load_after']}.", ""]
    for res in results:
        lines += [f"### {res['dtype']} weights" + (", fp32 average" if res["dtype"] != "fp32" else ""), "",
                  f"{res['parameters']:,} parameters ({res['state_dict_values']:,} values in state_dict); "
                  f"{res['model_check']}.", "",
                  "| candidate | median ms | ratio to floor (median of paired) | min ms | ratio of mins | floor | "
                  "state MB | peak extra MB | n | notes |",
                  "|---|---:|---:|---:|---:|---|---:|---:|---:|---|"]
        for r in res["rows"]:
            lines.append(f"| {r['candidate']} | {r['median_ms']:,.1f} | {r['ratio']:.2f}x | {r['min_ms']:,.1f} | "
                         f"{r['ratio_min']:.2f}x | {r['floor']} | "
                         f"{_mb(r['state_bytes'])} | {_mb(r.get('peak_bytes'))} | {r['n']} | {r['note']} |")
        for name, why in res["skipped"].items():
            lines.append(f"| {name} | - | - | - | - | - | - | - | 0 | skipped: {why} |")
        if res.get("tied"):
            t = res["tied"]
            how = ("two separate accumulators (the embedding is averaged twice)"
                   if t["lm_head_and_wte_both_averaged"] else "one")
            lines += ["", f"Tied weights: the suite's averagers keep `lm_head.weight` and `transformer.wte.weight` "
                      f"as {how}: {t['values_averaged']:,} values per update for {t['unique_parameters']:,} "
                      f"parameters."]
        if (res.get("lawa_stream") or {}).get("standin"):
            s = res["lawa_stream"]
            lines += ["", f"LAWA snapshot calls with a blocking read or copy (the CUDA stand-in's count; no device "
                      f"timing through it): {s['host_waited']} of {s['n']}; calls that waited on an event: "
                      f"{s['event_waits']}."]
        elif res.get("lawa_stream"):
            s = res["lawa_stream"]
            lines += ["", "LAWA on the training stream (CUDA; a snapshot every step, as the loop calls it):",
                      "", "| figure | value |", "|---|---:|",
                      f"| snapshot: device time on the training stream, median (max) | {s['snapshot_stream_ms']:,.2f} "
                      f"({s['snapshot_stream_max_ms']:,.2f}) ms |",
                      f"| floor: a non-blocking copy of the weights into pinned memory, on the stream | "
                      f"{s['floor_d2h_stream_ms']:,.2f} ms |",
                      f"| ratio to the floor | {s['ratio_to_floor']:.2f}x |",
                      f"| snapshot: host time of the call, median | {s['snapshot_host_ms']:,.2f} ms |",
                      f"| calls that waited for the device (host time >= half the {s['sleep_ms']:,.0f} ms queued) "
                      f"| {s['host_waited']} of {s['n']} |"]
        if res.get("breakdown"):
            lines += ["", "Where `suite ema`'s `observe(step, model)` goes (fp32, each piece timed alone):", "",
                      "| piece | median ms |", "|---|---:|"]
            lines += [f"| {b['piece']} | {b['ms']:,.2f} |" for b in res["breakdown"]]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="timed updates per candidate (medians reported)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    parser.add_argument("--layers", type=int, default=12, help="transformer blocks (12 = GPT-2 small, 124M)")
    parser.add_argument("--width", type=int, default=768,
                        help="model width (768 = GPT-2 small; --layers 36 --width 1280 = GPT-2 large, 774M)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (1: on a busy machine, 2 threads wait on a descheduled one)")
    parser.add_argument("--lawa-k", type=int, default=3, help="LAWA window (memory grows with k; timing does not)")
    parser.add_argument("--only", action="append", default=[],
                        help="only candidates whose name contains this (repeatable; the floors always run)")
    parser.add_argument("--no-peak", dest="peak", action="store_false", help="skip the peak-memory subprocesses")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (on cuda the results also hold LAWA's "
                                                             "cost on the training stream; not yet run on a GPU)")
    parser.add_argument("--_peak", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._peak:
        peak_child(args._peak, args.dtypes, args.layers, args.lawa_k, updates=4, width=args.width)
        return
    torch.set_num_threads(args.threads)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs ({_cpu_model()}), "
                       f"{_meminfo()} GiB RAM, Python {platform.python_version()}",
            "torch": torch.__version__, "threads": args.threads, "load_before": loadavg(),
            "command": " ".join([Path(sys.executable).name, *sys.argv])}
    started = time.time()
    results = [bench_dtype(d, args) for d in args.dtypes.split(",")]
    meta["load_after"] = loadavg()
    meta["seconds"] = round(time.time() - started)
    text = markdown(results, meta)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _meminfo() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 2**20)
    return 0


if __name__ == "__main__":
    main()
