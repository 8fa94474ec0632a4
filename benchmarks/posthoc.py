"""`suite average` against the naive baseline, side by side in one run: LAWA k=5 over five 124M-parameter fp32
checkpoints (GPT-2-small names and shapes, ~498 MB each), one derived checkpoint.

The naive baseline is what the LAWA paper's code does: ``torch.load`` each whole checkpoint, add it to a running
fp32 sum, divide, ``torch.save``. `suite average` reads the same weights as safetensors, memory-mapped, tensor by
tensor (and on top of the arithmetic it checks every value for NaN/Inf, hashes its output for the manifest and
``SHA256SUMS``, and fsyncs what it writes). The safetensors trajectory is written as the training loop writes one
(``save_tensors_atomic``: each file's sha256 recorded beside it as it is written), so the manifest takes the inputs'
recorded sha256s and the suite reads no input for its hash.

Each method runs in a fresh process, with torch (and for the suite its modules) imported before the clock
starts, the input files already in the page cache and the outputs written to a RAM file system (``/dev/shm``), so
the figures compare the work, not interpreter start-up or disk. The same two methods also run with their outputs on
the disk beside the inputs: the suite's fsync then waits for the disk to hold the output, while the baseline's
``torch.save`` returns once its bytes are in the page cache (the kernel writes them later), so that ratio says what
durability costs on the machine's disk. The parent samples the child's ``RssAnon`` from ``/proc/<pid>/status``
every few milliseconds: anonymous memory only, not the file pages a memory map brings in (those belong to the page
cache and are dropped under pressure). The methods alternate, ``--repeats`` times each; medians and bests are
reported, with CPU seconds (steadier than wall time where other processes share the cores) and the load average.

The suite's processes opt in to the allocator tweak `posthoc.limits.keep_slices_in_heap` (they do nothing but
average; `suite average` itself leaves the allocator alone), and `suite-untuned` runs without it: what the
tweak is worth. Another method, `suite average --hash-inputs`, reads every input in full for its sha256 and
checks it against the record: what a full integrity check of 2.5 GB of inputs costs on top.

    python benchmarks/posthoc.py                # ~5 minutes on 2 CPU cores; ~5.5 GB under /tmp while it runs
    python benchmarks/posthoc.py --layers 2     # a quick smoke test (a 2-layer model, same shapes otherwise)

Writes ``results.json`` and ``results.md`` into ``--results`` (default benchmarks/results/posthoc/). The synthetic
trajectory is written under ``--work`` (default a new folder in /tmp) and deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _shapes import gpt2_small_shapes  # benchmarks/ is sys.path[0] when this script runs

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
STEPS = (1000, 2000, 3000, 4000, 5000)   # k=5, nu=1000: the one window ends at the last step
SAMPLE_SECONDS = 0.002                   # how often the parent reads the child's RssAnon


# -- the synthetic trajectory ---------------------------------------------------------------------------------
def write_trajectory(work: Path, layers: int) -> tuple[Path, Path, int]:
    """The same five checkpoints twice: ``safetensors/step-N.safetensors`` (for the suite) and ``pt/step-N.pt``
    (``torch.save``, for the baseline). Weights drift a little from step to step, as a trajectory does.
    Returns both folders and the bytes of one checkpoint's tensors."""
    import torch

    from lawa_suite.checkpoints import save_tensors_atomic

    shapes = gpt2_small_shapes(layers)
    st_dir, pt_dir = work / "safetensors", work / "pt"
    st_dir.mkdir(parents=True)
    pt_dir.mkdir()
    generator = torch.Generator().manual_seed(0)
    weights = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()}
    for step in STEPS:
        for t in weights.values():  # in place: one checkpoint's worth of memory, whatever the step count
            t.add_(torch.randn(t.shape, generator=generator), alpha=1e-3)
        save_tensors_atomic(st_dir / f"step-{step:08d}.safetensors", weights, {"step": str(step)})
        torch.save(weights, pt_dir / f"step-{step:08d}.pt")
    return st_dir, pt_dir, sum(t.numel() * t.element_size() for t in weights.values())


def read_into_page_cache(files: list[Path]) -> float:
    """Read every file once (so both methods start from the page cache); the seconds it took."""
    buffer = bytearray(64 << 20)  # one buffer, reused: a fresh 64 MB per read would time page faults, not reading
    start = time.perf_counter()
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    return time.perf_counter() - start


# -- the two methods, each run in a child process (``--child``) ------------------------------------------------
def naive_average(files: list[Path], out: Path) -> None:
    """The LAWA paper's way: whole checkpoints through torch.load, a running fp32 sum, one torch.save."""
    import torch

    total = None
    for file in files:
        state = torch.load(file, map_location="cpu", weights_only=True)  # torch's default since 2.6, said outright
        if total is None:
            total = {name: t.float().clone() for name, t in state.items()}
        else:
            for name, t in state.items():
                total[name] += t
        del state
    torch.save({name: (t / len(files)).to(torch.float32) for name, t in total.items()}, out)


def suite_average(source: Path, out: Path, *switches: str) -> None:
    """`suite average <source> averager=lawa lawa.k=5 lawa.nu=1000 out=<out>` through the Typer app."""
    from lawa_suite.cli import app

    app(["average", str(source), "averager=lawa", "lawa.k=5", "lawa.nu=1000", f"out={out}", *switches],
        standalone_mode=False)


def rss_anon(pid: int | str = "self") -> int:
    """Anonymous resident memory of a process in bytes (heap, torch tensors; not mapped file pages)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/<pid>/status (Linux only)")


def child(method: str, source: Path, out: Path) -> None:
    """Import first (outside the clock), then time the work; print a JSON line for the parent. Every suite method
    but ``suite-untuned`` opts in to the allocator tweak (``keep_slices_in_heap``): this process does nothing but
    average, which is what the tweak is for; ``suite-untuned`` measures what it is worth."""
    import torch  # noqa: F401

    if method.startswith("suite"):
        from lawa_suite.posthoc.limits import keep_slices_in_heap

        if method != "suite-untuned":
            keep_slices_in_heap()
        import lawa_suite.cli  # noqa: F401
        import lawa_suite.posthoc  # noqa: F401 (the command imports it lazily; not start-up we want to time)

        # one call on a missing folder: what the CLI loads on its first call (typer's pydantic adapters) loads here
        try:
            suite_average(source / "no-such-folder", out.with_name("unused"))
        except Exception:  # noqa: BLE001 - the error is the point; nothing is written
            pass
    before = rss_anon()
    cpu_before = cpu_seconds()
    start = time.perf_counter()
    if method == "naive":
        naive_average(sorted(source.glob("*.pt")), out)
    else:
        suite_average(source, out, *(["--hash-inputs"] if method == "suite-hash-inputs" else []))
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds() - cpu_before, "rss_anon_before": before}),
          flush=True)


def cpu_seconds() -> float:
    """User plus system CPU time of this process, all threads (on a busy machine less noisy than wall time)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(method: str, source: Path, out: Path) -> dict:
    """Run one method in a fresh process; its seconds, its RssAnon once imported, and its sampled peak RssAnon."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", method, str(source), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, rss_anon(proc.pid))
        except (OSError, RuntimeError, ValueError):  # the process is exiting
            pass
        time.sleep(SAMPLE_SECONDS)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed (exit {proc.returncode}): {stderr.strip()[-2000:]}")
    report = json.loads(stdout.strip().splitlines()[-1])
    return {**report, "peak_rss_anon": peak}


# -- checking that both produced the same average --------------------------------------------------------------
def max_difference(suite_out: Path, naive_out: Path) -> float:
    """The largest absolute difference between the two derived checkpoints, tensor by tensor."""
    import torch
    from safetensors import safe_open

    naive = torch.load(naive_out, map_location="cpu", mmap=True, weights_only=True)
    worst = 0.0
    with safe_open(str(suite_out), framework="pt") as f:
        assert sorted(f.keys()) == sorted(naive), "the two outputs hold different tensors"
        for name in f.keys():
            worst = max(worst, float((f.get_tensor(name) - naive[name]).abs().max()))
    return worst


# -- the run --------------------------------------------------------------------------------------------------
def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


METHODS = {  # name -> (what the child runs, where the output goes)
    "naive": ("naive", "memory"), "suite": ("suite", "memory"), "suite-untuned": ("suite-untuned", "memory"),
    "suite-hash-inputs": ("suite-hash-inputs", "memory"), "naive-disk": ("naive", "disk"),
    "suite-disk": ("suite", "disk")}


def output_roots(work: Path, memory: Path | None) -> dict[str, Path]:
    """Where outputs go: ``memory`` (a RAM file system: writes and fsyncs cost memory copies, so the figures
    compare the work), and ``disk`` (beside the inputs: the suite's fsync then waits for the disk, the baseline's
    unsynced write does not)."""
    root = Path(tempfile.mkdtemp(prefix="lawa-posthoc-bench-out-", dir=memory)) if memory else work / "out-memory"
    root.mkdir(exist_ok=True)
    (work / "out-disk").mkdir()
    return {"memory": root, "disk": work / "out-disk"}


def run(args: argparse.Namespace) -> dict:
    load_before = os.getloadavg()[0]  # before our own work: how busy the machine is with other processes
    work = Path(tempfile.mkdtemp(prefix="lawa-posthoc-bench-", dir=args.work))
    memory = Path("/dev/shm") if args.memory_outputs and Path("/dev/shm").is_dir() else None
    roots = output_roots(work, memory)
    try:
        print(f"writing the synthetic trajectory under {work} ...", flush=True)
        st_dir, pt_dir, checkpoint_bytes = write_trajectory(work, args.layers)
        os.sync()  # the 5 GB just written would otherwise be written back to the disk during the first runs
        inputs = {"naive": (pt_dir, sorted(pt_dir.glob("*.pt"))),
                  "suite": (st_dir, sorted(st_dir.glob("*.safetensors")))}
        inputs["suite-hash-inputs"] = inputs["suite-untuned"] = inputs["suite"]
        runs: dict[str, list[dict]] = {method: [] for method in METHODS}
        page_cache_reads = []
        for repeat in range(-args.warmup, args.repeats):  # negative: warm-up runs, measured but not counted
            for method, (child_method, where) in METHODS.items():
                source, files = inputs[child_method]
                folder = roots[where] / f"{method}-{repeat}"
                folder.mkdir()
                out = folder / "avg.pt" if child_method == "naive" else folder / "avg"  # suite: a folder it creates
                seconds_to_read = read_into_page_cache(files)
                if method == "suite":
                    page_cache_reads.append(seconds_to_read)
                result = {**measure(child_method, source, out), "load_average": os.getloadavg()[0]}
                if repeat >= 0:
                    runs[method].append(result)
                label = f"{method} warm-up" if repeat < 0 else f"{method} #{repeat + 1}"
                print(f"{label}: {result['seconds']:.2f} s (CPU {result['cpu_seconds']:.2f} s), "
                      f"peak RssAnon {result['peak_rss_anon'] / 2**20:.0f} MiB", flush=True)
                if repeat == 0 and method in ("naive", "suite"):
                    continue  # kept for the comparison of the two averages
                shutil.rmtree(folder)  # a RAM file system holds one output at a time
        suite_out = roots["memory"] / "suite-0" / "avg" / "lawa-k5-nu1000" / "step-00005000.safetensors"
        difference = max_difference(suite_out, roots["memory"] / "naive-0" / "avg.pt")
        return summarise(runs, checkpoint_bytes, page_cache_reads, difference, load_before, args,
                         "a RAM file system (/dev/shm)" if memory else f"the disk ({args.work or '/tmp'})")
    finally:
        shutil.rmtree(roots["memory"], ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def summarise(runs: dict, checkpoint_bytes: int, page_cache_reads: list[float], difference: float,
              load_before: float, args: argparse.Namespace, outputs_on: str) -> dict:
    keys = ("seconds", "cpu_seconds", "peak_rss_anon", "rss_anon_before")
    median = {m: {k: statistics.median(r[k] for r in rs) for k in keys} for m, rs in runs.items()}
    best = {m: {k: min(r[k] for r in rs) for k in keys} for m, rs in runs.items()}
    ratio = lambda a, b: median[a]["seconds"] / median[b]["seconds"]  # noqa: E731
    return {
        "what": "LAWA k=5 nu=1000 over 5 fp32 checkpoints, one derived checkpoint: suite average vs the naive "
                "torch.load + sum",
        "command": " ".join(["python", "benchmarks/posthoc.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "checkpoint": {"parameters": checkpoint_bytes // 4, "bytes": checkpoint_bytes, "layers": args.layers,
                       "files": len(STEPS), "steps": list(STEPS)},
        "repeats": args.repeats,
        "warmup": args.warmup,
        "outputs_on": outputs_on,
        "note": args.note,
        "read_five_files_from_page_cache_s": statistics.median(page_cache_reads),
        "runs": runs,
        "median": median,
        "best": best,
        "time_ratio_naive_over_suite": {"median": median["naive"]["seconds"] / median["suite"]["seconds"],
                                        "best": best["naive"]["seconds"] / best["suite"]["seconds"]},
        "cpu_ratio_naive_over_suite": median["naive"]["cpu_seconds"] / median["suite"]["cpu_seconds"],
        "time_ratio_naive_over_suite_untuned": ratio("naive", "suite-untuned"),
        "time_ratio_untuned_over_tuned_allocator": ratio("suite-untuned", "suite"),
        "time_ratio_naive_over_suite_hash_inputs": ratio("naive", "suite-hash-inputs"),
        "time_ratio_naive_over_suite_outputs_on_disk": ratio("naive-disk", "suite-disk"),
        "suite_peak_rss_anon_over_checkpoint": max(r["peak_rss_anon"] for r in runs["suite"]) / checkpoint_bytes,
        "naive_peak_rss_anon_over_checkpoint": max(r["peak_rss_anon"] for r in runs["naive"]) / checkpoint_bytes,
        "max_abs_difference_suite_vs_naive": difference,
        "targets": {"time_ratio_at_least": 3.0, "suite_peak_rss_anon_over_checkpoint_below": 1.3},
    }


def markdown(r: dict) -> str:
    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    c, targets = r["checkpoint"], r["targets"]
    ratio, memory = r["time_ratio_naive_over_suite"], r["suite_peak_rss_anon_over_checkpoint"]
    verdict = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    lines = [
        "# Post-hoc averaging: `suite average` vs the naive baseline", "",
        f"LAWA k=5, nu=1000 over {c['files']} fp32 checkpoints of {c['parameters']:,} parameters (GPT-2-small names "
        f"and shapes, {c['layers']} layers; {mib(c['bytes'])} of tensors each), one derived checkpoint. "
        f"{r['repeats']} alternating runs of each (after {r.get('warmup', 0)} uncounted warm-up run(s) of each), "
        f"every one in a fresh process, with imports done and the inputs in "
        f"the page cache before the clock starts; outputs go to {r['outputs_on']} (the last two rows: to the disk "
        f"beside the inputs). Peak memory is the child's `RssAnon` (anonymous memory: memory-mapped file pages are "
        f"not counted), sampled every {SAMPLE_SECONDS * 1000:.0f} ms.", "",
        *([f"**{r['note']}**", ""] if r.get("note") else []),
        f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, torch {r['machine']['torch']}, Python "
        f"{r['machine']['python']}; {r['date']}. One-minute load average {r['load_average_before']:.1f} before the "
        f"benchmark and {r['load_average_after']:.1f} after it (above 0 before: other processes were using the "
        f"cores). Reading the {c['files']} safetensors files from the page cache takes "
        f"{r['read_five_files_from_page_cache_s']:.2f} s.", "",
        "| method | time, median (s) | time, best (s) | CPU, median (s) | peak RssAnon (max) | "
        "of which after imports | peak / one checkpoint |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, label in (("naive", "naive: `torch.load` each whole `.pt`, fp32 sum, `torch.save`"),
                        ("suite", "`suite average ... averager=lawa lawa.k=5 lawa.nu=1000`"),
                        ("suite-untuned", "the same without the allocator tweak (`keep_slices_in_heap`)"),
                        ("suite-hash-inputs", "the same with `--hash-inputs` (every input read for its sha256)"),
                        ("naive-disk", "naive, output on the disk (written, not synced)"),
                        ("suite-disk", "suite, output on the disk (fsynced before it returns)")):
        med, best = r["median"][name], r["best"][name]
        peak = max(x["peak_rss_anon"] for x in r["runs"][name])
        lines.append(f"| {label} | {med['seconds']:.2f} | {best['seconds']:.2f} | {med['cpu_seconds']:.2f} | "
                     f"{mib(peak)} | {mib(peak - med['rss_anon_before'])} | {peak / c['bytes']:.2f}x |")
    lines += [
        "",
        f"- time ratio naive / suite: **{ratio['median']:.1f}x** by medians, **{ratio['best']:.1f}x** by best runs "
        f"(target >= {targets['time_ratio_at_least']:.0f}x: "
        f"{verdict(ratio['median'] >= targets['time_ratio_at_least'])} by medians, "
        f"{verdict(ratio['best'] >= targets['time_ratio_at_least'])} by best runs); CPU seconds "
        f"naive / suite: {r['cpu_ratio_naive_over_suite']:.1f}x",
        f"- the allocator tweak the suite's runs here opt in to (`posthoc.limits.keep_slices_in_heap`, glibc's "
        f"mmap and trim thresholds raised; `suite average` itself leaves the allocator alone): without it the suite "
        f"takes {r['time_ratio_untuned_over_tuned_allocator']:.2f}x as long by medians, and the ratio naive / suite is "
        f"{r['time_ratio_naive_over_suite_untuned']:.1f}x",
        f"- with `--hash-inputs` (the sha256 of {c['files'] * c['bytes'] / 1e9:.1f} GB of inputs read in full and "
        f"checked against their records) the ratio is {r['time_ratio_naive_over_suite_hash_inputs']:.1f}x by medians",
        f"- outputs on the disk: {r['time_ratio_naive_over_suite_outputs_on_disk']:.1f}x by medians; the suite's "
        f"fsync waits for the disk to hold {c['bytes'] / 1e9:.1f} GB, while the baseline's write returns once it is in "
        f"the page cache",
        f"- suite peak RssAnon / one checkpoint: **{memory:.2f}x** (the worst run; interpreter and torch included; "
        f"target < {targets['suite_peak_rss_anon_over_checkpoint_below']}x: "
        f"{verdict(memory < targets['suite_peak_rss_anon_over_checkpoint_below'])})",
        f"- largest difference between the two averages: {r['max_abs_difference_suite_vs_naive']:.3g}",
        f"- the suite does work the baseline does not: a NaN/Inf check of every value, the sha256 of the output "
        f"({c['bytes'] / 1e9:.1f} GB, on a thread of its own), and an fsync of the output; the inputs' sha256s come "
        f"from the records written with them.",
        "", f"Command: `{r['command']}`", "",
        "Every run (wall / CPU seconds, load average after it):", "",
    ]
    for name, rs in r["runs"].items():
        lines.append(f"- {name}: " + ", ".join(f"{x['seconds']:.2f} / {x['cpu_seconds']:.2f} ({x['load_average']:.1f})"
                                               for x in rs))
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of each method (medians and bests are reported)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="uncounted runs of each method first (caches, allocator, CPU frequency settle; on "
                             "2026-12-03 both methods still ran slow for three or four runs after one warm-up)")
    parser.add_argument("--layers", type=int, default=12, help="transformer blocks (12: GPT-2 small, 124M)")
    parser.add_argument("--work", default=None, help="where the synthetic trajectory goes (default: /tmp)")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "posthoc")
    parser.add_argument("--disk-outputs", dest="memory_outputs", action="store_false",
                        help="main comparison with outputs on the disk too (default: on /dev/shm where there is one)")
    parser.add_argument("--note", default="", help="a line for results.md (e.g. what else was running)")
    args = parser.parse_args()
    result = run(args)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.results / "results.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
