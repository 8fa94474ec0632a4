"""The one way the suite draws: a ``matplotlib.figure.Figure`` made and saved without pyplot, so a library call that
draws (a report, a profile, a linear path) neither switches the process's plotting backend nor registers figures
with pyplot; a notebook or a GUI that imports the suite keeps its own. It imports nothing of the suite, so any
layer may draw. Colours: one palette per report, so a weights name has one colour in all its figures.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["PALETTE", "palette", "colour_of", "wide_range", "signed_scale", "figure", "save"]

# matplotlib's default colours (tab10), fixed here so that no plot takes them from its own running colour cycle
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


def palette(names: Iterable[str]) -> dict[str, str]:
    """One colour per weights name for every plot of a report: raw black, the others ``PALETTE`` in order (raw
    first, then alphabetically) of ``names``, the report's whole set of names."""
    others = sorted({w for w in names if w != "raw"})
    return {"raw": "black", **{w: PALETTE[i % len(PALETTE)] for i, w in enumerate(others)}}


def colour_of(name: str, names: Iterable[str]) -> str:
    """The colour of weights ``name`` in a report whose plots draw ``names`` (``palette``)."""
    return palette([*names, name])[name]


def wide_range(values: Iterable[float]) -> bool:
    """Positive values spanning more than 8x (FID falls from hundreds to tens): drawn on a log axis."""
    values = list(values)
    return bool(values) and min(values) > 0 and max(values) / min(values) > 8


def signed_scale(ax: Any, values: Iterable[float], axis: str = "y", spread: float = 30.0) -> None:
    """Show every one of ``values`` (gains of either sign) on ``ax`` without squashing the small ones: when the
    largest magnitude is more than ``spread`` times the median one (early gains of an average still holding the
    initialisation dwarf the late ones), a symmetric log scale, linear within the median magnitude of zero. The
    limits always take in every value."""
    values = [v for v in values if v == v]  # NaN is no point
    if not values:
        return
    magnitudes = sorted(abs(v) for v in values if v != 0)
    low, high = min(values + [0.0]), max(values + [0.0])
    median = magnitudes[len(magnitudes) // 2] if magnitudes else 0.0
    if magnitudes and magnitudes[-1] > spread * median:  # linscale 1.5: room for the ticks around zero
        (ax.set_yscale if axis == "y" else ax.set_xscale)("symlog", linthresh=median, linscale=1.5)
    pad = 0.08 * (high - low or 1.0)
    (ax.set_ylim if axis == "y" else ax.set_xlim)(low - pad, high + pad)


def figure(rows: int = 1, cols: int = 1, size: tuple[float, float] = (6.4, 4.8)) -> tuple[Figure, Any]:
    """A figure of ``size`` inches and its ``rows`` x ``cols`` grid of axes (always 2-D: ``axes[row][col]``)."""
    from matplotlib.figure import Figure  # lazily: importing the report should not pay for matplotlib

    fig = Figure(figsize=size)
    return fig, fig.subplots(rows, cols, squeeze=False)


def save(fig: Figure, path: Path, dpi: int = 100) -> None:
    """Lay out ``fig`` and write it to ``path`` (the format from its suffix)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
