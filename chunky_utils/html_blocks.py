"""HTML pieces every notebook view shares: cell and note styles, the collapse badge, paging, a whole page."""

from __future__ import annotations

import html
from typing import Any

CELL_STYLE = (
    "white-space:pre-wrap;overflow-wrap:anywhere;word-break:break-word;vertical-align:top;"
    "text-align:left;padding:4px 8px;border:1px solid #ddd"
)
COLLAPSE_STYLE = "background:#b00020;color:white;border-radius:3px;padding:0 4px;font-size:11px;margin-right:4px"
NOTE_STYLE = "color:#666;font-size:11px;font-style:italic"


def known_reason(value: Any) -> str | None:
    """A stored collapse reason, or None for a missing or empty one."""
    return value if isinstance(value, str) and value else None


def collapse_badge_html(reason: str | None) -> str:
    """A small red 'collapsed' badge whose tooltip gives the reason; '' when the answer is fine."""
    if reason is None:
        return ""
    return f'<span class="chunky-collapsed" title="{html.escape(reason)}" style="{COLLAPSE_STYLE}">collapsed</span>'


def page_slice(n_rows: int, page: int, page_size: int | None) -> tuple[int, int, int, int]:
    """(start, stop, page, n_pages) of one page; the page is clamped into range. No page size: one page."""
    if not page_size or page_size >= n_rows:
        return 0, n_rows, 0, 1
    n_pages = max(1, -(-n_rows // page_size))
    page = min(max(0, int(page)), n_pages - 1)
    return page * page_size, min(n_rows, (page + 1) * page_size), page, n_pages


def standalone_html(title: str, body: str) -> str:
    """A whole HTML page around a fragment (UTF-8, a title, no scripts)."""
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title></head>'
        f'<body style="font-family:sans-serif;max-width:1400px;margin:16px auto">'
        f"<h2>{html.escape(title)}</h2>{body}</body></html>"
    )
