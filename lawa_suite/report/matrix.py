"""The verdict matrix that opens a bench report: a row per experiment and learning rate, a column per claim (and
phase, where a claim is judged by phase), each cell held / did not hold / inconclusive. Markdown gets a compact
table of symbols; HTML a coloured one, each verdict with its gain and interval in the cell and its evidence on
hover. The bullet record (``claims.claims_section``) follows it with every number."""

from __future__ import annotations

import html
from collections.abc import Sequence

from lawa_suite.report.records import Verdict

__all__ = ["SYMBOLS", "MATRIX_BLOCK", "matrix_markdown", "matrix_html"]

SYMBOLS = {"held": "✓", "did not hold": "✗", "inconclusive": "?"}
MATRIX_BLOCK = "verdict-matrix"  # the marker that html.to_html replaces with matrix_html's table
_CLASS = {"held": "held", "did not hold": "not", "inconclusive": "inc"}
_PHASE_ORDER = ("", "end", "early-mid")


def _columns(verdicts: Sequence[Verdict]) -> list[str]:
    keys = {(v.claim, v.phase) for v in verdicts}
    return [f"({c}) {p}".strip() for c, p in sorted(keys, key=lambda k: (k[0], _PHASE_ORDER.index(k[1])
                                                                          if k[1] in _PHASE_ORDER else 9))]


def _rows(verdicts: Sequence[Verdict], order: Sequence[str]) -> list[str]:
    present = {v.row or v.where for v in verdicts}
    return [r for r in order if r in present] + sorted(present - set(order))


def _cell(verdicts: Sequence[Verdict], row: str, column: str) -> list[Verdict]:
    return [v for v in verdicts if (v.row or v.where) == row and v.column == column]


def _mean(verdict: Verdict) -> str:
    """The gain's mean, the summary's first number, when it starts with one."""
    first = verdict.summary.split(" ", 1)[0]
    return first if first[:1] in "+-" and any(ch.isdigit() for ch in first) else ""


def matrix_markdown(verdicts: Sequence[Verdict], order: Sequence[str], claim_text: dict[str, str]) -> list[str]:
    """The compact table, between markers that let the HTML page put the coloured one in its place, and a legend."""
    if not verdicts:
        return ["No claim could be judged with these runs.", ""]
    columns, rows = _columns(verdicts), _rows(verdicts, order)
    lines = [f"<!-- {MATRIX_BLOCK} -->", "| experiment, lr | " + " | ".join(columns) + " |",
             "|---|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            found = _cell(verdicts, row, column)
            cells.append(", ".join(f"{SYMBOLS[v.outcome]} {v.entry}".strip() for v in found))
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += [f"<!-- /{MATRIX_BLOCK} -->", "",
              "✓ held (the 95% interval of the paired gain lies above zero), ✗ did not hold (below), ? inconclusive "
              "(it spans zero, or one seed); the numbers are in \"The claims\" below. "
              + " ".join(f"({k}) {t}." for k, t in claim_text.items() if any(v.claim == k for v in verdicts)), ""]
    return lines


def matrix_html(verdicts: Sequence[Verdict], order: Sequence[str]) -> str:
    """The same matrix as an HTML table: each verdict a coloured badge with its mean gain, the interval and the
    metric that carried it in its tooltip."""
    columns, rows = _columns(verdicts), _rows(verdicts, order)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for column in columns:
            badges = []
            for v in _cell(verdicts, row, column):
                tip = f"{v.outcome}: {v.summary or v.evidence}" + (f" [carried by {v.metric}]" if v.metric else "")
                label = " ".join(part for part in (SYMBOLS[v.outcome], v.entry, _mean(v)) if part)
                badges.append(f'<span class="v {_CLASS[v.outcome]}" title="{html.escape(tip)}">'
                              f"{html.escape(label)}</span>")
            cells.append(f"<td>{''.join(badges)}</td>")
        body.append(f"<tr><th>{html.escape(row)}</th>{''.join(cells)}</tr>")
    return (f'<table class="matrix"><tr><th>experiment, lr</th>{head}</tr>' + "".join(body) + "</table>")
