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
from chunky_utils.results import iter_results_files, read_results

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


def config_label(metadata: Mapping[str, Any]) -> str:
    """A short name for one results file: pair, layer, scale and prompt source."""
    prompts = metadata.get("inference_dataset")
    source = "built-in" if prompts is None else f"{prompts} x{metadata.get('inference_n_samples')}"
    return (
        f"{metadata.get('target_subset')}_{metadata.get('baseline_subset')} "
        f"L{metadata.get('layer')} s{float(metadata.get('scale', 0.0)):g} ({source})"
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def word_count(text: str) -> int:
    return len(str(text).split())


def rows_of_payload(payload: Mapping[str, Any], path: Path | str, config_id: str) -> list[dict[str, Any]]:
    """Flat rows (one per prompt) of one results payload: scalar metadata, texts, lengths and metrics."""
    metadata = payload["metadata"]
    scalars = {k: v for k, v in metadata.items() if v is None or isinstance(v, str | int | float | bool)}
    common = {
        **scalars,
        "config": config_label(metadata),
        "config_id": config_id,
        "path": str(path),
        "pair": f"{metadata.get('target_subset')}_{metadata.get('baseline_subset')}",
    }
    rows = []
    for index, row in enumerate(payload["results"]):
        if not isinstance(row, dict):
            raise UsageError(f"{path}: results[{index}] is not an object")
        flat = {**common, **{key: row.get(key) for key in ROW_KEYS}}
        for side in SIDES:
            text = str(row.get(side) or "")
            flat[f"{side}.words"] = word_count(text)
            flat[f"{side}.chars"] = len(text)
            flat[f"{side}_collapse"] = row_collapse(row, side)
        metrics = row.get("metrics") or {}
        for side in SIDES:
            for name, value in (metrics.get(side) or {}).items():
                if _is_number(value):
                    flat[f"{side}.{name}"] = float(value)
        for name in measure_names_of(flat):
            if f"baseline.{name}" in flat and f"steered.{name}" in flat:
                flat[f"delta.{name}"] = flat[f"steered.{name}"] - flat[f"baseline.{name}"]
        rows.append(flat)
    return rows


def measure_names_of(columns: Any) -> list[str]:
    """Names measured on the steered text ('words', 'chars', then any metrics), from column names."""
    names = [str(c).removeprefix("steered.") for c in columns if str(c).startswith("steered.")]
    return list(dict.fromkeys(names))


def metric_names(frame: pd.DataFrame) -> list[str]:
    """Metrics the rows carry (issue 5's `row['metrics']`), besides the response lengths."""
    return [name for name in measure_names_of(frame.columns) if name not in LENGTH_MEASURES]


def load_results_frame(root: Path | str) -> pd.DataFrame:
    """Every seed-format results JSON under `root` in one DataFrame: one row per prompt and config."""
    import pandas as pd

    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"results folder not found: {root}")
    rows: list[dict[str, Any]] = []
    for path in iter_results_files(root):
        payload = read_results(path)
        rows += rows_of_payload(payload, path, str(path.relative_to(root)))
    if not rows:
        raise UsageError(f"no results JSON under {root} (expected {{target}}_{{baseline}}/layer_*_scale_*/*.json)")
    frame = pd.DataFrame(rows)
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
    if _is_number(metadata.get("contrastive_vector_norm")):
        numbers.append(f"vector norm {metadata['contrastive_vector_norm']:.4g}")
    if _is_number(metadata.get("effective_magnitude")):
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


def side_by_side_html(
    rows: Sequence[Mapping[str, Any]],
    metadata: Mapping[str, Any] | None = None,
    left: str = "baseline",
    right: str = "steered",
    left_title: str | None = None,
    right_title: str | None = None,
    caption: str | None = None,
) -> str:
    """A table of prompt, `left` text and `right` text per row, wrapped, with word differences highlighted."""
    caption = caption if caption is not None else vector_caption(metadata or {})
    head = (
        f'<th style="{CELL_STYLE};width:3em">#</th><th style="{CELL_STYLE};width:22%">prompt</th>'
        f'<th style="{CELL_STYLE}">{html.escape(left_title or left)}</th>'
        f'<th style="{CELL_STYLE}">{html.escape(right_title or right)}</th>'
    )
    body = []
    n_changed = 0
    n_collapsed = dict.fromkeys((left, right), 0)
    for index, row in enumerate(rows):
        left_text, right_text = str(row.get(left) or ""), str(row.get(right) or "")
        left_html, right_html = word_diff_html(left_text, right_text)
        badges = {}
        for side in (left, right):
            reason = row_collapse(row, side) if side in SIDES else _known_reason(row.get(f"{side}_collapse"))
            n_collapsed[side] += reason is not None
            badges[side] = collapse_badge_html(reason)
        left_html, right_html = badges[left] + left_html, badges[right] + right_html
        changed = left_text != right_text
        n_changed += changed
        body.append(
            f'<tr class="{"changed" if changed else "same"}">'
            f'<td style="{CELL_STYLE}">{html.escape(str(row.get("prompt_idx", index)))}</td>'
            f'<td class="prompt" style="{CELL_STYLE}">{html.escape(str(row.get("prompt") or ""))}</td>'
            f'<td class="{html.escape(left)} left" style="{CELL_STYLE}">{left_html}</td>'
            f'<td class="{html.escape(right)} right" style="{CELL_STYLE}">{right_html}</td></tr>'
        )
    summary = f"{n_changed} of {len(rows)} answers differ"
    if any(n_collapsed.values()):
        summary += "; collapsed: " + ", ".join(f"{side} {count}" for side, count in n_collapsed.items())
    return (
        '<div class="chunky-side-by-side">'
        f'<div class="chunky-caption" style="margin:4px 0;font-weight:600">{html.escape(caption)}</div>'
        f'<div style="margin:2px 0 6px;color:#555">{summary}; '
        f'<span style="{REMOVED_STYLE}">only on the left</span> '
        f'<span style="{ADDED_STYLE}">only on the right</span></div>'
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
        name = f"{column}_collapse"
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
        {"prompt_idx": "-", "prompt": prompt, "left": "", "right": text, "right_collapse": right_reason.get(prompt)}
        for prompt, text in right_by_prompt.items()
        if prompt not in seen
    ]
    captions = []
    for part, column in ((left_part, left_column), (right_part, right_column)):
        first = part.iloc[0].to_dict()
        captions.append(f"{column} of [{first['config']}]: {magnitude_text(first)}")
    return rows, "  vs  ".join(captions)
