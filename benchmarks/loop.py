"""The suite's training loop against a bare hand-written PyTorch loop: same model, data, optimizer, learning-rate
schedule and gradient clipping, on a task's preset (``cifar`` and ``gpt2`` at ``preset=cpu`` by default).

Variants:

- ``bare``: ``for step: set lr; loss = task.loss(model, batch, step); backward; clip (if the preset clips);
  optimizer.step(); zero_grad`` over the task's own model, optimizer and train stream;
- ``bare+floor``: the same plus hand-written fused averaging at its floor (one ``_foreach_lerp_`` over the unique
  parameters for EMA and one for SWA every step, one ``_foreach_copy_`` into a preallocated ring every ``lawa.nu``
  steps): what attaching lawa+ema+swa could cost;
- ``suite``: ``lawa_suite.training.loop.train`` with no averager;
- ``suite+<averagers>``: the same with averagers attached (EMA every step; ``swa.start=1`` so SWA averages every
  step of the timed window instead of the preset's last quarter only).

Lock-step: on a shared machine a run's speed drifts by tens of percent from one minute to the next, more than the
overheads measured here. So all variants of a task run at once, one thread each, and take turns one optimizer step
at a time (a baton passed at the start of every step; with ``torch.set_num_threads(1)`` each step runs entirely in
its own thread, and only one thread works at a time). Every variant's step ``k`` runs within a second of the
others', and each step is timed by its thread's own CPU clock (``time.thread_time``), which a waiting thread does
not advance. The suite's loop is timed from outside, by wrapping ``Run.optimizer_step`` (the baton and the clock)
and ``Averager.observe`` (its own clock): the code timed is the code users run.

The timed window leaves out start-up and the first ``--skip`` steps, and the end of the run (final evaluation,
checkpoint, report); ``eval.every`` is set past the end of the run, so no evaluation falls inside. For each
variant and round: the CPU time of the window's steps divided by the bare loop's over the same steps; medians
over rounds are reported, with the time spent in ``observe`` per step.

    python benchmarks/loop.py                                   # both tasks, ~10 minutes on 2 CPU cores
    python benchmarks/loop.py --tasks gpt2 --rounds 1 --steps 60
    python benchmarks/loop.py --json benchmarks/results/loop.json

``--throughput`` times one run of the suite by the wall clock instead (what an accelerator needs: its steps run
asynchronously, so the device is synchronised at the two ends of the timed window), at any preset, and reports
milliseconds a step, examples (and for gpt2 tokens) a second, and on CUDA the peak memory allocated in the window:

    python benchmarks/loop.py --throughput --tasks gpt2 --preset small --steps 200 --skip 20 \
        --mixed-precision bf16 --override data=embedded --override warmup=10 --json /tmp/gpt2-small.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

DEFAULT_STEPS = {"gpt2": 100, "cifar": 60}
DEFAULT_VARIANTS = {"gpt2": ["bare", "bare+floor", "suite", "suite+lawa", "suite+ema", "suite+swa",
                             "suite+lawa,ema,swa"],
                    "cifar": ["bare", "bare+floor", "suite", "suite+lawa,ema,swa"]}


# -- lock-step ----------------------------------------------------------------------------------------------------
class Baton:
    """Participants take turns in a fixed order; one that is done leaves the rotation."""

    def __init__(self, n: int) -> None:
        self.cond = threading.Condition()
        self.turn = 0
        self.active = [True] * n
        self.go = threading.Event()  # set once every participant has finished its set-up

    def wait(self, i: int) -> None:
        self.go.wait()
        with self.cond:
            self.cond.wait_for(lambda: self.turn == i)

    def pass_on(self, i: int) -> None:
        with self.cond:
            if self.turn == i:
                self._advance()

    def leave(self, i: int) -> None:
        with self.cond:
            self.active[i] = False
            if self.turn == i:
                self._advance()

    def _advance(self) -> None:
        if not any(self.active):
            return
        j = (self.turn + 1) % len(self.active)
        while not self.active[j]:
            j = (j + 1) % len(self.active)
        self.turn = j
        self.cond.notify_all()


@dataclass
class Record:
    """One participant's clocks: (cpu, wall) when each step starts (after the baton) and ends (before passing it)."""
    index: int
    baton: Baton
    starts: list[tuple[float, float]] = field(default_factory=list)
    ends: list[tuple[float, float]] = field(default_factory=list)
    observe: dict[int, float] = field(default_factory=dict)  # step -> CPU seconds in Averager.observe
    window: tuple[int, int] | None = None  # --throughput: (first, last + 1), the steps at whose start the device
    #                                        syncs; the run stops at the second (WindowDone): its end is not timed
    peak_bytes: int | None = None          # --throughput on CUDA: peak memory allocated between those two steps
    parameters: int | None = None          # the run's model: unique parameters
    param_device: str | None = None        # where the run's parameters are (cuda:0 through the CUDA stand-in too)
    holding: bool = False
    ready: threading.Event = field(default_factory=threading.Event)  # set-up done: the first step is next

    def tick(self) -> None:
        """Called at the start of every optimizer step: close the previous step, pass the baton, wait, open."""
        self.ready.set()
        if self.holding:
            self.ends.append((time.thread_time(), time.perf_counter()))
            self.holding = False
            self.baton.pass_on(self.index)
        self.baton.wait(self.index)
        self.holding = True
        self.mark(len(self.starts) + 1)
        self.starts.append((time.thread_time(), time.perf_counter()))

    def mark(self, step: int) -> None:
        """At the ends of a --throughput window: wait for the device, reset or read its peak memory; at the second,
        stop the run (its final evaluation, checkpoint and report are not what is timed)."""
        if self.window is None or step not in self.window:
            return
        cuda = torch.cuda.is_initialized()
        if cuda:
            torch.cuda.synchronize()
        if step == self.window[0]:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            return
        self.peak_bytes = torch.cuda.max_memory_allocated() if cuda else None
        self.starts.append((time.thread_time(), time.perf_counter()))
        raise WindowDone()


class WindowDone(Exception):
    """Raised at the start of the step after a --throughput window: the timed part of the run is over."""


CURRENT = threading.local()  # .record: the Record of the variant this thread runs
THREADS = [1]                 # torch.set_num_threads of every participant thread


def instrument() -> None:
    """Wrap the suite's ``Run.optimizer_step`` and ``Averager.observe`` (no file of the suite is changed)."""
    from lawa_suite.training import loop as train_module
    from lawa_suite.averagers.base import Averager

    step_fn, observe_fn = train_module.Run.optimizer_step, Averager.observe

    def optimizer_step(self: Any) -> Any:
        if CURRENT.record.parameters is None:
            from lawa_suite.tasks.base import parameter_count
            CURRENT.record.parameters = parameter_count(self.unwrapped)
            CURRENT.record.param_device = str(next(self.unwrapped.parameters()).device)
        CURRENT.record.tick()
        return step_fn(self)

    def observe(self: Any, step: int, weights: Any, **kwargs: Any) -> bool:
        start = time.thread_time()
        try:
            return observe_fn(self, step, weights, **kwargs)
        finally:
            record = CURRENT.record
            record.observe[step] = record.observe.get(step, 0.0) + time.thread_time() - start

    train_module.Run.optimizer_step = optimizer_step
    Averager.observe = observe


# -- the variants -----------------------------------------------------------------------------------------------
def overrides(task: str, steps: int, averagers: str, out: Path, preset: str = "cpu",
              extra: tuple[str, ...] = ()) -> list[str]:
    return [f"task={task}", f"preset={preset}", f"steps={steps}", f"averager={averagers}", f"eval.every={10 * steps}",
            "checkpoint.every=0", "trajectory.every=0", "progress=false", f"out={out}"] + \
        (["swa.start=1"] if "swa" in averagers.split(",") else []) + list(extra)


def on_standin() -> bool:
    """Whether benchmarks/gpu/standin_run.py runs this script inside the CUDA stand-in (its times are host times)."""
    return getattr(sys.modules.get("standin_run"), "DEVICE", None) is not None


def run_suite(task: str, steps: int, averagers: str, work: Path, preset: str = "cpu",
              extra: tuple[str, ...] = ()) -> None:
    from lawa_suite.config import resolve
    from lawa_suite.training.loop import train

    out = Path(tempfile.mkdtemp(dir=work))
    out.rmdir()
    train(resolve(overrides(task, steps, averagers, out, preset, extra)))


def run_bare(task: str, steps: int, with_floor: bool, preset: str = "cpu", extra: tuple[str, ...] = ()) -> None:
    """A hand-written loop on the task's model, optimizer, data stream and loss; the suite's schedule and clipping."""
    from lawa_suite import registry
    from lawa_suite.config import resolve

    cfg = resolve(overrides(task, steps, "lawa,ema,swa", Path("unused"), preset, extra))
    run = cfg.run
    task_obj = registry.tasks.get(task)(cfg.task, run)
    task_obj.setup()
    torch.manual_seed(run.seed)
    model = task_obj.build_model()
    optimizer = task_obj.build_optimizer(model, run.lr)
    stream = task_obj.train_stream(run.micro_batch, 0, 1)
    params = [p for p in {id(p): p for p in model.parameters()}.values()]
    if with_floor:
        lawa, ema = cfg.averagers["lawa"], cfg.averagers["ema"]
        with torch.no_grad():
            ema_avg = [p.detach().clone() for p in params]
            swa_avg = [p.detach().clone() for p in params]
            ring = [[torch.empty_like(p) for p in params] for _ in range(lawa.k)]
    model.train()
    for step in range(steps):
        CURRENT.record.tick()
        # the suite's schedule: linear warm-up, then cosine (or linear) down to min_lr
        if step < run.warmup:
            factor = (step + 1) / run.warmup
        elif run.schedule == "constant":
            factor = 1.0
        else:
            progress = min(1.0, (step - run.warmup) / max(1, run.steps - run.warmup))
            shape = 0.5 * (1 + math.cos(math.pi * progress)) if run.schedule == "cosine" else 1.0 - progress
            factor = run.min_lr + (1 - run.min_lr) * shape
        for group in optimizer.param_groups:
            group["lr"] = run.lr * factor
        loss = task_obj.loss(model, stream.next_batch(), step)
        loss.backward()
        if run.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), run.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if with_floor:
            done = step + 1
            with torch.no_grad():
                torch._foreach_lerp_(ema_avg, params, 1.0 - ema.decay)
                torch._foreach_lerp_(swa_avg, params, 1.0 / done)
                if done % lawa.nu == 0:
                    torch._foreach_copy_(ring[(done // lawa.nu) % lawa.k], params)
        if (step + 1) % run.log_every == 0:
            float(loss)  # what any loop that logs its loss does
    CURRENT.record.tick()  # close the last step, as the suite's loop closes its steps at the next entry


def participant(task: str, variant: str, steps: int, work: Path, record: Record, errors: list[str],
                preset: str = "cpu", extra: tuple[str, ...] = ()) -> None:
    CURRENT.record = record
    try:
        torch.set_num_threads(THREADS[0])  # per thread: a new thread may start with the default
        if variant.startswith("bare"):
            run_bare(task, steps, variant == "bare+floor", preset, extra)
        else:
            run_suite(task, steps, variant.partition("+")[2], work, preset, extra)
    except BaseException as exc:  # noqa: BLE001 (reported by the main thread)
        errors.append(f"{variant}: {type(exc).__name__}: {exc}")
    finally:
        record.ready.set()
        record.baton.leave(record.index)


def lockstep_round(task: str, variants: list[str], steps: int, work: Path, preset: str = "cpu",
                   extra: tuple[str, ...] = ()) -> dict[str, Record]:
    baton = Baton(len(variants))
    records = {v: Record(i, baton) for i, v in enumerate(variants)}
    errors: list[str] = []
    threads = [threading.Thread(target=participant, args=(task, v, steps, work, records[v], errors, preset, extra),
                                name=v) for v in variants]
    for t, v in zip(threads, variants):  # set-ups one at a time (lazy imports are not thread-safe), then go
        t.start()
        while not records[v].ready.wait(0.1) and t.is_alive():
            pass
    baton.go.set()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError("; ".join(errors))
    return records


def window(record: Record, first: int, last: int) -> tuple[float, float, float]:
    """CPU and wall seconds of steps ``first..last`` (1-based) and their CPU seconds in observe."""
    cpu = sum(record.ends[k - 1][0] - record.starts[k - 1][0] for k in range(first, last + 1))
    wall = sum(record.ends[k - 1][1] - record.starts[k - 1][1] for k in range(first, last + 1))
    observe = sum(s for step, s in record.observe.items() if first <= step <= last)
    return cpu, wall, observe


# -- the run ---------------------------------------------------------------------------------------------------------
def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split(" ")[:3])


def bench_task(task: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    steps = args.steps or DEFAULT_STEPS[task]
    from lawa_suite import registry  # discover plugins once, here: the registries' first use is not thread-safe
    from lawa_suite.config import resolve
    for reg in (registry.tasks, registry.averagers, registry.evaluators):
        for name in reg.names():
            reg.get(name)
    resolve(overrides(task, steps, "lawa,ema,swa", work / "unused", args.preset, tuple(args.override)))
    variants = args.variants.split(";") if args.variants else DEFAULT_VARIANTS[task]
    first, last = args.skip + 1, steps - 1  # the last step's end is followed by the run's end: left out
    n = last - first + 1
    rng = random.Random(0)
    per_round: list[dict[str, dict[str, float]]] = []
    for r in range(args.rounds):
        order = list(variants)
        rng.shuffle(order)  # the turn order changes from round to round
        started = time.time()
        records = lockstep_round(task, order, steps, work, args.preset, tuple(args.override))
        bare_cpu = window(records["bare"], first, last)[0]
        results = {}
        for v in variants:
            cpu, wall, observe = window(records[v], first, last)
            results[v] = {"cpu_ms": 1e3 * cpu / n, "wall_ms": 1e3 * wall / n, "observe_ms": 1e3 * observe / n,
                          "ratio": cpu / bare_cpu}
        per_round.append(results)
        print(f"  {task} round {r + 1}/{args.rounds} ({time.time() - started:.0f} s, load {loadavg()}): " +
              ", ".join(f"{v} {results[v]['ratio']:.3f}" for v in variants), file=sys.stderr)
    rows = []
    for v in variants:
        values = [rnd[v] for rnd in per_round]
        to_suite = [rnd[v]["cpu_ms"] / rnd["suite"]["cpu_ms"] for rnd in per_round if "suite" in rnd]
        rows.append({"variant": v, "cpu_ms": statistics.median(x["cpu_ms"] for x in values),
                     "wall_ms": statistics.median(x["wall_ms"] for x in values),
                     "observe_ms": statistics.median(x["observe_ms"] for x in values),
                     "ratio_to_bare": statistics.median(x["ratio"] for x in values),
                     "ratios": [x["ratio"] for x in values],
                     "ratio_to_suite": statistics.median(to_suite) if to_suite else None})
    return {"task": task, "steps": steps, "window": [first, last], "rounds": args.rounds, "rows": rows,
            "per_round": per_round}


def throughput(task: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One run of the suite (``--variants``: one, default suite+lawa,ema,swa), timed by the wall clock from the start
    of step ``skip + 1`` to the start of the last step, the device synchronised at both ends."""
    from lawa_suite.config import resolve

    steps = args.steps or DEFAULT_STEPS[task]
    variant = args.variants or "suite+lawa,ema,swa"
    if ";" in variant or not variant.startswith("suite"):
        raise SystemExit(f"--variants: --throughput times one run of the suite, e.g. 'suite+lawa,ema,swa'; "
                         f"got {variant!r}")
    extra = tuple(args.override)
    averagers = variant.partition("+")[2]
    cfg = resolve(overrides(task, steps, averagers, work / "unused", args.preset, extra))
    first, last = args.skip + 1, steps - 1
    if last < first:
        raise SystemExit(f"--steps: --throughput needs at least skip + 2 = {args.skip + 2} steps, got {steps}")
    record = Record(0, Baton(1), window=(first, last + 1))
    record.baton.go.set()
    CURRENT.record = record
    try:
        run_suite(task, steps, averagers, work, args.preset, extra)
    except WindowDone:
        pass
    seconds = record.starts[last][1] - record.starts[first - 1][1]  # start of step first to start of step last + 1
    n = last - first + 1
    per_second = cfg.run.batch_size * n / seconds
    task_config = dataclasses.asdict(cfg.task)
    return {"task": task, "preset": args.preset, "variant": variant, "steps": steps, "window": [first, last],
            "ms_per_step": 1e3 * seconds / n, "batch_size": cfg.run.batch_size, "examples_per_s": per_second,
            "tokens_per_s": per_second * task_config["seq_len"] if "seq_len" in task_config else None,
            "mixed_precision": cfg.run.mixed_precision, "compile": getattr(cfg.run, "compile", None),
            "parameters": record.parameters, "task_config": task_config, "param_device": record.param_device,
            "peak_bytes": None if on_standin() else record.peak_bytes, "standin": on_standin(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "overrides": list(extra)}


def throughput_markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"Machine: {meta['machine']}; torch {meta['torch']}; {meta['seconds']} s.", "",
             "| task | preset | device | variant | steps timed | ms/step | examples/s | tokens/s | peak GiB |",
             "|---|---|---|---|---|---:|---:|---:|---:|"]
    for r in results:
        tokens = "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}"
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.2f}"
        lines.append(f"| {r['task']} | {r['preset']} | {r['device']} | {r['variant']} | {r['window'][0]}-"
                     f"{r['window'][1]} | {r['ms_per_step']:,.1f} | {r['examples_per_s']:,.1f} | {tokens} | {peak} |")
    return "\n".join(lines + [""])


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"Machine: {meta['machine']}; torch {meta['torch']}, {meta['threads']} thread(s); "
             f"load average before {meta['load_before']}, after {meta['load_after']}; {meta['seconds']} s.", ""]
    for res in results:
        first, last = res["window"]
        lines += [f"### {res['task']} `preset=cpu`, steps={res['steps']} (timed: steps {first} to {last}), "
                  f"{res['rounds']} round(s) in lock-step", "",
                  "| variant | CPU ms/step | ratio to bare | ratio to suite | observe CPU ms/step | wall ms/step | "
                  "per-round ratios to bare |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for r in res["rows"]:
            to_suite = "-" if r["ratio_to_suite"] is None else f"{r['ratio_to_suite']:.3f}x"
            lines.append(f"| {r['variant']} | {r['cpu_ms']:.1f} | {r['ratio_to_bare']:.3f}x | {to_suite} | "
                         f"{r['observe_ms']:.2f} | {r['wall_ms']:.1f} | "
                         f"{' '.join(f'{x:.3f}' for x in r['ratios'])} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="gpt2,cifar", help="comma list of tasks (preset=cpu)")
    parser.add_argument("--rounds", type=int, default=5, help="lock-step runs of all variants (medians reported)")
    parser.add_argument("--steps", type=int, default=0, help="steps per run (default: gpt2 100, cifar 60)")
    parser.add_argument("--skip", type=int, default=10, help="steps left out of the timed window at the start")
    parser.add_argument("--variants", default="", help="';'-separated variants including bare, "
                                                       "e.g. 'bare;suite;suite+ema'")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads; lock-step timing needs 1 (each step in its own thread)")
    parser.add_argument("--preset", default="cpu", help="the tasks' preset (cpu by default)")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"),
                        help="mixed_precision= for every run (default: the preset's)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a further run key for every run, as on `suite run` (repeatable), e.g. data=embedded")
    parser.add_argument("--throughput", action="store_true",
                        help="time one run of the suite by the wall clock (for a GPU) instead of the lock-step "
                             "comparison with a bare loop")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.mixed_precision:
        args.override.append(f"mixed_precision={args.mixed_precision}")
    torch.set_num_threads(args.threads)
    THREADS[0] = args.threads
    instrument()
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "torch": torch.__version__, "threads": args.threads, "load_before": loadavg(),
            "command": " ".join([Path(sys.executable).name, *sys.argv])}
    started = time.time()
    bench = throughput if args.throughput else bench_task
    with tempfile.TemporaryDirectory(prefix="loop-bench-") as work:
        results = [bench(t, args, Path(work)) for t in args.tasks.split(",")]
    meta["load_after"] = loadavg()
    meta["seconds"] = round(time.time() - started)
    print((throughput_markdown if args.throughput else markdown)(results, meta))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
