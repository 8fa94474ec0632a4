"""How noisy is ddpm's FID at the CPU reference's scale, with 64 samples against 512 (issue 31, part 3)?

Runs the CPU reference's ddpm cell (preset cpu, CIFAR-10 JPEGs at 16 px, 250 steps, lr 4e-3, LAWA/EMA/SWA) for a
few seeds, evaluating at 50% and 100% of the run with ``fid.samples=512``. Each evaluation also scores the first
64 of those samples (the same starting noise a 64-sample run draws: a noise prefix), so the 64- and 512-sample
FIDs are of the very same weights. It records the wall time of every weights set's evaluation and writes
``results.json``; ``--summary`` prints the seed-to-seed spread of the raw FID and of each averager's gain.

    python benchmarks/fid_samples.py seeds=0,2 --out /tmp/fidn-a & python benchmarks/fid_samples.py seeds=1,3 \
        --out /tmp/fidn-b; python benchmarks/fid_samples.py --summary /tmp/fidn-a /tmp/fidn-b
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

PREFIX = 64
CELL = ["task=ddpm", "preset=cpu", "data=imagefolder", "data.path=../shared/data/cifar10-jpg.tar.gz",
        "ddpm.flip=true", "steps=250", "warmup=25", "lr=4e-3", "eval.every=125", "fid.samples=512",
        "averager=lawa,ema,swa", "swa.start=0.75", "lawa.k=5", "lawa.nu=5", "ema.decay=0.96", "progress=false"]


def measure(seeds: list[int], out: Path, extra: list[str]) -> None:
    import torch

    from lawa_suite.config import resolve
    from lawa_suite.evaluators import fid as fid_module
    from lawa_suite.training.loop import train

    torch.set_num_threads(1)  # two of these share the two cores
    records: list[dict] = []
    original = fid_module.FID.evaluate

    def evaluate(self, model, batches, accelerator=None):  # the same samples, scored whole and by their prefix
        device = next(model.parameters()).device
        reference = self.reference_stats(accelerator, device)
        kept: list = []
        features = self.features
        self.features = lambda images: kept.append(features(images)) or kept[-1]
        start = time.perf_counter()
        try:
            scores = original(self, model, batches, accelerator)
        finally:
            del self.features
        prefix = fid_module.FeatureStats()
        prefix.add(torch.cat(kept)[:PREFIX])
        mu, sigma = prefix.mean_cov()
        scores[f"{self.metric}_{PREFIX}"] = fid_module.frechet_distance(reference, {"mu": mu, "sigma": sigma})
        records.append({"seconds": time.perf_counter() - start, "context": self._last, **scores})
        return scores

    def begin(self, step, weights_name):
        self._context = self._last = (step, weights_name)

    fid_module.FID.evaluate, fid_module.FID.begin = evaluate, begin
    for seed in seeds:
        run_out = out / f"seed{seed}"
        start = time.perf_counter()
        words = dict(w.split("=", 1) for w in [*CELL, f"seed={seed}", f"out={run_out}", *extra])  # extra wins
        train(resolve([f"{k}={v}" for k, v in words.items()]))
        (out / f"seed{seed}.json").write_text(json.dumps({"seed": seed, "wall_s": time.perf_counter() - start,
                                                          "evaluations": records}, indent=1))
        records.clear()


def summary(folders: list[Path]) -> None:
    by_step: dict[int, dict[str, dict[int, dict]]] = {}
    seconds = []
    for folder in folders:
        for path in sorted(folder.glob("seed*.json")):
            data = json.loads(path.read_text())
            for r in data["evaluations"]:
                step, weights = r["context"]
                by_step.setdefault(step, {}).setdefault(weights, {})[data["seed"]] = r
                seconds.append(r["seconds"])
    first = next(iter(next(iter(by_step.values()))["raw"].values()))
    metric = next(k for k in first if k.startswith("fid") and not k.endswith(f"_{PREFIX}"))
    print(f"evaluation of one weights set (512 samples + held-out loss): median {statistics.median(seconds):.1f} s, "
          f"max {max(seconds):.1f} s over {len(seconds)}")
    for step, weights in sorted(by_step.items()):
        raw = weights["raw"]
        for key, label in ((f"{metric}_{PREFIX}", str(PREFIX)), (metric, "512")):
            values = [raw[s][key] for s in sorted(raw)]
            line = f"step {step} n={label}: raw {statistics.mean(values):.1f} sd {statistics.stdev(values):.1f}"
            for name, per_seed in weights.items():
                if name == "raw":
                    continue
                gains = [raw[s][key] - per_seed[s][key] for s in sorted(per_seed)]
                line += f" | {name} gain {statistics.mean(gains):+.2f} sd {statistics.stdev(gains):.2f}"
            print(line + f"  (seeds {sorted(raw)})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("words", nargs="*", help="seeds=0,1 and extra key=value words for the runs")
    parser.add_argument("--out", type=Path, default=Path("/tmp/fid-samples"))
    parser.add_argument("--summary", type=Path, nargs="+")
    args = parser.parse_intermixed_args()
    if args.summary:
        summary(args.summary)
        return
    seeds = [0, 1]
    extra = []
    for word in args.words:
        if word.startswith("seeds="):
            seeds = [int(s) for s in word.split("=", 1)[1].split(",")]
        else:
            extra.append(word)
    measure(seeds, args.out, extra)


if __name__ == "__main__":
    main()
