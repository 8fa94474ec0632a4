"""The LAWA paper's diffusion claim at CPU scale: does averaging the weights of a DDPM run (LAWA, EMA, SWA)
give better samples, sooner, than the raw weights?

One run of exactly ``suite run task=ddpm averager=lawa,ema,swa preset=cpu`` (a 1.1M-parameter UNet on the
offline 16 px digits, 1,500 steps, constant LR after warm-up; run as a subprocess, so its wall and CPU time
are the command's own). Every evaluation scores raw and averaged weights by FID of the same 256 DDIM samples
(the same starting noise for every weights) and by the held-out denoising loss. FID features come from
Inception when its weights are on disk, else from the suite's offline stand-in (recorded in the results).

Then two checks on what the curves can bear:

- scale: the FID of real held-out digits (what a perfect model scores with this many samples) and of uniform
  noise, with the run's extractor and reference statistics;
- a re-check of the final checkpoint: FID of every weights from ``--recheck-samples`` samples drawn from other
  starting noise (``--recheck-seeds``), so a difference seen in the run is not an accident of its 256 draws.

    python benchmarks/ddpm_cpu.py                       # ~10 minutes on 2 idle CPU cores, ~3 more for the re-check
    python benchmarks/ddpm_cpu.py --threads 1           # on a machine other jobs share
    python benchmarks/ddpm_cpu.py steps=300 eval.every=100 --recheck-samples 256 --results /tmp/quick  # smoke test

Writes into ``--results`` (default benchmarks/results/ddpm-cpu/): results.json (every curve, the summary, the
checks, timings, the resolved config), results.md (the tables), curves.png (FID, held-out loss and training
loss against step, per weights) and the sample grids of every weights at the first and the last evaluation.
The run itself goes to ``--run`` (default: a new temporary folder), never into the repo. Extra ``key=value``
arguments are passed to ``suite run``. What the recorded results show is written up by hand in notes.md there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from lawa_suite import registry
from lawa_suite.config import dotted, resolve
from lawa_suite.rundir import load_resolved
from lawa_suite.evaluators.fid import FID, FeatureStats, fid_metric, frechet_distance, resolve_extractor
from lawa_suite.export import select_weights
from lawa_suite.report import load_metrics, metric_directions, plot_curves, summarise

HERE = Path(__file__).resolve().parent
WEIGHTS = ("raw", "lawa", "ema", "swa")
SUITE_RUN = ["task=ddpm", "averager=lawa,ema,swa", "preset=cpu"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="extra key=value settings for suite run")
    parser.add_argument("--run", type=Path, default=None, help="the run folder (must be new); default: a temp folder")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "ddpm-cpu", help="where results go")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default, one per core); on a machine other jobs share, "
                             "1 keeps OpenMP threads from spinning against them")
    parser.add_argument("--recheck-samples", type=int, default=1024, help="samples per weights in the re-check")
    parser.add_argument("--recheck-seeds", type=lambda text: [int(s) for s in text.split(",")], default=[1, 2],
                        help="sample seeds of the re-check (the run samples from seed 0), comma-separated")
    return parser.parse_args()


# -- the run ---------------------------------------------------------------------------------------------------
def children_cpu_seconds() -> float:
    """User + system CPU time of finished child processes: unlike wall time on a machine shared with other
    jobs, it does not count the neighbours."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_suite(run: Path, overrides: list[str], threads: int) -> dict[str, float]:
    """``suite run task=ddpm averager=lawa,ema,swa preset=cpu out=RUN`` in a subprocess; its wall and CPU time."""
    command = [str(Path(sys.executable).with_name("suite")), "run", *SUITE_RUN, f"out={run}", "progress=false",
               *overrides]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    print("$ " + " ".join(command[1:]), flush=True)
    start, cpu_start = time.perf_counter(), children_cpu_seconds()
    subprocess.run(command, env=env, check=True)
    return {"wall_s": round(time.perf_counter() - start, 1), "cpu_s": round(children_cpu_seconds() - cpu_start, 1)}


# -- checks ----------------------------------------------------------------------------------------------------
def setup_task(cfg):
    task = registry.tasks.get(cfg.run.task)(cfg.task, cfg.run)
    task.setup()
    return task


def reference_points(cfg) -> dict[str, float]:
    """FID of real held-out digits and of uniform noise, as many as the run samples, with the run's extractor."""
    task = setup_task(cfg)
    fid = FID(task)
    reference = fid.reference_stats(None, torch.device("cpu"))
    n, size = cfg.task.fid.samples, cfg.task.image_size
    images = {"real held-out images": task.data.test_images[:n],
              "uniform noise": torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(0),
                                             dtype=torch.uint8)}
    points: dict[str, float] = {"samples": min(n, len(task.data.test_images))}
    for name, batch in images.items():
        stats = FeatureStats()
        stats.add(fid.features(batch))
        mu, sigma = stats.mean_cov()
        points[name] = frechet_distance(reference, {"mu": mu, "sigma": sigma})
    return points


def recheck_final(run: Path, weights_names: list[str], samples: int, seeds: list[int]) -> dict[str, object]:
    """FID of ``weights_names`` in the final checkpoint, from ``samples`` samples per seed in ``seeds``."""
    saved = dotted(yaml.safe_load((run / "config.yaml").read_text()))
    scores: dict[str, list[float]] = {}  # weights -> FID per seed, in the order of ``seeds``
    seconds: list[float] = []
    for seed in seeds:
        cfg = resolve([f"ddpm.fid.samples={samples}", f"ddpm.sample_seed={seed}", "ddpm.fid.grid=0"], base=saved)
        task = setup_task(cfg)
        fid, model = FID(task), task.build_model().eval()
        for weights in weights_names:
            state, _ = select_weights(run, weights, cfg)
            model.load_state_dict(state)
            start = time.perf_counter()
            with torch.no_grad():
                scores.setdefault(weights, []).append(fid.evaluate(model, task.eval_batches())[fid.metric])
            seconds.append(time.perf_counter() - start)
    return {"samples": samples, "seeds": seeds, "fid": scores,
            "s_per_weights_scored": round(sum(seconds) / len(seconds), 1)}


# -- results ---------------------------------------------------------------------------------------------------
def copy_grids(run: Path, results: Path, first: int, last: int) -> list[str]:
    """Copy the sample grids of the first and the last evaluation, per weights; returns the names written."""
    written = []
    for label, step in (("first", first), ("final", last)):
        for weights in WEIGHTS:
            grid = run / "samples" / f"step-{step:08d}-{weights}.png"
            if grid.exists():  # an averager not ready yet at that step has none
                written.append(f"samples-{label}-{weights}.png")
                shutil.copy(grid, results / written[-1])
    return written


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run = args.run or Path(tempfile.mkdtemp(prefix="ddpm-cpu-bench-")) / "run"
    timing = run_suite(run, args.overrides, args.threads)

    cfg = load_resolved(run / "config.yaml")
    curves, train_loss = load_metrics(run / "metrics.jsonl")
    metrics, rows = summarise(curves, metric_directions("ddpm"))
    points = reference_points(cfg)
    extractor = resolve_extractor(cfg.task.fid)  # what the run used: auto picks by the same file test
    scored_last = [w for w in WEIGHTS
                   if any(s == cfg.run.steps for s, _ in curves.get(w, {}).get(fid_metric(extractor), []))]
    recheck = recheck_final(run, scored_last, args.recheck_samples, args.recheck_seeds)

    results = args.results
    results.mkdir(parents=True, exist_ok=True)
    plot_curves(curves, train_loss, metrics, results / "curves.png",
                f"ddpm cpu preset: FID ({extractor}) and held-out loss per weights")
    grids = copy_grids(run, results, cfg.run.eval.every, cfg.run.steps)
    record = {
        "command": " ".join(["suite run", *SUITE_RUN, *args.overrides]),
        "benchmark": " ".join(["python benchmarks/ddpm_cpu.py", *sys.argv[1:]]),
        "config": cfg.as_dict(), "fid_extractor": extractor, "reference_points": points, "timing": timing,
        "curves": curves, "summary": rows, "recheck_final": recheck, "grids": grids,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cores": os.cpu_count(),
                    "threads": args.threads or "default", "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
    }
    (results / "results.json").write_text(json.dumps(record, indent=1))
    (results / "results.md").write_text(markdown(record))
    print((results / "results.md").read_text())


def markdown(record: dict) -> str:
    return "\n".join(header(record) + by_step(record, fid_metric(record["fid_extractor"]), "FID", "{:.2f}") +
                     by_step(record, "loss", "Held-out denoising loss", "{:.4f}") + summary(record) +
                     recheck_table(record) + footer(record))


def header(record: dict) -> list[str]:
    cfg, points = record["config"], record["reference_points"]
    ddpm = cfg["ddpm"]
    standin = (" (the offline stand-in: a fixed random conv net; its numbers rank sample sets but are not "
               "comparable with published FIDs)" if record["fid_extractor"] == "standin" else "")
    return [
        "# DDPM, cpu preset: FID of raw and averaged weights", "",
        f"`{record['command']}` (through `{record['benchmark']}`): {cfg['steps']} steps, batch {cfg['batch_size']}, "
        f"lr {cfg['lr']} ({cfg['schedule']} after {cfg['warmup']} warm-up steps), {ddpm['image_size']} px "
        f"{cfg['data']['source']} data, UNet widths {ddpm['channels']}; LAWA k={cfg['lawa']['k']} "
        f"nu={cfg['lawa']['nu']}, EMA decay {cfg['ema']['decay']}, SWA from {cfg['swa']['start']} of the run.",
        f"FID: {ddpm['fid']['samples']} DDIM samples ({ddpm['sample_steps']} steps, the same noise for every weights "
        f"and every evaluation) against {ddpm['fid']['reference']} training images, features from "
        f"**{record['fid_extractor']}**{standin}.",
        f"Scale: {points['samples']} real held-out digits score **{points['real held-out images']:.2f}**; "
        f"uniform noise scores **{points['uniform noise']:.1f}**.", ""]


def by_step(record: dict, metric: str, title: str, fmt: str) -> list[str]:
    curves = record["curves"]
    steps = sorted({s for c in curves.values() for s, _ in c.get(metric, [])})
    lines = [f"## {title} by step", "", "| step | " + " | ".join(WEIGHTS) + " |", "|---|" + "---|" * len(WEIGHTS)]
    for step in steps:
        cells = [dict(curves.get(w, {}).get(metric, [])).get(step) for w in WEIGHTS]
        lines.append(f"| {step} | " + " | ".join("-" if v is None else fmt.format(v) for v in cells) + " |")
    return lines + [""]


def summary(record: dict) -> list[str]:
    lines = ["## Summary", "", "| weights | final FID | best FID (step) | final loss | first step at raw's final FID |",
             "|---|---|---|---|---|"]
    for row in record["summary"]:
        fid, loss = row.get(fid_metric(record["fid_extractor"])), row.get("loss")
        if fid:
            reached = row.get("steps_to_raw_final")
            lines.append(f"| {row['weights']} | {fid['final']:.2f} | {fid['best']:.2f} ({fid['best_step']}) | "
                         f"{loss['final']:.4f} | {reached if reached is not None else 'not reached'} |")
    return lines + [""]


def recheck_table(record: dict) -> list[str]:
    recheck = record["recheck_final"]
    seeds = recheck["seeds"]
    lines = [f"## Final checkpoint, re-checked: FID of {recheck['samples']} samples from other noise", "",
             "| weights | " + " | ".join(f"sample seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for weights, values in recheck["fid"].items():
        lines.append(f"| {weights} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    return lines + [""]


def footer(record: dict) -> list[str]:
    timing, machine = record["timing"], record["machine"]
    return [f"Time of `{record['command']}`: {timing['wall_s']:.0f} s wall, {timing['cpu_s']:.0f} s CPU (user + "
            f"system), threads: {machine['threads']}, on {machine['cores']} cores shared with other jobs (load "
            f"average {machine['load_avg_1m_at_end']} at the end); torch {machine['torch']}. The re-check scored "
            f"each weights in {record['recheck_final']['s_per_weights_scored']:.0f} s.", "",
            "![FID and held-out loss per weights](curves.png)", "",
            "Samples (the same noise for every weights) at the first evaluation: " + grid_links(record, "first")
            + "; at the last: " + grid_links(record, "final") + ".", ""]


def grid_links(record: dict, label: str) -> str:
    prefix = f"samples-{label}-"
    return ", ".join(f"[{name[len(prefix):-4]}]({name})" for name in record["grids"] if name.startswith(prefix))


if __name__ == "__main__":
    sys.exit(main())
