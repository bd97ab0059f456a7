"""Two answers per prompt side by side as HTML: word differences marked where the answers are alike,
collapse badges, captions naming the vector; the pairing of two configs' answers by prompt."""

from __future__ import annotations

import difflib
import html
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from chunky_utils.collapse import row_collapse
from chunky_utils.errors import UsageError
from chunky_utils.html_blocks import CELL_STYLE, NOTE_STYLE, collapse_badge_html, known_reason, page_slice
from chunky_utils.results import is_number
from chunky_utils.tables import SIDES, subset_title

if TYPE_CHECKING:
    import pandas as pd

ADDED_STYLE = "background:#c9f2cf;border-radius:2px"
REMOVED_STYLE = "background:#fbd3d0;border-radius:2px"
_TOKEN = re.compile(r"\s+|[^\s]+")


def word_diff_html(left: str, right: str) -> tuple[str, str]:
    """Both texts as escaped HTML, words only in `left` marked removed and words only in `right` marked added."""
    left_tokens, right_tokens = _TOKEN.findall(left or ""), _TOKEN.findall(right or "")
    matcher = difflib.SequenceMatcher(None, left_tokens, right_tokens, autojunk=False)
    left_parts: list[str] = []
    right_parts: list[str] = []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        left_text = html.escape("".join(left_tokens[i1:i2]))
        right_text = html.escape("".join(right_tokens[j1:j2]))
        if tag == "equal":
            left_parts.append(left_text)
            right_parts.append(right_text)
            continue
        if left_text:
            left_parts.append(f'<span class="chunky-removed" style="{REMOVED_STYLE}">{left_text}</span>')
        if right_text:
            right_parts.append(f'<span class="chunky-added" style="{ADDED_STYLE}">{right_text}</span>')
    return "".join(left_parts), "".join(right_parts)


def magnitude_text(metadata: Mapping[str, Any]) -> str:
    """'vector norm 3.2, effective magnitude 6.4' (empty when the metadata lacks both)."""
    numbers = []
    if is_number(metadata.get("contrastive_vector_norm")):
        numbers.append(f"vector norm {metadata['contrastive_vector_norm']:.4g}")
    if is_number(metadata.get("effective_magnitude")):
        numbers.append(f"effective magnitude {metadata['effective_magnitude']:.4g}")
    return ", ".join(numbers)


def vector_caption(metadata: Mapping[str, Any]) -> str:
    """'12 CoCoNot - 0 Math, layer 16, scale 2 | vector norm 3.2, effective magnitude 6.4'."""
    parts = []
    if "target_subset" in metadata:
        parts.append(f"{subset_title(metadata['target_subset'])} - {subset_title(metadata.get('baseline_subset'))}")
    if "layer" in metadata:
        parts.append(f"layer {metadata['layer']}")
    if "scale" in metadata:
        parts.append(f"scale {float(metadata['scale']):g}")
    magnitude = magnitude_text(metadata)
    return " | ".join(part for part in (", ".join(parts), magnitude) if part)


MOSTLY_DIFFERENT = 0.35
"""Below this word-level similarity two answers are shown without word marks: they differ throughout."""


def similarity(left: str, right: str) -> float:
    """Word-level difflib similarity of two texts (1 = the same words in the same order; spaces not counted)."""
    left_tokens, right_tokens = (left or "").split(), (right or "").split()
    if not left_tokens and not right_tokens:
        return 1.0
    return difflib.SequenceMatcher(None, left_tokens, right_tokens, autojunk=False).ratio()


def row_diff_html(left: str, right: str, reasons: tuple[str | None, str | None] = (None, None)) -> tuple[str, str, str]:
    """Both texts as HTML and a note: word marks where the answers share most of their words; none (and a
    note saying so) when they differ throughout or either side collapsed, since marks would then cover
    nearly every word."""
    if not left or not right:
        return html.escape(left), html.escape(right), ""
    if any(reasons):
        return html.escape(left), html.escape(right), "collapsed: no word marks"
    ratio = similarity(left, right)
    if ratio < MOSTLY_DIFFERENT:
        return html.escape(left), html.escape(right), f"differ throughout ({ratio:.0%} of words shared): no word marks"
    left_html, right_html = word_diff_html(left, right)
    return left_html, right_html, "" if left == right else f"{ratio:.0%} of words shared"


def side_by_side_html(
    rows: Sequence[Mapping[str, Any]],
    metadata: Mapping[str, Any] | None = None,
    left: str = "baseline",
    right: str = "steered",
    left_title: str | None = None,
    right_title: str | None = None,
    caption: str | None = None,
    page: int = 0,
    page_size: int | None = None,
) -> str:
    """A table of prompt, `left` text and `right` text per row, wrapped, with word differences highlighted
    where the answers are alike, collapse badges, and one page of `page_size` rows (all when None)."""
    caption = caption if caption is not None else vector_caption(metadata or {})
    head = (
        f'<th style="{CELL_STYLE};width:3em">#</th><th style="{CELL_STYLE};width:22%">prompt</th>'
        f'<th style="{CELL_STYLE}">{html.escape(left_title or left)}</th>'
        f'<th style="{CELL_STYLE}">{html.escape(right_title or right)}</th>'
    )
    n_changed = n_both = 0
    n_collapsed = dict.fromkeys((left, right), 0)
    reasons_of = []
    for row in rows:
        reasons = tuple(
            row_collapse(row, side) if side in SIDES else known_reason(row.get(f"{side}_collapse"))
            for side in (left, right)
        )
        reasons_of.append(reasons)
        for side, reason in zip((left, right), reasons, strict=True):
            n_collapsed[side] += reason is not None
        left_text, right_text = str(row.get(left) or ""), str(row.get(right) or "")
        if not row.get("only"):
            n_both += 1
            n_changed += left_text != right_text
    start, stop, page, n_pages = page_slice(len(rows), page, page_size)
    body = []
    for index in range(start, stop):
        row, reasons = rows[index], reasons_of[index]
        left_text, right_text = str(row.get(left) or ""), str(row.get(right) or "")
        left_html, right_html, note = row_diff_html(left_text, right_text, reasons)
        only = row.get("only")
        if only:
            missing = f'<span style="{NOTE_STYLE}">(no answer for this prompt on this side)</span>'
            left_html, right_html = (left_html, missing) if only == "left" else (missing, right_html)
        note_html = f'<div class="chunky-note" style="{NOTE_STYLE}">{html.escape(note)}</div>' if note else ""
        changed = left_text != right_text
        body.append(
            f'<tr class="{"changed" if changed else "same"}">'
            f'<td style="{CELL_STYLE}">{html.escape(str(row.get("prompt_idx", index)))}</td>'
            f'<td class="prompt" style="{CELL_STYLE}">{html.escape(str(row.get("prompt") or ""))}</td>'
            f'<td class="{html.escape(left)} left" style="{CELL_STYLE}">'
            f"{collapse_badge_html(reasons[0])}{left_html}</td>"
            f'<td class="{html.escape(right)} right" style="{CELL_STYLE}">'
            f"{collapse_badge_html(reasons[1])}{right_html}{note_html}</td></tr>"
        )
    summary = f"{n_changed} of {n_both} answers differ"
    if n_both < len(rows):
        summary += f" ({len(rows) - n_both} prompts have an answer on one side only)"
    if any(n_collapsed.values()):
        summary += "; collapsed: " + ", ".join(f"{side} {count}" for side, count in n_collapsed.items())
    pages = f"; rows {start + 1}-{stop} of {len(rows)}" if n_pages > 1 else ""
    return (
        '<div class="chunky-side-by-side" style="line-height:1.4">'
        f'<div class="chunky-caption" style="margin:4px 0;font-weight:600">{html.escape(caption)}</div>'
        f'<div class="chunky-summary" style="margin:2px 0 6px;color:#555">{html.escape(summary)}{pages}; '
        f'<span style="{REMOVED_STYLE}">only on the left</span> '
        f'<span style="{ADDED_STYLE}">only on the right</span> (word marks only where answers are alike)</div>'
        '<table style="table-layout:fixed;width:100%;border-collapse:collapse;font-size:13px">'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
    )


def side_by_side(payload: Mapping[str, Any]) -> Any:
    """Baseline and steered answers of one results payload, for display in a notebook."""
    from IPython.display import HTML

    return HTML(side_by_side_html(payload["results"], payload["metadata"]))


def comparison_rows(
    frame: pd.DataFrame, left: tuple[str, str], right: tuple[str, str]
) -> tuple[list[dict[str, Any]], str]:
    """Rows pairing two (config_id, 'baseline'|'steered') columns by prompt text, and a caption naming both."""
    sides = []
    for config_id, column in (left, right):
        if column not in SIDES:
            raise UsageError(f"column must be one of {', '.join(SIDES)}, got {column!r}")
        part = frame[frame["config_id"] == config_id]
        if part.empty:
            raise UsageError(f"no config {config_id!r} in the results")
        sides.append((part, column))
    (left_part, left_column), (right_part, right_column) = sides

    def reasons(part: pd.DataFrame, column: str) -> list[Any]:
        name = f"{column}.collapse"
        return [known_reason(value) for value in part[name]] if name in part else [None] * len(part)

    right_by_prompt = dict(zip(right_part["prompt"], right_part[right_column], strict=True))
    right_reason = dict(zip(right_part["prompt"], reasons(right_part, right_column), strict=True))
    rows = [
        {
            "prompt_idx": idx,
            "prompt": prompt,
            "left": text,
            "right": right_by_prompt.get(prompt, ""),
            "left_collapse": reason,
            "right_collapse": right_reason.get(prompt),
            **({} if prompt in right_by_prompt else {"only": "left"}),
        }
        for idx, prompt, text, reason in zip(
            left_part["prompt_idx"],
            left_part["prompt"],
            left_part[left_column],
            reasons(left_part, left_column),
            strict=True,
        )
    ]
    seen = set(left_part["prompt"])
    rows += [
        {
            "prompt_idx": "-",
            "prompt": prompt,
            "left": "",
            "right": text,
            "right_collapse": right_reason.get(prompt),
            "only": "right",
        }
        for prompt, text in right_by_prompt.items()
        if prompt not in seen
    ]
    captions = []
    for part, column in ((left_part, left_column), (right_part, right_column)):
        first = part.iloc[0].to_dict()
        captions.append(f"{column} of [{first['config']}]: {magnitude_text(first)}")
    return rows, "  vs  ".join(captions)


# ---------------------------------------------------------------- cells of a layer x scale map

_METRIC_SHORT = {"concept_score": "concept", "perplexity": "ppl", "distinct_2": "distinct-2", "overall": "overall"}


def _metric_line(row: Mapping[str, Any], side: str) -> str:
    parts = []
    for name, short in _METRIC_SHORT.items():
        value = row.get(f"{side}.{name}")
        if isinstance(value, int | float) and value == value:
            parts.append(f"{short} {value:.3g}")
    return f'<div style="{NOTE_STYLE}">{" · ".join(parts)}</div>' if parts else ""


def cell_table_html(cell: pd.DataFrame, page: int = 0, page_size: int | None = 10, caption: str = "") -> str:
    """The rows of one layer x scale cell (`metric_views.cell_rows`): prompt, baseline and steered answers
    (real line breaks, wrapped), collapse badges and each side's metrics, one page at a time."""
    records = cell.to_dict("records")
    start, stop, page, n_pages = page_slice(len(records), page, page_size)
    body = []
    for row in records[start:stop]:
        cells = []
        for side in SIDES:
            reason = known_reason(row.get(f"{side}.collapse"))
            cells.append(
                f'<td class="{side}" style="{CELL_STYLE}">{collapse_badge_html(reason)}'
                f"{html.escape(str(row.get(side) or ''))}{_metric_line(row, side)}</td>"
            )
        body.append(
            f'<tr><td style="{CELL_STYLE}">{html.escape(str(row.get("prompt_idx", "")))}</td>'
            f'<td class="prompt" style="{CELL_STYLE}">{html.escape(str(row.get("prompt") or ""))}</td>'
            f"{''.join(cells)}</tr>"
        )
    pages = f"; rows {start + 1}-{stop} of {len(records)}" if n_pages > 1 else ""
    return (
        '<div class="chunky-cell-table" style="line-height:1.4">'
        f'<div style="margin:4px 0;color:#555">{html.escape(caption)}'
        f"{len(records)} prompts{pages}</div>"
        '<table style="table-layout:fixed;width:100%;border-collapse:collapse;font-size:13px"><thead><tr>'
        f'<th style="{CELL_STYLE};width:3em">#</th><th style="{CELL_STYLE};width:22%">prompt</th>'
        f'<th style="{CELL_STYLE}">baseline</th><th style="{CELL_STYLE}">steered</th></tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )
