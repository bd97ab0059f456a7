"""Layer x scale views of the per-generation metrics: the metrics frame, its layer x scale summary, best and
collapse scales, the texts behind a cell.

Everything starts from `metrics_frame(...)`: one row per (results file, prompt) with the texts and
`baseline.<metric>`, `steered.<metric>` and `delta.<metric>` columns (`results.results_table`'s naming).
The heatmaps of the summary live in `layer_scale_heatmaps`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from chunky_utils.collapse import CELL_COLLAPSE_SHARE, metrics_collapse_reason
from chunky_utils.metrics import METRIC_NAMES
from chunky_utils.results import results_table

SUMMARY_COLUMNS: tuple[str, ...] = (
    "layer",
    "scale",
    "n",
    "concept_delta",
    "concept_steered",
    "concept_baseline",
    "probe_delta",
    "perplexity",
    "baseline_perplexity",
    "perplexity_ratio",
    "distinct_2",
    "relevance",
    "relevance_delta",
    "overall",
    "empty_share",
    "collapsed_share",
    "collapsed",
    "best",
)

_TEXT_COLUMNS = ("prompt_idx", "prompt_id", "prompt", "baseline", "steered", "baseline.collapse", "steered.collapse")


# ---------------------------------------------------------------- frame


def metrics_frame(sources: Any) -> pd.DataFrame:
    """`results.results_table` with every metric column present: `baseline.<metric>`, `steered.<metric>`,
    `delta.<metric>` (NaN for rows written with `--no-metrics`), sorted by experiment, layer, scale, prompt.

    `sources`: a results folder (searched recursively), a results file, a loaded payload, or a list of these.
    """
    frame = results_table(sources)
    if frame.empty:
        return frame
    missing = {
        f"{side}.{name}": math.nan
        for side in ("baseline", "steered", "delta")
        for name in METRIC_NAMES
        if f"{side}.{name}" not in frame
    }
    frame = frame.assign(**missing, layer=frame["layer"].astype(int), scale=frame["scale"].astype(float))
    return frame.sort_values(["experiment", "layer", "scale", "prompt_idx"], kind="stable").reset_index(drop=True)


def experiments(frame: pd.DataFrame) -> list[str]:
    """The experiment labels in a frame (target_baseline/inference file [model])."""
    return sorted(frame["experiment"].dropna().unique()) if "experiment" in frame else []


def _one_experiment(frame: pd.DataFrame, experiment: str | None) -> pd.DataFrame:
    if experiment is not None:
        frame = frame[frame["experiment"] == experiment]
        if frame.empty:
            raise ValueError(f"no rows for experiment {experiment!r}")
    elif "experiment" in frame and frame["experiment"].nunique() > 1:
        raise ValueError(f"the frame mixes experiments {experiments(frame)}: pass experiment=...")
    return frame


# ---------------------------------------------------------------- layer x scale summary


def layer_scale_summary(
    frame: pd.DataFrame,
    experiment: str | None = None,
    best_by: str = "concept_delta",
) -> pd.DataFrame:
    """One row per (layer, scale) with the columns of SUMMARY_COLUMNS.

    Concept and relevance columns are means, perplexities medians (robust to one broken answer).
    `collapsed_share`: share of steered answers that collapsed (chunky_utils.collapse, one definition);
    `collapsed`: that share reaches CELL_COLLAPSE_SHARE, or every answer is empty.
    `best`: the non-collapsed, non-zero scale of its layer with the highest positive `best_by` (none if no
    scale of the layer moved it above 0).
    """
    frame = _one_experiment(frame, experiment)
    rows = []
    if "steered.collapse" not in frame:  # a frame built by hand: judge each row from its metric columns
        frame = frame.assign(**{"steered.collapse": [_collapse_from_columns(row) for _, row in frame.iterrows()]})
    for (layer, scale), cell in frame.groupby(["layer", "scale"], sort=True):
        steered_distinct = cell["steered.distinct_2"].fillna(0.0)
        baseline_ppl = float(cell["baseline.perplexity"].median())
        steered_ppl = float(cell["steered.perplexity"].median())
        rows.append(
            {
                "layer": int(layer),
                "scale": float(scale),
                "n": len(cell),
                "concept_delta": cell["delta.concept_score"].mean(),
                "concept_steered": cell["steered.concept_score"].mean(),
                "concept_baseline": cell["baseline.concept_score"].mean(),
                "probe_delta": cell["delta.concept_probe"].mean(),
                "perplexity": steered_ppl,
                "baseline_perplexity": baseline_ppl,
                "perplexity_ratio": steered_ppl / baseline_ppl if baseline_ppl > 0 else math.nan,
                "distinct_2": float(steered_distinct.mean()),
                "relevance": cell["steered.relevance"].mean(),
                "relevance_delta": cell["delta.relevance"].mean(),
                "overall": cell["steered.overall"].mean(),
                "empty_share": float((cell["steered.n_tokens"].fillna(0) == 0).mean()),
                "collapsed_share": float(cell["steered.collapse"].notna().mean()),
            }
        )
    summary = pd.DataFrame.from_records(rows, columns=[c for c in SUMMARY_COLUMNS if c not in ("collapsed", "best")])
    if summary.empty:
        return summary.assign(collapsed=pd.Series(dtype=bool), best=pd.Series(dtype=bool))
    summary["collapsed"] = (summary["collapsed_share"] >= CELL_COLLAPSE_SHARE) | (summary["empty_share"] >= 1.0)
    summary["best"] = False
    if best_by not in summary:
        raise ValueError(f"best_by must be a summary column, got {best_by!r}")
    eligible = summary[~summary["collapsed"] & (summary["scale"] != 0.0) & (summary[best_by] > 0)]
    if not eligible.empty:
        winners = eligible.loc[eligible.groupby("layer")[best_by].idxmax()].index
        summary.loc[winners, "best"] = True
    return summary


def best_scale_per_layer(
    frame: pd.DataFrame,
    experiment: str | None = None,
    by: str = "concept_delta",
) -> pd.DataFrame:
    """Per layer: the non-collapsed scale with the highest positive `by`, with its summary row (NaN if none)."""
    summary = layer_scale_summary(frame, experiment, best_by=by)
    best = summary[summary["best"]].set_index("layer")
    layers = sorted(summary["layer"].unique())
    out = best.reindex(layers).rename(columns={"scale": "best_scale"})
    out.index.name = "layer"
    return out.drop(columns=["best"]).reset_index()


def collapse_scale_per_layer(
    frame: pd.DataFrame,
    experiment: str | None = None,
) -> pd.DataFrame:
    """Per layer: the smallest positive and the largest negative scale whose cell collapsed (NaN if none)."""
    summary = layer_scale_summary(frame, experiment)
    rows = []
    for layer, group in summary.groupby("layer", sort=True):
        collapsed = group[group["collapsed"]]
        positive = collapsed[collapsed["scale"] > 0]["scale"]
        negative = collapsed[collapsed["scale"] < 0]["scale"]
        rows.append(
            {
                "layer": int(layer),
                "collapse_scale": float(positive.min()) if not positive.empty else math.nan,
                "collapse_scale_negative": float(negative.max()) if not negative.empty else math.nan,
                "collapsed_scales": [float(s) for s in collapsed["scale"]],
            }
        )
    return pd.DataFrame.from_records(
        rows, columns=["layer", "collapse_scale", "collapse_scale_negative", "collapsed_scales"]
    )


def _collapse_from_columns(row: pd.Series) -> str | None:
    values = {name: row.get(f"steered.{name}") for name in ("perplexity", "distinct_2", "n_tokens")}
    return metrics_collapse_reason({k: None if v is None or pd.isna(v) else float(v) for k, v in values.items()})


# ---------------------------------------------------------------- from a cell to its texts


def cell_rows(
    frame: pd.DataFrame,
    layer: int,
    scale: float,
    experiment: str | None = None,
    metrics: Iterable[str] = ("concept_score", "perplexity", "distinct_2", "relevance", "overall"),
) -> pd.DataFrame:
    """The prompts, baseline and steered texts of one (layer, scale) cell, with baseline./steered. metrics."""
    frame = _one_experiment(frame, experiment)
    cell = frame[(frame["layer"] == int(layer)) & np.isclose(frame["scale"], float(scale))]
    columns = list(_TEXT_COLUMNS) + [f"{side}.{name}" for name in metrics for side in ("baseline", "steered")]
    return cell[[c for c in columns if c in cell]].reset_index(drop=True)


def cell_options(
    frame: pd.DataFrame,
    experiment: str | None = None,
) -> list[tuple[str, tuple[int, float]]]:
    """(label, (layer, scale)) pairs for a dropdown, e.g. ipywidgets.Dropdown(options=cell_options(frame))."""
    summary = layer_scale_summary(frame, experiment)
    options = []
    for row in summary.itertuples(index=False):
        flags = (" best" if row.best else "") + (" COLLAPSED" if row.collapsed else "")
        label = (
            f"layer {row.layer}, scale {row.scale:g}: concept {row.concept_delta:+.2f}, "
            f"ppl {row.perplexity:.1f} (x{row.perplexity_ratio:.1f}){flags}"
        )
        options.append((label, (int(row.layer), float(row.scale))))
    return options


def cell_from_click(points: Any) -> tuple[int, float] | None:
    """(layer, scale) of the first clicked heatmap cell, from a FigureWidget `on_click` callback's `points`."""
    xs, ys = list(getattr(points, "xs", []) or []), list(getattr(points, "ys", []) or [])
    if not xs or not ys:
        return None
    return int(float(ys[0])), float(xs[0])
