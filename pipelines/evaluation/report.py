"""The evaluation report: one page, written as Markdown (for repositories and terminals) and as a
self-contained HTML file (images embedded, so it can be mailed or attached to an MLflow run).

A report is a title and a list of sections; a section holds paragraphs, at most one table and any
number of figures (PNG bytes). This module only lays out what the evaluate stage computed.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field

from pipelines.data import storage


@dataclass
class Figure:
    caption: str
    filename: str  # where the Markdown expects the PNG, next to report.md
    png: bytes


@dataclass
class Table:
    columns: list[str]
    rows: list[list[object]]

    def __post_init__(self) -> None:
        for row in self.rows:
            if len(row) != len(self.columns):
                raise ValueError(
                    f"table row {row} has {len(row)} cells, expected {len(self.columns)} ({self.columns})"
                )


@dataclass
class Section:
    heading: str
    paragraphs: list[str] = field(default_factory=list)
    table: Table | None = None
    figures: list[Figure] = field(default_factory=list)


@dataclass
class Report:
    title: str
    sections: list[Section]


def format_value(value: object) -> str:
    """Numbers with 4 significant digits; NaN as 'n/a'; anything else as str."""
    if isinstance(value, bool) or value is None:
        return "n/a" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _md_cell(value: object) -> str:
    return format_value(value).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: Report) -> str:
    lines = [f"# {report.title}", ""]
    for section in report.sections:
        lines += [f"## {section.heading}", ""]
        for paragraph in section.paragraphs:
            lines += [paragraph, ""]
        if section.table is not None:
            table = section.table
            lines.append("| " + " | ".join(table.columns) + " |")
            lines.append("|" + "|".join("---" for _ in table.columns) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
            lines.append("")
        for figure in section.figures:
            lines += [f"![{figure.caption}]({figure.filename})", "", f"*{figure.caption}*", ""]
    return "\n".join(lines)


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: 0 1rem 1rem 0; vertical-align: top; }
figure img { image-rendering: pixelated; min-width: 12rem; border: 1px solid #ccc; }
"""


def render_html(report: Report) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(report.title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{e(report.title)}</h1>",
    ]
    for section in report.sections:
        parts.append(f"<h2>{e(section.heading)}</h2>")
        parts += [f"<p>{e(p)}</p>" for p in section.paragraphs]
        if section.table is not None:
            parts.append(
                "<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in section.table.columns) + "</tr>"
            )
            for row in section.table.rows:
                cells = "".join(
                    f'<td class="num">{e(format_value(c))}</td>'
                    if isinstance(c, (int, float)) and not isinstance(c, bool)
                    else f"<td>{e(format_value(c))}</td>"
                    for c in row
                )
                parts.append(f"<tr>{cells}</tr>")
            parts.append("</table>")
        for figure in section.figures:
            data = base64.b64encode(figure.png).decode()
            parts.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{e(figure.caption)}">'
                f"<figcaption>{e(figure.caption)}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(report: Report, directory: str) -> dict[str, str]:
    """Write report.md, report.html and the figures' PNGs under ``directory``; returns their URIs."""
    uris = {
        "markdown": storage.join(directory, "report.md"),
        "html": storage.join(directory, "report.html"),
    }
    for section in report.sections:
        for figure in section.figures:
            storage.write_bytes(storage.join(directory, figure.filename), figure.png)
    storage.write_bytes(uris["markdown"], render_markdown(report).encode())
    storage.write_bytes(uris["html"], render_html(report).encode())
    return uris
