"""Claim (e), linear mode connectivity after an early phase ("When, Where and Why to Average Weights?", Ajroldi et
al., ICML 2025; Frankle et al. 2020): past the first part of training, two checkpoints of one run lie in one basin,
so their average scores better than the mean of their scores; early on it need not.

A bench with ``lmc: [[a, b], ...]`` scores, after each run, the straight path between its saved weights at the
fractions a and b of its steps (``sweeps.run_lmc``). Per pair and seed, the midpoint's gain over the mean of the
two ends (positive = the average is better), summarised over seeds with 95% intervals; the claim is judged on the
pairs that start after the early phase (at 25% of the run or later) and the early pairs are reported beside them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from lawa_suite.report.paired import PHASES, combined, gain, t_interval
from lawa_suite.report.records import LrSummary, Verdict
from lawa_suite.rundir import LMC_DIR

__all__ = ["midpoint_gains", "claim_e"]


def midpoint_gains(runs: Sequence, metric: str, direction: str) -> dict[str, list[float]]:
    """pair label ("0.5-0.6") -> per run, the midpoint's gain over the mean of the two ends in ``metric``."""
    found: dict[str, list[float]] = {}
    for run in runs:
        for path in sorted(Path(run.path, LMC_DIR).glob("*/lmc.json")):
            rows = {round(r["alpha"], 6): r for r in json.loads(path.read_text())["rows"]}
            if not {0.0, 0.5, 1.0} <= set(rows) or metric not in rows[0.5]:
                continue
            ends = (rows[0.0][metric] + rows[1.0][metric]) / 2
            found.setdefault(path.parent.name, []).append(gain(direction, ends, rows[0.5][metric]))
    return found


def claim_e(where: str, s: LrSummary) -> list[Verdict]:
    gains = midpoint_gains(s.runs, s.headline, s.direction)
    if not gains:
        return []
    early_end = PHASES["early"][1]
    later = {k: t_interval(v) for k, v in gains.items() if float(k.split("-")[0]) >= early_end}
    early = {k: t_interval(v) for k, v in gains.items() if float(k.split("-")[0]) < early_end}
    if not later:
        return []
    outcome = combined([i.verdict for i in later.values()])
    evidence = "; ".join(f"midpoint of the checkpoints at {k.replace('-', ' and ')} of the run over their mean "
                         f"{s.headline}: {i.text()}" for k, i in sorted(later.items()))
    if early:
        evidence += "; early, for contrast: " + "; ".join(f"{k.replace('-', ' and ')}: {i.text()} ({i.verdict})"
                                                          for k, i in sorted(early.items()))
    summary = "; ".join(f"{k}: {i.text()}" for k, i in sorted(later.items())) + f" ({s.headline}, midpoint over ends)"
    return [Verdict("e", where, outcome, evidence, row=where, summary=summary, metric=s.headline)]
