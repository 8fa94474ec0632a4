"""The GPU check: every figure the suite's GPU goals name, measured in one unattended command on one H100/H200, as
one Markdown table. ``check.sh`` sets up the Python and calls this; see benchmarks/README.md ("GPU check").

Parts, in order, each a subprocess with its own time cap inside the whole budget (a part that fails, times out or
is left without time becomes a row saying so; the table is always printed):

- ``smoke``: ``smoke.py``, a CUDA smoke run of each task end to end through ``suite run`` (tiny presets, every
  averager, fp32 and bf16, a checkpoint then ``resume=auto``), host syncs a step counted: first, so a suite that
  crashes on a GPU says so before the timings spend the budget;
- ``cuda-tests``: pytest on the tests named for CUDA (``-k cuda`` over the test files that mention it);
- ``averagers-124M``: ``averagers.py --device cuda`` at GPT-2 small (fp32 and bf16): each suite averager's update
  against the foreach floor, and LAWA's snapshot cost on the training stream;
- ``ddpm-cifar32``: ``loop.py --throughput`` on ddpm's ``cifar32`` preset, a short run: images/s, peak memory;
- ``loop-gpt2``: ``loop.py --throughput`` on gpt2's ``small`` preset, 120 steps, bf16, compiled where the suite has
  ``compile=``: tokens/s and MFU beside nanoGPT's published figure;
- ``averagers-774M``: as 124M at GPT-2 large's shape (fp32).

Data never downloads: gpt2 reads the embedded corpus (tokenised with GPT-2's BPE where tiktoken's files are there,
else bytes, and the row says so), ddpm the embedded CIFAR-10 subset with the offline FID stand-in.

    python benchmarks/gpu/check.py                        # on a GPU: under 7 minutes
    python benchmarks/gpu/check.py --dry-run              # the same parts, tiny, through the CUDA stand-in (CPU)
    python benchmarks/gpu/check.py --device cpu --quick   # tiny, on the plain CPU (no CUDA path: smoke fails)

The dry run runs each part's script inside ``lawa_suite.testing.cuda_standin`` (``standin_run.py``), with the
device ``cuda``: the CUDA code paths run, on host data. What the stand-in cannot do says so in its row: GPU
timings, memory and MFU (host time is no GPU figure), ``torch.compile`` (refused there). ``cuda-tests`` runs pytest
as it is: those tests enter the stand-in themselves (it is not re-entrant), and the ones that need a real GPU skip.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import figures  # noqa: E402 - benchmarks/gpu is on sys.path above
from figures import Row, failed_row  # noqa: E402

PARTS = ("smoke", "cuda-tests", "averagers-124M", "ddpm-cifar32", "loop-gpt2", "averagers-774M")
# Seconds each part may take on the GPU; with RESERVE they fit the default budget (check.sh: 7 minutes in all).
# Estimates until a first GPU run: the smoke is 12 short runs; loop-gpt2 includes compiling GPT-2 small.
CAPS = {"smoke": 75, "cuda-tests": 60, "averagers-124M": 40, "ddpm-cifar32": 35, "loop-gpt2": 125,
        "averagers-774M": 50}
BUDGET = 390.0        # check.sh's GPU_CHECK_BUDGET (410) less the 20 s it keeps back
# A --quick run's caps, on a busy 2-core CPU: through the stand-in the smoke's 12 runs and the CUDA tests take minutes
QUICK_CAPS = {"smoke": 900, "cuda-tests": 300}
QUICK_CAP = 120       # every other part's
QUICK_BUDGET = 1780.0  # check.sh's for --dry-run (1800) less 20
RESERVE = 5           # seconds kept back from the budget for the table
MIN_CAP = 1           # a part that would get less is not started


class OutOfTime(Exception):
    """SIGTERM: the budget's enforcer (check.sh's ``timeout``) wants the table now."""


@dataclass
class Part:
    name: str
    command: list[str]
    result: Path                                   # the file the command writes (JSON, or junit XML)
    read: Callable[[Path], list[Row]]              # that file -> rows


# -- the parts ---------------------------------------------------------------------------------------------------
def cuda_test_files() -> list[str]:
    """Test files that mention CUDA (their CUDA tests carry it in their names); never this check's own tests."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if p.name != "test_gpu_check.py" and "cuda" in p.read_text().lower())


def junit_counts(path: Path) -> dict[str, int]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}


def compile_available() -> bool:
    """Whether this version of the suite has ``compile=`` (False where the suite does not even import: the parts
    then fail with the reason)."""
    try:
        from lawa_suite.config import RunConfig
    except ImportError:
        return False
    return "compile" in {f.name for f in dataclasses.fields(RunConfig)}


def gpt2_vocab_available() -> bool:
    """Whether tiktoken's GPT-2 BPE files are on disk (nothing downloads here)."""
    try:
        from lawa_suite.data.text import gpt2_vocab_files
    except ImportError:
        return False
    return all(p.is_file() for p in gpt2_vocab_files().values())


def build_parts(args: argparse.Namespace, work: Path) -> dict[str, Part]:
    quick, device = args.quick, args.device
    # a dry run: every script as __main__ inside the CUDA stand-in, with the device "cuda"
    py = [sys.executable, str(HERE / "standin_run.py")] if args.dry_run else [sys.executable]
    averagers = [*py, str(ROOT / "benchmarks" / "averagers.py"), "--device", device, "--no-peak"]
    loop = [*py, str(ROOT / "benchmarks" / "loop.py"), "--throughput"]
    compiled = compile_available() and not quick
    compile_note = ("compiled" if compiled else
                    "not compiled: torch.compile does not run through the CUDA stand-in" if args.dry_run else
                    "not compiled (--quick)" if quick and compile_available() else
                    "compile: not available in this version")
    gpt2 = ["--preset", "small", "--steps", "120", "--skip", "20", "--mixed-precision", "bf16",
            "--override", "warmup=10", "--override", "eval.batches=2"] + (["--override", "compile=true"] if compiled
                                                                            else [])
    if not quick and not gpt2_vocab_available():
        gpt2 += ["--override", "gpt2.tokenizer=bytes"]
        compile_note += "; bytes tokenizer (GPT-2's BPE files missing: vocab 256, not 124M)"
    ddpm = ["--preset", "cifar32", "--steps", "40", "--skip", "10", "--override", "warmup=5",
            "--override", "fid.samples=16", "--override", "fid.reference=64", "--override", "ddpm.sample_steps=10"]
    if quick:
        gpt2 = ["--preset", "tiny", "--steps", "8", "--skip", "2"]
        ddpm = ["--preset", "tiny", "--steps", "6", "--skip", "2"]
        small = ["--layers", "1", "--width", "32", "--rounds", "2", "--dtypes", "fp32", "--only", "suite ema"]
        sizes = {"averagers-124M": small, "averagers-774M": small}
    else:
        sizes = {"averagers-124M": ["--layers", "12", "--width", "768", "--dtypes", "fp32,bf16", "--rounds", "7"],
                 "averagers-774M": ["--layers", "36", "--width", "1280", "--dtypes", "fp32", "--rounds", "5",
                                    "--lawa-k", "2"]}
    offline = ["--override", "data=embedded", "--override", "fid.extractor=standin", "--override", "fid.grid=0"]

    def loop_part(name: str, task: str, settings: list[str], note: str) -> Part:
        out = work / f"{name}.json"
        extra = ([] if quick else offline[:2]) + (offline[2:] if task == "ddpm" else [])  # tiny: offline already
        return Part(name, loop + ["--tasks", task, *settings, *extra, "--json", str(out)], out,
                    lambda p: figures.loop_rows(name, json.loads(p.read_text())["results"][0], note))

    smoke_out = work / "smoke.json"
    parts = {
        "smoke": Part("smoke", [*py, str(HERE / "smoke.py"), "--tasks", args.smoke_tasks, "--precisions",
                                args.smoke_precisions, "--json", str(smoke_out), *(["--quick"] if quick else [])],
                      smoke_out,
                      lambda p: figures.smoke_rows("smoke", json.loads(p.read_text()))),
        # never inside the stand-in: these tests enter it themselves
        "cuda-tests": Part("cuda-tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda",
                                          "--junitxml", str(work / "cuda-tests.xml"), *cuda_test_files()],
                           work / "cuda-tests.xml",
                           lambda p: figures.cuda_test_rows("cuda-tests", junit_counts(p), args.dry_run)),
        "ddpm-cifar32": loop_part("ddpm-cifar32", "ddpm", ddpm, ""),
        "loop-gpt2": loop_part("loop-gpt2", "gpt2", gpt2, compile_note),
    }
    for name, settings in sizes.items():
        out = work / f"{name}.json"
        parts[name] = Part(name, averagers + settings + ["--json", str(out)], out,
                           lambda p, name=name: figures.averager_rows(name, json.loads(p.read_text())))
    return parts


# -- running -----------------------------------------------------------------------------------------------------
def run_part(part: Part, cap: float, log: Any) -> tuple[list[Row], float]:
    """Run one part as a process group under ``cap`` seconds; its rows, or the one row saying what went wrong."""
    started = time.monotonic()
    log.write(f"\n===== {part.name} (cap {cap:.0f} s): {' '.join(part.command)}\n")
    log.flush()
    since = log.tell()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(part.command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    try:
        code = proc.wait(timeout=cap)
    except subprocess.TimeoutExpired:
        kill(proc)
        timed_out = failed_row(part.name, f"timed out after its cap of {cap:.0f} s")
        try:  # a part that writes as it goes (smoke) still shows what it finished
            finished = part.read(part.result) if part.result.is_file() else []
        except Exception:  # noqa: BLE001 - half-written: the timeout row says enough
            finished = []
        return [*finished, timed_out], time.monotonic() - started
    except BaseException:
        kill(proc)
        raise
    seconds = time.monotonic() - started
    if part.result.is_file():  # pytest exits 1 when a test fails: its counts still say so
        try:
            return part.read(part.result), seconds
        except Exception as exc:  # noqa: BLE001 - any unreadable result becomes its row
            return [failed_row(part.name, f"could not read its results: {type(exc).__name__}: {exc}")], seconds
    last = last_line(log, since)
    return [failed_row(part.name, f"failed (exit {code}): {last}" if code else f"wrote no results: {last}")], seconds


def kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def last_line(log: Any, since: int) -> str:
    """The last non-empty line the part printed after ``since`` in the log (its error, as a rule)."""
    log.flush()
    with open(log.name, "rb") as f:
        f.seek(max(since, f.seek(0, os.SEEK_END) - 4096))
        lines = [x.strip() for x in f.read().decode(errors="replace").splitlines() if x.strip()]
    return lines[-1][:200] if lines else "no output"


def environment(device: str, standin: bool = False) -> dict[str, Any]:
    """torch's version and the GPU, from a child (the driver itself never initialises CUDA); in a dry run, as the
    stand-in shows them to the parts."""
    code = ("import json, torch; ok = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
            "'cuda': torch.version.cuda, 'available': ok, 'gpu': torch.cuda.get_device_name() if ok else None}))")
    py = [sys.executable, str(HERE / "standin_run.py")] if standin else [sys.executable]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run([*py, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        info = json.loads(done.stdout.strip().splitlines()[-1])
    except Exception as exc:  # noqa: BLE001 - no torch, or a broken one: every part will say so
        info = {"torch": None, "cuda": None, "available": False, "gpu": None, "error": f"{type(exc).__name__}"}
    info["device"] = f"{device} (stand-in)" if standin else device
    return info


def part_cap(args: argparse.Namespace, i: int, left: float) -> float:
    """Part ``i``'s cap: its own, or more when earlier parts finished early; never the time kept for the parts
    after it (so a part that hangs cannot starve them), never past the budget."""
    caps = [QUICK_CAPS.get(name, QUICK_CAP) if args.quick else CAPS[name] for name in args.parts]
    return min(left, max(caps[i], left - sum(caps[i + 1:])))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="where the parts run")
    parser.add_argument("--quick", action="store_true", help="tiny settings, goals not judged")
    parser.add_argument("--dry-run", action="store_true",
                        help="--quick with the device cuda through the CUDA stand-in, on the CPU: the parts' CUDA code "
                             "paths without a GPU (a few minutes on a busy 2-core CPU)")
    parser.add_argument("--smoke-tasks", default="gpt2,cifar,ddpm", help="the smoke part's tasks (comma list)")
    parser.add_argument("--smoke-precisions", default="no,bf16",
                        help="the smoke part's mixed_precision values (comma list)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of parts, run in this order; of "
                                                                 f"{', '.join(PARTS)}")
    parser.add_argument("--budget", type=float,
                        help=f"seconds for the whole check (default {BUDGET:g}, --quick {QUICK_BUDGET:g}; check.sh "
                             f"passes what is left of GPU_CHECK_BUDGET less 20)")
    parser.add_argument("--out", type=Path, help="folder for check.md, check.json and check.log "
                                                 "(default: $OUT, else benchmarks/results/gpu; a --quick run: a "
                                                 "temporary folder)")
    args = parser.parse_args(argv)
    if args.dry_run:
        if args.device != "cuda":
            parser.error("--dry-run: runs the parts on the stand-in's cuda; leave out --device")
        args.quick = True
    if args.budget is None:
        args.budget = QUICK_BUDGET if args.quick else BUDGET
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        parser.error(f"--parts: unknown part {', '.join(unknown) or '(none given)'}; expected a comma list of "
                     f"{', '.join(PARTS)}")
    if args.budget <= RESERVE:
        parser.error(f"--budget: expected seconds > {RESERVE}, got {args.budget:g}")
    args.parts = parts
    if args.out is None:
        args.out = (Path(os.environ["OUT"]) if os.environ.get("OUT") else
                    Path(tempfile.mkdtemp(prefix="gpu-check-")) if args.quick else ROOT / "benchmarks/results/gpu")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    deadline = started + args.budget - RESERVE

    def on_term(signum: int, frame: Any) -> None:
        raise OutOfTime()
    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        return run_check(args, started, deadline)
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_check(args: argparse.Namespace, started: float, deadline: float) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment(args.device, args.dry_run)
    rows: list[Row] = []
    seconds: dict[str, float] = {}
    details: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp, open(args.out / "check.log", "w") as log:
        parts = build_parts(args, Path(tmp))
        for i, name in enumerate(args.parts):
            cap = part_cap(args, i, deadline - time.monotonic())
            if args.device == "cuda" and not env["available"]:
                rows.append(failed_row(name, f"not run: torch sees no CUDA device (torch {env['torch']})"))
                continue
            if cap < MIN_CAP:
                rows.append(failed_row(name, "not run: the check's time budget was spent"))
                continue
            print(f"[{i + 1}/{len(args.parts)}] {name} (cap {cap:.0f} s)", file=sys.stderr, flush=True)
            try:
                part_rows, seconds[name] = run_part(parts[name], cap, log)
            except OutOfTime:
                rows += [failed_row(n, "not run: the check was stopped (time budget)") for n in args.parts[i:]]
                break
            rows += part_rows
            if parts[name].result.suffix == ".json" and parts[name].result.is_file():
                try:
                    details[name] = json.loads(parts[name].result.read_text())
                except ValueError:  # its row says it could not be read; the table still comes
                    pass
    total = time.monotonic() - started
    gpu = env["gpu"] or ("no GPU" if args.device == "cpu" else "no CUDA device")
    mode = ("--dry-run (every part on the CUDA stand-in, on the CPU: no GPU figure here is real), device cuda "
            "(stand-in)" if args.dry_run else f"{'--quick, ' if args.quick else ''}device {args.device}")
    header = [f"GPU check: {gpu}; torch {env['torch']} (CUDA {env['cuda']}), Python {platform.python_version()}; "
              f"{mode}; {total:.0f} s of a {args.budget:.0f} s "
              f"budget ({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}); "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}."]
    table = figures.markdown(rows, header, judged=args.device == "cuda" and not args.quick)
    print(table, end="")
    (args.out / "check.md").write_text(table)
    (args.out / "check.json").write_text(json.dumps({"environment": env, "seconds": seconds, "total_s": total,
                                                     "rows": [dataclasses.asdict(r) for r in rows],
                                                     "details": details}, indent=1))
    print(f"written: {args.out / 'check.md'}, check.json, check.log", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
