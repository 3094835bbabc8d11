"""The one HTML report writer: a self-contained page (figures inline as PNG data URIs) with the
shared style; the results page, the benchmark report and the demo index are all written by it."""

from __future__ import annotations

import html
from pathlib import Path

STYLE = (
    "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
    "th,td{border:1px solid #ccc;padding:.2em .6em;text-align:left}"
)


def write_page(path: str | Path, title: str, body: str, style: str = "") -> Path:
    """Write `body` (HTML) under an `<h1>` of `title` as one page; `style`: extra CSS rules."""
    path = Path(path)
    page = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}{style}</style></head><body>\n<h1>{html.escape(title)}</h1>"
        f"{body}</body></html>"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
