"""Post-hoc EMA against online EMA of the same length (issue 18): for runs that stored phema's tracks and also
trained an EMA length online (a named instance), the reconstructed weights' relative L2 distance from the online
ones, and both scores on the same held-out batches (the online one from the run's metrics.jsonl, the reconstructed
one from `suite average ... eval=true`).

    python benchmarks/phema_synthesis.py RUN:POSTHOC_OUT:INSTANCE:SIGMA [...]

e.g. runs/gpt2-phema-s0:post/s0:phema_c:0.07 (see benchmarks/results/phema-synthesis/README.md for the runs).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from lawa_suite.export import select_weights
from lawa_suite.rundir import load_resolved


def final_scores(metrics: Path, weights: str) -> dict[str, float]:
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    val = [r for r in records if r.get("split") == "val" and r["weights"] == weights]
    return {k: v for k, v in val[-1].items() if k not in ("step", "weights", "split")} | {"step": val[-1]["step"]}


def compare(run: Path, posthoc: Path, instance: str, sigma: str) -> dict[str, object]:
    cfg = load_resolved(run)
    online, _ = select_weights(run, instance, cfg)
    folder = posthoc / f"phema-sigma_rel{sigma}"
    manifest = json.loads((folder / "manifest.json").read_text())["outputs"][-1]
    synthesized = load_file(str(folder / manifest["file"]))
    names = [n for n, t in online.items() if t.is_floating_point() and n in synthesized]
    diff = torch.sqrt(sum(((synthesized[n].double() - online[n].double()) ** 2).sum() for n in names))
    norm = torch.sqrt(sum((online[n].double() ** 2).sum() for n in names))
    raw_online = final_scores(run / "metrics.jsonl", "raw")
    return {"run": str(run), "sigma_rel": float(sigma), "step": manifest["step"],
            "profile_error": manifest["profile_error"], "weights_relative_l2": float(diff / norm),
            "online": final_scores(run / "metrics.jsonl", instance),
            "reconstructed": final_scores(posthoc / "metrics.jsonl", folder.name),
            "raw_online": raw_online, "raw_posthoc": final_scores(posthoc / "metrics.jsonl", "raw")}


def main(args: list[str]) -> None:
    for arg in args:
        run, posthoc, instance, sigma = arg.split(":")
        print(json.dumps(compare(Path(run), Path(posthoc), instance, sigma)))


if __name__ == "__main__":
    main(sys.argv[1:])
