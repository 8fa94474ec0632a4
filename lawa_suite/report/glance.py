"""What opens a bench report, answers at a glance: the verdict matrix (``matrix.py``), then per experiment a forest
plot of the paired gains by phase and the gain curves with their interval bands (``gainplots.py``). The bullet
record of every claim follows it in the report."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lawa_suite.report.gainplots import GainPanel, band_figure, forest_figure
from lawa_suite.report.matrix import matrix_markdown
from lawa_suite.report.paired import INTERVAL_NOTE
from lawa_suite.report.records import Verdict

__all__ = ["glance_section"]


def glance_section(verdicts: Sequence[Verdict], order: Sequence[str], claim_text: dict[str, str],
                   experiments: Sequence[tuple[str, str, list[GainPanel]]], out: Path,
                   colours: dict[str, str]) -> list[str]:
    """Markdown of the section; draws ``<png>-forest.png`` and ``<png>-gains.png`` for each ``(label, png,
    panels)`` of ``experiments``."""
    lines = ["## Answers at a glance", "", *matrix_markdown(verdicts, order, claim_text), INTERVAL_NOTE, "",
             "### Paired gains by phase (forest plots)", ""]
    drawn = [(label, png, panels) for label, png, panels in experiments if panels and any(p.names for p in panels)]
    for label, png, panels in drawn:
        forest_figure(panels, out / f"{png}-forest.png", colours)
        lines += [f"![{label}: paired gains by phase]({png}-forest.png)", ""]
    lines += ["### Gain over raw at each evaluation, with 95% bands", ""]
    for label, png, panels in drawn:
        band_figure(panels, out / f"{png}-gains.png", colours)
        lines += [f"![{label}: gain curves]({png}-gains.png)", ""]
    return lines
