"""Results as tables: every results JSON under a folder in one DataFrame, one row per config, CSV export.

pandas is imported inside the functions that need it, so `import chunky_utils` stays light.
"""

from __future__ import annotations

from collections.abc import Mapping
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
