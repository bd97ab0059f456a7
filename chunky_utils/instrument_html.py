"""HTML of the instrument's outputs: answers with per-token readings coloured, the layer x scale grid, the
next-token preview."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from chunky_utils.collapse import row_collapse
from chunky_utils.html_blocks import CELL_STYLE, NOTE_STYLE, collapse_badge_html, page_slice
from chunky_utils.tables import SIDES

TARGET_RGB = (230, 97, 1)
BASELINE_RGB = (33, 102, 172)


def reading_colour(value: float, saturation: float) -> str:
    """A background for a token reading: orange towards the target, blue away from it, clear near 0."""
    strength = min(1.0, abs(value) / saturation) if saturation > 0 else 0.0
    red, green, blue = TARGET_RGB if value > 0 else BASELINE_RGB
    return f"rgba({red},{green},{blue},{0.8 * strength:.2f})"


def token_reading_html(
    pieces: Sequence[str], values: Sequence[float | None], origin: float, unit: float, saturation: float
) -> str:
    """An answer as token spans coloured by (reading - origin) / unit; the tooltip gives both numbers."""
    spans = []
    for piece, value in zip(pieces, values, strict=True):
        text = html.escape(piece)
        if value is None:
            title = "not read: the last token is never fed back to the model"
            spans.append(f'<span class="chunky-token unread" title="{title}">{text}</span>')
            continue
        relative = (value - origin) / unit if unit else 0.0
        title = f"projection {value:.3f} ({relative:+.2f} x vector norm vs the baseline answers' mean)"
        spans.append(
            f'<span class="chunky-token" data-value="{value:.4f}" title="{html.escape(title)}" '
            f'style="background:{reading_colour(relative, saturation)};border-radius:2px">{text}</span>'
        )
    return "".join(spans)


def reading_legend_html(layer: int, saturation: float) -> str:
    """What the token colours mean."""
    target = "rgb({},{},{})".format(*TARGET_RGB)
    baseline = "rgb({},{},{})".format(*BASELINE_RGB)
    return (
        '<div class="chunky-legend" style="margin:4px 0;color:#444;font-size:12px">'
        f"Each token is coloured by the residual stream at layer {layer} on that token, projected on the unit "
        "steering direction (read while generating, before the steering is added), relative to the mean over "
        "the baseline answers' tokens: "
        f'<span style="background:{target};color:white;padding:0 4px;border-radius:2px">towards the target</span> '
        f'<span style="background:{baseline};color:white;padding:0 4px;border-radius:2px">away from it</span>, '
        f"full colour at {saturation:.2g} x the vector norm. Hover a token for its value; the last token of an "
        "answer is not read.</div>"
    )


def token_view_html(
    rows: Sequence[Mapping[str, Any]],
    readings: Mapping[tuple[int, str], Any],
    layer: int,
    unit: float,
    page: int = 0,
    page_size: int | None = None,
) -> str:
    """Baseline and steered answers with every read token coloured (see `reading_legend_html`)."""
    baseline_values = [
        value
        for (_, side), reading in readings.items()
        if side == "baseline"
        for value in reading.values
        if value is not None
    ]
    all_values = [value for reading in readings.values() for value in reading.values if value is not None]
    if not all_values:
        return (
            '<div class="chunky-token-view" style="color:#555">No per-token readings for these answers: press '
            "<b>Generate</b> with <i>read tokens</i> ticked (answers from the baseline cache were not generated "
            "now, so they were not read).</div>"
        )
    origin = sum(baseline_values) / len(baseline_values) if baseline_values else min(all_values)
    spread = sorted(abs(v - origin) / unit for v in all_values) if unit else [0.0]
    saturation = max(0.05, spread[int(0.95 * (len(spread) - 1))])
    start, stop, page, n_pages = page_slice(len(rows), page, page_size)
    body = []
    for index in range(start, stop):
        row = rows[index]
        cells = []
        for side in SIDES:
            reading = readings.get((index, side))
            text = str(row.get(side) or "")
            badge = collapse_badge_html(row_collapse(row, side))
            inner = (
                token_reading_html(reading.pieces, reading.values, origin, unit, saturation)
                if reading is not None
                else html.escape(text) + f'<div style="{NOTE_STYLE}">(not read: not generated in this run)</div>'
            )
            cells.append(f'<td class="{side}" style="{CELL_STYLE}">{badge}{inner}</td>')
        body.append(
            f'<tr><td style="{CELL_STYLE}">{html.escape(str(row.get("prompt_idx", index)))}</td>'
            f'<td class="prompt" style="{CELL_STYLE}">{html.escape(str(row.get("prompt") or ""))}</td>'
            f"{''.join(cells)}</tr>"
        )
    pages = f'<div style="color:#555">rows {start + 1}-{stop} of {len(rows)}</div>' if n_pages > 1 else ""
    return (
        f'<div class="chunky-token-view" style="line-height:1.4">{reading_legend_html(layer, saturation)}{pages}'
        '<table style="table-layout:fixed;width:100%;border-collapse:collapse;font-size:13px"><thead><tr>'
        f'<th style="{CELL_STYLE};width:3em">#</th><th style="{CELL_STYLE};width:22%">prompt</th>'
        f'<th style="{CELL_STYLE}">baseline</th><th style="{CELL_STYLE}">steered</th></tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


# ---------------------------------------------------------------- grid and next-token preview

GRID_TEXT_STYLE = "white-space:pre-wrap;overflow-wrap:anywhere;max-height:11em;overflow-y:auto;font-size:12px"


def grid_html(result: Any, relative: Any = None, band: Any = None) -> str:
    """A layer x scale grid per prompt (`instrument.GridResult`): the baseline on top, then one row per layer
    and one column per scale, each answer with its collapse badge; `relative(layer, scale)` adds the
    effective magnitude as a share of the layer's mean residual norm to each cell's heading, and `band(share)`
    its band (subtle, strong, likely to collapse)."""
    blocks = []
    n_collapsed = sum(cell.collapse is not None for cell in result.cells if cell.layer is not None)
    n_steered = sum(cell.layer is not None for cell in result.cells)
    for p, prompt in enumerate(result.prompts):
        baseline = result.cell(p, None, 0.0)
        head = "".join(f'<th style="{CELL_STYLE}">scale {scale:g}</th>' for scale in result.scales)
        rows = []
        for layer in result.layers:
            cells = []
            for scale in result.scales:
                cell = result.cell(p, layer, scale)
                share = ""
                if relative is not None:
                    value = relative(layer, scale)
                    share = f" ({value:.0%} of norm{': ' + band(value) if band is not None else ''})"
                cells.append(
                    f'<td class="chunky-grid-cell" data-layer="{layer}" data-scale="{scale:g}" style="{CELL_STYLE}">'
                    f'<div style="{NOTE_STYLE}">L{layer} x {scale:g}{share}</div>{collapse_badge_html(cell.collapse)}'
                    f'<div style="{GRID_TEXT_STYLE}">{html.escape(cell.text)}</div></td>'
                )
            rows.append(f'<tr><th style="{CELL_STYLE};width:5em">layer {layer}</th>{"".join(cells)}</tr>')
        blocks.append(
            f'<div style="margin:10px 0 4px;font-weight:600">prompt {p}: {html.escape(prompt)}</div>'
            f'<div style="margin:2px 0 4px"><b>baseline</b> {collapse_badge_html(baseline.collapse)}'
            f'<span style="{GRID_TEXT_STYLE}">{html.escape(baseline.text)}</span></div>'
            '<table style="table-layout:fixed;width:100%;border-collapse:collapse">'
            f'<thead><tr><th style="{CELL_STYLE};width:5em"></th>{head}</tr></thead><tbody>{"".join(rows)}</tbody>'
            "</table>"
        )
    summary = (
        f"{len(result.prompts)} prompt(s) x {len(result.layers)} layers x {len(result.scales)} scales in one batch, "
        f"{result.seconds:.1f} s; collapsed {n_collapsed} of {n_steered} (loops, repetition or empty: "
        "chunky_utils.collapse; perplexity is not scored here)"
    )
    return (
        f'<div class="chunky-grid" style="line-height:1.4"><div style="color:#555">{html.escape(summary)}</div>'
        f"{''.join(blocks)}</div>"
    )


def preview_html(preview: Any, caption: str = "") -> str:
    """The next-token preview (`instrument.NextTokenPreview`) as a small table with probability bars."""
    rows = []
    for token, before, after in zip(preview.tokens, preview.unsteered, preview.steered, strict=True):
        bars = "".join(
            f'<td style="padding:1px 6px;width:38%"><div style="background:{colour};width:{100 * p:.0f}%;'
            f'height:10px;display:inline-block;vertical-align:middle"></div> {p:.1%}</td>'
            for p, colour in ((before, "#9aa"), (after, "rgb({},{},{})".format(*TARGET_RGB)))
        )
        rows.append(f'<tr><td style="padding:1px 6px;font-family:monospace">{html.escape(repr(token))}</td>{bars}</tr>')
    prompt = preview.prompt if len(preview.prompt) <= 80 else preview.prompt[:77] + "..."
    return (
        '<div class="chunky-preview" style="font-size:12px;line-height:1.4">'
        f'<div style="font-weight:600">Next token {html.escape(caption)}</div>'
        f'<div style="color:#555">for "{html.escape(prompt)}"; KL(steered || unsteered) = '
        f'<span class="chunky-kl">{preview.kl:.3f}</span> nats ({1000 * preview.seconds:.0f} ms)</div>'
        '<table style="border-collapse:collapse;width:100%"><thead><tr><th style="text-align:left">token</th>'
        '<th style="text-align:left">unsteered</th><th style="text-align:left">steered</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )
