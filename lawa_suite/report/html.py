"""Markdown -> one self-contained HTML page, for the subset the reports write: headings, paragraphs, lists
(one level of nesting), tables and images; PNGs are embedded as base64 so the page travels alone. A region between
``<!-- name -->`` and ``<!-- /name -->`` is replaced by ready HTML given for ``name`` (the coloured verdict matrix
in place of its Markdown table); other comment lines are dropped."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping
from pathlib import Path

__all__ = ["to_html"]

_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}table{border-collapse:"
          "collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
          "li.sub{margin-left:2em;list-style:circle}code{background:#f4f4f4}"
          "table.matrix td,table.matrix th{font-size:85%;vertical-align:top}"
          ".v{display:inline-block;margin:1px 2px;padding:1px 5px;border-radius:3px;white-space:nowrap;cursor:help}"
          ".v.held{background:#b7e1b9}.v.not{background:#f4b6b6}.v.inc{background:#e6e6e6;color:#444}")


def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def _image(line: str, folder: Path) -> str:
    alt, src = re.match(r"!\[(.*?)\]\((.+?)\)", line).groups()  # type: ignore[union-attr]
    file = folder / src
    data = f"data:image/png;base64,{base64.b64encode(file.read_bytes()).decode()}" if file.is_file() else src
    return f'<p><img alt="{html.escape(alt)}" src="{data}" style="max-width:100%"></p>'


def to_html(markdown: str, folder: Path, title: str, blocks: Mapping[str, str] | None = None) -> str:
    """A self-contained HTML page of ``markdown``: PNGs referenced from ``folder`` are embedded as base64; each
    marked region named in ``blocks`` becomes that HTML."""
    body: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = re.fullmatch(r"<!-- (\S+) -->", line.strip())
        if marker and marker.group(1) in (blocks or {}):
            body.append(blocks[marker.group(1)])  # type: ignore[index]
            end = f"<!-- /{marker.group(1)} -->"
            while i < len(lines) and lines[i].strip() != end:
                i += 1
        elif line.startswith("<!--"):
            pass
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("!["):
            body.append(_image(line, folder))
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            head, rest = rows[0], [r for r in rows[1:] if not all(set(c) <= set("-: ") for c in r)]
            body.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>" +
                        "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rest) +
                        "</table>")
            continue
        elif line.lstrip().startswith("- "):
            items = []
            while i < len(lines) and lines[i].lstrip().startswith("- "):
                nested = lines[i].startswith("  ")
                items.append(f"<li{' class=sub' if nested else ''}>{_inline(lines[i].lstrip()[2:])}</li>")
                i += 1
            body.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
        i += 1
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
