"""The GPU check's first part: a CUDA smoke run of each task, end to end, through ``suite run``.

For each task and precision, in this process (the counters below need the run in it):

1. ``suite run task=T preset=tiny averager=lawa,ema,swa,wma,phema,bema steps=16 eval.every=4 checkpoint.every=4``,
   stopped by SIGTERM at step 12 (the suite finishes the step, commits a checkpoint and exits with 143: what a
   scheduler's preemption does);
2. the same words with ``resume=auto``: steps 13 to 16 from that checkpoint, the final evaluation, the report.

(``resume=auto steps=16`` after a finished 12-step run is refused by the suite, rightly: a resumed run must keep
its config, and ``steps`` sets the schedule. So the first run is a 16-step run stopped at 12.)

Host synchronisations are counted between the starts of consecutive optimizer steps: on a GPU the warnings of
``torch.cuda.set_sync_debug_mode("warn")``; through the CUDA stand-in (``standin_run.py``) its ``syncs`` counter.
A plain step should cost one (the loop's one read a step); steps with an evaluation or a checkpoint cost more, so
the median is the figure. A run passes when it trained on ``cuda`` (its parameters there, raw's score moved
between evaluations), the stop left a checkpoint at 12, the resumed run started from it and finished at 16, and
raw and all six averagers were scored at the end. Nothing downloads: ``data=embedded``.

    python benchmarks/gpu/smoke.py --json /tmp/smoke.json                          # on a GPU
    python benchmarks/gpu/standin_run.py benchmarks/gpu/smoke.py --tasks gpt2 --precisions no --json /tmp/s.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

TASKS = ("gpt2", "cifar", "ddpm")
PRECISIONS = ("no", "bf16")
AVERAGERS = ("lawa", "ema", "swa", "wma", "phema", "bema")
STEPS, STOP_AT, EVERY = 16, 12, 4
# wma's default window (5 snapshots 100 steps apart) would not be ready in 16 steps: the tiny presets' LAWA window
SETTINGS = ["preset=tiny", f"averager={','.join(AVERAGERS)}", "wma.k=2", "wma.nu=2", f"steps={STEPS}",
            f"eval.every={EVERY}", "eval.batches=2", f"checkpoint.every={EVERY}", "data=embedded", "progress=false",
            "log_every=1"]
# --quick (the dry run, through the stand-in on a CPU, where an evaluation of seven weight sets takes most of a
# run's time): evaluations at 8 and 16 only, one before the stop and one after the resume
QUICK = {"eval.every": "8"}


def settings(quick: bool = False) -> list[str]:
    """SETTINGS, with QUICK's values in place of theirs under --quick (a key given twice is an error)."""
    return [f"{key}={QUICK[key]}" if quick and key in QUICK else f"{key}={value}"
            for key, _, value in (w.partition("=") for w in SETTINGS)]


def standin_device() -> Any:
    """The CUDA stand-in's counters when ``standin_run.py`` runs this script, else None."""
    return getattr(sys.modules.get("standin_run"), "DEVICE", None)


class SyncCounter:
    """Host synchronisations so far: the stand-in's count, or on a GPU the sync-debug warnings caught."""

    def __init__(self) -> None:
        self.device = standin_device()
        self.how = "CUDA stand-in's count" if self.device is not None else 'set_sync_debug_mode("warn") warnings'
        self._caught: list[warnings.WarningMessage] = []
        self._catching: Any = None

    def __enter__(self) -> SyncCounter:
        if self.device is None:
            self._catching = warnings.catch_warnings(record=True)
            self._caught = self._catching.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._catching is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._catching.__exit__(*exc)

    def __call__(self) -> int:
        if self.device is not None:
            return self.device.syncs
        return sum("synchroniz" in str(w.message) for w in self._caught)


def suite_run(words: list[str], counter: Callable[[], int], stop_at: int | None) -> dict[str, Any]:
    """``suite run WORDS`` in this process: its exit code, where its parameters were, the syncs between step
    starts, the first step it trained, its error's last line. SIGTERM to itself as step ``stop_at`` starts."""
    from lawa_suite import cli
    from lawa_suite.training.loop import Run

    seen: dict[str, Any] = {"starts": [], "first_step": None, "device": None}
    step_fn = Run.optimizer_step

    def optimizer_step(self: Any) -> Any:
        seen["starts"].append(counter())
        if seen["first_step"] is None:
            seen["first_step"] = self.state.step + 1
            seen["device"] = str(next(self.unwrapped.parameters()).device)
        if stop_at is not None and self.state.step + 1 == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop's StopFlag: finish this step, save, exit 143
        return step_fn(self)

    Run.optimizer_step = optimizer_step
    argv, sys.argv = sys.argv, ["suite", "run", *words]
    code, error = 0, None
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception as exc:  # noqa: BLE001 - a crash of the suite is this run's result
        traceback.print_exc()
        code, error = 1, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    finally:
        Run.optimizer_step = step_fn
        sys.argv = argv
    starts = seen["starts"]
    return {"code": code, "error": error, "first_step": seen["first_step"], "device": seen["device"],
            "syncs": [b - a for a, b in zip(starts, starts[1:])]}


def read_metrics(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def smoke(task: str, precision: str, work: Path, counter: SyncCounter, quick: bool = False) -> dict[str, Any]:
    """One task at one precision: the stopped run, its resumption, and what they show."""
    started = time.monotonic()
    out = work / f"{task}-{precision}"
    words = [f"task={task}", *settings(quick), f"mixed_precision={precision}", f"out={out}"]
    print(f"\n=== smoke {task} mixed_precision={precision}: suite run {' '.join(words)}", flush=True)
    first = suite_run(words, counter, stop_at=STOP_AT)
    print(f"\n=== smoke {task} mixed_precision={precision}: resume=auto", flush=True)
    second = suite_run([*words, "resume=auto"], counter, stop_at=None) if first["code"] == 143 else None
    records = read_metrics(out)
    val = [r for r in records if r.get("split") == "val"]
    # the held-out loss where the evaluator logs one: an accuracy may repeat between evaluations of a tiny run
    keys = [k for k in (val[0] if val else {}) if k not in ("step", "weights", "split")]
    headline = "loss" if "loss" in keys else next(iter(keys), None)
    raw = [r[headline] for r in val if r["weights"] == "raw" and headline in r]
    last = max((r["step"] for r in val), default=None)
    scored = sorted({r["weights"] for r in val if r["step"] == last})
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() else []
    problems = []
    if first["error"] or first["code"] != 143:
        why = first["error"] or f"exit {first['code']} (expected 143: stopped at step {STOP_AT})"
        problems.append(f"first run: {why}")
    elif second is not None and (second["error"] or second["code"] != 0):
        problems.append(f"resume=auto: {second['error'] or 'exit ' + str(second['code'])}")
    if first["device"] is not None and not first["device"].startswith("cuda"):
        problems.append(f"trained on {first['device']}, not cuda")
    if len(raw) >= 2 and len(set(raw)) == 1:
        problems.append(f"the weights never changed (raw's {headline} {raw[0]:.4g} at every evaluation)")
    if not problems and set(scored) != {"raw", *AVERAGERS}:
        problems.append(f"scored at step {last}: {', '.join(scored) or 'nothing'} (expected raw and all six)")
    resumed = second is not None and second["code"] == 0 and second["first_step"] == STOP_AT + 1 and last == STEPS
    syncs = first["syncs"] + (second["syncs"] if second else [])
    return {"task": task, "precision": precision, "ok": not problems, "problems": problems,
            "device": first["device"], "standin": counter.device is not None,
            "syncs_per_step": syncs, "syncs_median": statistics.median(syncs) if syncs else None,
            "syncs_max": max(syncs) if syncs else None, "syncs_counted_by": counter.how,
            "resumed": resumed, "resumed_at": second["first_step"] - 1 if second and second["first_step"] else None,
            "last_evaluation": last, "scored": scored, "checkpoints": checkpoints, "headline": headline,
            "raw_scores": raw, "seconds": time.monotonic() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma list of tasks")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="comma list of mixed_precision values")
    parser.add_argument("--json", type=Path, required=True, help="results, rewritten after every run")
    parser.add_argument("--work", type=Path, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer evaluations (" + " ".join(f"{k}={v}" for k, v in QUICK.items()) + ")")
    args = parser.parse_args(argv)
    device = standin_device()
    if device is None and not torch.cuda.is_available():
        raise SystemExit("smoke.py: torch sees no CUDA device (run it through benchmarks/gpu/standin_run.py on a "
                         "machine without one)")
    name = "CUDA stand-in (host CPU)" if device is not None else torch.cuda.get_device_name()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gpu-smoke-") as tmp:
        work = args.work or Path(tmp)
        for task in args.tasks.split(","):
            for precision in args.precisions.split(","):
                with SyncCounter() as counter:
                    results.append(smoke(task, precision, work, counter, args.quick))
                # written after each run: a part stopped at its cap still shows the runs it finished
                args.json.parent.mkdir(parents=True, exist_ok=True)
                partial = args.json.with_suffix(".partial")
                partial.write_text(json.dumps({"device_name": name, "results": results}, indent=1))
                partial.replace(args.json)  # whole or not there, whenever the part is stopped
    for r in results:
        print(f"{r['task']} {r['precision']}: {'ok' if r['ok'] else 'FAILED: ' + '; '.join(r['problems'])}; syncs "
              f"a step: median {r['syncs_median']}, max {r['syncs_max']}; resumed: {r['resumed']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
