"""The LAWA paper's Figure 2 at CPU scale: is LAWA's gain over the raw weights larger at a high learning rate?

Sanyal et al. (2024) train nanoGPT-2 at the tuned learning rate and at ten times it, with LAWA, and find that
averaging helps the high-learning-rate run much more (its raw weights are noisier, so the mean of the latest
checkpoints sits closer to the valley floor). Here: the ``gpt2`` task's ``cpu`` preset (a 0.8M-parameter GPT-2
on bytes of Tiny Shakespeare, 600 steps of 1,024 tokens) at ``--high-lr`` (the preset's 1e-2) and a tenth of
it, each with LAWA (the preset's k=5, nu=10), for every seed in ``--seeds``. Raw and LAWA weights are scored on
the same held-out windows at every evaluation.

    python benchmarks/gpt2_figure2.py                     # 2 learning rates x 3 seeds: ~6 minutes on 2 idle cores
    python benchmarks/gpt2_figure2.py --seeds 0,1 steps=100 eval.every=25 --results /tmp/quick   # a smoke test

Writes into ``--results`` (default benchmarks/results/gpt2-figure2/): results.json (every curve and the summary),
results.md (the table) and figure2.png (held-out loss against step, raw and LAWA, per learning rate; and LAWA's
gain against step). Runs go to a temporary folder, never into the repo. Extra ``key=value`` arguments override
the preset for every run.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lawa_suite.config import resolve
from lawa_suite.report import load_metrics
from lawa_suite.training.loop import train

HERE = Path(__file__).resolve().parent
SHARED_TEXT = HERE.parents[1] / "shared" / "data" / "tinyshakespeare.txt"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--high-lr", type=float, default=1e-2, help="the high learning rate (its tenth is the other)")
    parser.add_argument("--seeds", type=lambda text: [int(s) for s in text.split(",")], default=[0, 1, 2],
                        help="comma-separated, e.g. 0,1,2")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "gpt2-figure2")
    parser.add_argument("--from-json", type=Path, help="re-summarise a results.json without training again")
    parser.add_argument("overrides", nargs="*", help="key=value for every run, e.g. steps=300")
    return parser.parse_args()


def data_overrides() -> list[str]:
    """The shared Tiny Shakespeare file when it is there; else the embedded copy of the same text."""
    return ["data=text", f"data.path={SHARED_TEXT}"] if SHARED_TEXT.is_file() else ["data=embedded"]


def run_one(lr: float, seed: int, root: Path, overrides: list[str]) -> dict:
    out = root / f"lr{lr:g}-seed{seed}"
    cfg = resolve(["task=gpt2", "preset=cpu", "averager=lawa", f"lr={lr}", f"seed={seed}", f"out={out}",
                   f"data.cache={root / 'cache'}", "progress=false", *data_overrides(), *overrides])
    start = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - start
    curves, train_loss = load_metrics(out / "metrics.jsonl")
    lawa = cfg.averagers["lawa"]
    return {"lr": lr, "seed": seed, "seconds": round(seconds, 1), "settled_from": 2 * lawa.k * lawa.nu,
            "raw": curves["raw"]["loss"], "lawa": curves["lawa"]["loss"], "train": train_loss}


def gains(run: dict) -> dict[int, float]:
    """Raw loss minus LAWA loss at every step both were scored (positive: LAWA is better)."""
    lawa = dict(run["lawa"])
    return {step: raw - lawa[step] for step, raw in run["raw"] if step in lawa}


def steps_to(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, value in curve if value <= target), None)


def summarise(runs: list[dict], settled: int) -> list[dict]:
    """Per learning rate, over seeds. ``settled``: the first step whose LAWA window no longer reaches back into
    the first window (2 k nu): before it LAWA averages the fast-changing first steps and trails by construction."""
    rows = []
    for lr in sorted({r["lr"] for r in runs}, reverse=True):
        group = [r for r in runs if r["lr"] == lr]
        per_seed = [gains(r) for r in group]
        steps = sorted(set.intersection(*(set(g) for g in per_seed)))
        mean_gain = [statistics.mean(g[s] for g in per_seed) for s in steps]
        run_steps = group[0]["raw"][-1][0]
        final_raw = [r["raw"][-1][1] for r in group]
        final_lawa = [dict(r["lawa"])[r["raw"][-1][0]] for r in group]
        # steps saved: when LAWA first reaches the raw run's final loss, against the run's length
        reach = [steps_to(r["lawa"], r["raw"][-1][1]) for r in group]
        rows.append({
            "lr": lr, "seeds": len(group), "steps": steps, "mean_gain_by_step": mean_gain,
            "mean_gain": statistics.mean(mean_gain), "max_gain": max(mean_gain), "settled_from": settled,
            "mean_gain_settled": statistics.mean([v for s, v in zip(steps, mean_gain) if s >= settled] or [math.nan]),
            "gain_first_half": statistics.mean([v for s, v in zip(steps, mean_gain) if settled <= s <= run_steps / 2]
                                               or [math.nan]),
            "final_raw": statistics.mean(final_raw), "final_lawa": statistics.mean(final_lawa),
            "final_gain": statistics.mean(a - b for a, b in zip(final_raw, final_lawa)),
            "final_gain_sd": statistics.stdev(a - b for a, b in zip(final_raw, final_lawa)) if len(group) > 1 else 0.0,
            "lawa_reaches_raw_final_at": reach, "run_steps": run_steps,
            "final_by_seed": list(zip(final_raw, final_lawa)),
        })
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# LAWA's gain at a high learning rate and at its tenth (gpt2 `cpu` preset, {meta['text']})", "",
             f"{meta['seeds']} seeds per learning rate; held-out loss in nats per byte (lower is better); gain = raw "
             f"minus LAWA on the same windows. Command: `{meta['command']}`", "",
             f"Settled: evaluations from step {rows[0]['settled_from']} (2 k nu) on; before it LAWA's window still "
             f"averages the first, fast-changing steps.", "",
             "| lr | final raw | final LAWA | final gain (sd) | mean gain, all evaluations | mean gain, settled "
             "| settled, first half | max gain | LAWA reaches raw's final loss at step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reach = ", ".join("never" if s is None else str(s) for s in r["lawa_reaches_raw_final_at"])
        lines.append(f"| {r['lr']:g} | {r['final_raw']:.4f} | {r['final_lawa']:.4f} | {r['final_gain']:+.4f} "
                     f"({r['final_gain_sd']:.4f}) | {r['mean_gain']:+.4f} | {r['mean_gain_settled']:+.4f} | "
                     f"{r['gain_first_half']:+.4f} | "
                     f"{r['max_gain']:+.4f} | {reach} (of {r['run_steps']}) |")
    high, low = rows[0], rows[-1]
    verdict = "larger" if high["mean_gain_settled"] > low["mean_gain_settled"] else "not larger"
    lines += ["", f"LAWA's settled mean gain is {verdict} at the high learning rate ({high['mean_gain_settled']:+.4f} "
              f"at lr={high['lr']:g} vs {low['mean_gain_settled']:+.4f} at lr={low['lr']:g}).", "",
              "Final loss per seed (raw / LAWA): " + "; ".join(
                  f"lr={r['lr']:g}: " + ", ".join(f"{a:.3f}/{b:.3f}" for a, b in r["final_by_seed"]) for r in rows), "",
              f"Machine: {meta['machine']}; {meta['wall_seconds']:.0f} s wall, {meta['cpu_seconds']:.0f} s CPU "
              f"for all runs.", ""]
    return "\n".join(lines)


def plot(runs: list[dict], rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = [r["lr"] for r in rows]
    fig, axes = plt.subplots(1, len(lrs) + 1, figsize=(5 * (len(lrs) + 1), 4))
    for ax, lr in zip(axes, lrs):
        for run in (r for r in runs if r["lr"] == lr):
            first = run["seed"] == runs[0]["seed"]  # one legend entry per line kind
            ax.plot(*zip(*run["raw"]), color="tab:gray", alpha=0.8, label="raw" if first else None)
            ax.plot(*zip(*run["lawa"]), color="tab:red", alpha=0.8, label="LAWA" if first else None)
        ax.set(title=f"lr = {lr:g}", xlabel="step", ylabel="held-out loss (nats/byte)")
        low = min(v for r in runs if r["lr"] == lr for _, v in r["raw"])
        ax.set_ylim(low - 0.05, low + 1.0)
        ax.legend()
    for row, colour in zip(rows, ("tab:red", "tab:blue", "tab:green")):
        axes[-1].plot(row["steps"], row["mean_gain_by_step"], color=colour, label=f"lr = {row['lr']:g}")
    axes[-1].axhline(0, color="black", linewidth=0.8)
    axes[-1].set(title=f"LAWA's gain (raw - LAWA), mean of {rows[0]['seeds']} seeds", xlabel="step", ylabel="nats/byte")
    axes[-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    args = parse_args()
    args.results.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        lawa = resolve(["task=gpt2", "preset=cpu", "averager=lawa", *args.overrides]).averagers["lawa"]
        saved["meta"].setdefault("settled_from", 2 * lawa.k * lawa.nu)   # files written before it was recorded
        write_results(saved["runs"], saved["meta"], args.results)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="gpt2-figure2-") as root:
        for lr in (args.high_lr, args.high_lr / 10):
            for seed in args.seeds:
                runs.append(run_one(lr, seed, Path(root), args.overrides))
                print(f"lr={lr:g} seed={seed}: raw {runs[-1]['raw'][-1][1]:.4f}, LAWA {runs[-1]['lawa'][-1][1]:.4f} "
                      f"({runs[-1]['seconds']:.0f} s)", flush=True)
    meta = {"command": "python benchmarks/gpt2_figure2.py " + " ".join(sys.argv[1:]),
            "text": f"Tiny Shakespeare ({'shared file' if SHARED_TEXT.is_file() else 'embedded copy'})",
            "seeds": len(args.seeds), "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}", "wall_seconds": time.perf_counter() - start, "cpu_seconds": cpu_seconds(),
            "settled_from": runs[0]["settled_from"]}
    write_results(runs, meta, args.results)


def write_results(runs: list[dict], meta: dict, results: Path) -> None:
    rows = summarise(runs, meta["settled_from"])
    (results / "results.json").write_text(json.dumps({"meta": meta, "summary": rows, "runs": runs}, indent=1))
    (results / "results.md").write_text(markdown(rows, meta))
    plot(runs, rows, results / "figure2.png")
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
