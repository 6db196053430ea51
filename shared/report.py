"""Self-contained HTML reports: headings, text, tables and matplotlib figures embedded as PNG.

    report = Report("curate: sci.space")
    report.table("Purity", rows)            # rows: list of dicts
    fig, ax = report.figure(); ax.plot(losses); report.add_figure(fig, "SAE loss")
    report.save(stage.store, "report.html")
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from shared.storage import Storage  # noqa: E402

STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
    "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
    "pre{background:#f7f7f7;padding:8px;white-space:pre-wrap}"
)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


class Report:
    """Sections appended in order, written as one HTML file."""

    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def text(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def pre(self, text: str) -> None:
        self.parts.append(f"<pre>{html.escape(text)}</pre>")

    def table(self, title: str | None, rows: list[dict[str, Any]]) -> None:
        if title:
            self.heading(title, 3)
        if not rows:
            self.text("(no rows)")
            return
        columns = list(dict.fromkeys(k for row in rows for k in row))
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{_cell(row.get(c, ''))}</td>" for c in columns) + "</tr>" for row in rows)
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")

    @staticmethod
    def figure(ncols: int = 1, width: float = 6.0, height: float = 3.5):
        return plt.subplots(1, ncols, figsize=(width * ncols, height))

    def add_figure(self, fig: Any, caption: str = "") -> bytes:
        """Embed a matplotlib figure (closed afterwards); returns its PNG bytes for saving beside the report."""
        buffer = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        png = buffer.getvalue()
        data = base64.b64encode(png).decode()
        self.parts.append(f'<figure><img src="data:image/png;base64,{data}"/>'
                          f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        return png

    def html(self) -> str:
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>"
                + "\n".join(self.parts) + "</body></html>\n")

    def save(self, store: Storage, *parts: str) -> str:
        return store.write_text(self.html(), *parts)
