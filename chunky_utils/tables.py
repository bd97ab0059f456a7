"""Results as tables: every results JSON under a folder in one DataFrame, and side-by-side HTML with differences marked.

pandas is imported inside the functions that need it, so `import chunky_utils` stays light.
"""

from __future__ import annotations

import difflib
import html
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chunky_utils.collapse import row_collapse
from chunky_utils.data import TULU_SET_LABELS
from chunky_utils.errors import UsageError
from chunky_utils.results import is_number, read_results, results_table

if TYPE_CHECKING:
    import pandas as pd

    from chunky_utils.pipeline import RunOutcome

SIDES: tuple[str, ...] = ("baseline", "steered")
LENGTH_MEASURES: tuple[str, ...] = ("words", "chars")
ROW_KEYS: tuple[str, ...] = ("prompt_idx", "prompt_id", "prompt", "baseline", "steered")
CONFIG_KEYS: tuple[str, ...] = ("pair", "layer", "scale", "inference_dataset", "inference_n_samples", "model_name")

ADDED_STYLE = "background:#c9f2cf;border-radius:2px"
REMOVED_STYLE = "background:#fbd3d0;border-radius:2px"
CELL_STYLE = (
    "white-space:pre-wrap;overflow-wrap:anywhere;word-break:break-word;vertical-align:top;"
    "text-align:left;padding:4px 8px;border:1px solid #ddd"
)
_TOKEN = re.compile(r"\s+|[^\s]+")


# ---------------------------------------------------------------- loading


def subset_title(subset: Any) -> str:
    """'12 CoCoNot' for a Tulu key, the label itself otherwise."""
    key = str(subset)
    return f"{key} {TULU_SET_LABELS[key]}" if key in TULU_SET_LABELS else key


def measure_names_of(columns: Any) -> list[str]:
    """Names measured on the steered text ('words', 'chars', then any metrics), from column names."""
    names = [str(c).removeprefix("steered.") for c in columns if str(c).startswith("steered.")]
    return [name for name in dict.fromkeys(names) if name != "collapse"]


def metric_names(frame: pd.DataFrame) -> list[str]:
    """Metrics the rows carry (issue 5's `row['metrics']`), besides the response lengths."""
    return [name for name in measure_names_of(frame.columns) if name not in LENGTH_MEASURES]


def load_results_frame(root: Path | str) -> pd.DataFrame:
    """Every seed-format results JSON under `root` in one DataFrame (`results.results_table`): one row per
    prompt and config, checked to be seed-format files."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"results folder not found: {root}")
    frame = results_table(root)
    if frame.empty:
        raise UsageError(f"no results JSON under {root} (expected {{target}}_{{baseline}}/layer_*_scale_*/*.json)")
    for column in ("layer", "scale"):
        if column not in frame.columns or frame[column].isna().any():
            raise UsageError(f"results under {root} lack metadata {column!r}: not seed-format files")
    order = ["pair", "layer", "scale", "config_id", "prompt_idx"]
    return frame.sort_values(order, kind="stable").reset_index(drop=True)


def summarize_configs(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per config: what it was, its vector norm and effective magnitude, and mean lengths and metrics."""
    keys = [key for key in ("config", *CONFIG_KEYS) if key in frame.columns]
    firsts = {k: "first" for k in ("contrastive_vector_norm", "effective_magnitude") if k in frame.columns}
    means = {c: "mean" for c in frame.columns if "." in str(c) and str(c).split(".")[0] in (*SIDES, "delta")}
    grouped = frame.groupby("config_id", sort=False, dropna=False)
    summary = grouped.agg({**{k: "first" for k in keys}, **firsts, **means})
    summary.insert(len(keys), "n_prompts", grouped.size())
    return summary.reset_index()


def outcome_payload(outcome: RunOutcome) -> tuple[Path, dict[str, Any]]:
    """The results file of a one-scale run and its payload, whether just written or already finished."""
    paths = {**outcome.skipped, **outcome.written}
    if not paths:
        raise UsageError("the run wrote no results")
    scale, path = next(iter(paths.items()))
    payload = outcome.payloads.get(scale) or read_results(path)
    return path, payload


# ---------------------------------------------------------------- side-by-side HTML


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


COLLAPSE_STYLE = "background:#b00020;color:white;border-radius:3px;padding:0 4px;font-size:11px;margin-right:4px"


def _known_reason(value: Any) -> str | None:
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


MOSTLY_DIFFERENT = 0.35
"""Below this word-level similarity two answers are shown without word marks: they differ throughout."""
NOTE_STYLE = "color:#666;font-size:11px;font-style:italic"


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
            row_collapse(row, side) if side in SIDES else _known_reason(row.get(f"{side}_collapse"))
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
        return [_known_reason(value) for value in part[name]] if name in part else [None] * len(part)

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


# ---------------------------------------------------------------- per-token readings

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
            reason = _known_reason(row.get(f"{side}.collapse"))
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


# ---------------------------------------------------------------- export


def export_frame(payload: Mapping[str, Any]) -> pd.DataFrame:
    """One row per prompt of a payload: texts, collapse reasons and every numeric metric, for CSV export."""
    import pandas as pd

    records = []
    for row in payload["results"]:
        record = {key: row.get(key) for key in ROW_KEYS}
        for side in SIDES:
            record[f"{side}_collapse"] = row_collapse(row, side)
            for name, value in ((row.get("metrics") or {}).get(side) or {}).items():
                if is_number(value):
                    record[f"{side}.{name}"] = value
        records.append(record)
    return pd.DataFrame.from_records(records)


def standalone_html(title: str, body: str) -> str:
    """A whole HTML page around a fragment (UTF-8, a title, no scripts)."""
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title></head>'
        f'<body style="font-family:sans-serif;max-width:1400px;margin:16px auto">'
        f"<h2>{html.escape(title)}</h2>{body}</body></html>"
    )
