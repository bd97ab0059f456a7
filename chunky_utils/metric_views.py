"""Layer x scale views of the per-generation metrics: tables, heatmaps, best and collapse scales, cell texts.

Everything starts from `metrics_frame(...)`: one row per (results file, prompt) with the texts and
`baseline.<metric>`, `steered.<metric>` and `delta.<metric>` columns (`results.results_table`'s naming).
plotly is imported only by the figure functions.
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


# ---------------------------------------------------------------- figures


HIGHER_IS_BETTER: dict[str, int] = {
    "concept_delta": 1,
    "concept_steered": 1,
    "concept_baseline": 1,
    "probe_delta": 1,
    "perplexity": -1,
    "baseline_perplexity": -1,
    "perplexity_ratio": -1,
    "distinct_2": 1,
    "relevance": 1,
    "relevance_delta": 1,
    "overall": 1,
    "empty_share": -1,
    "collapsed_share": -1,
}
"""+1 where a higher value is better, -1 where it is worse: the heatmaps colour better blue and worse red."""

METRIC_TITLES: dict[str, str] = {
    "concept_delta": "concept, steered - baseline",
    "perplexity": "steered perplexity (median)",
    "perplexity_ratio": "perplexity, steered / baseline",
    "distinct_2": "distinct-2 of steered answers",
    "overall": "overall score",
    "collapsed_share": "share of steered answers collapsed",
}


def metric_title(metric: str) -> str:
    """A heading for a summary column that says which way is better."""
    direction = HIGHER_IS_BETTER.get(metric)
    arrow = {1: " (higher is better)", -1: " (lower is better)"}.get(direction or 0, "")
    return METRIC_TITLES.get(metric, metric.replace("_", " ")) + arrow


def _cell_text(value: float, fmt: str, best: bool, collapsed: bool) -> str:
    text = "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)
    return text + (" ★" if best else "") + (" ✕" if collapsed else "")


def _missing_reason(cell: pd.Series) -> str:
    if float(cell.get("empty_share", 0.0)) >= 1.0:
        return "n/a: every steered answer in this cell is empty, so there is nothing to score"
    return "n/a: these results carry no metrics (run without --no-metrics)"


def heatmap_trace(summary: pd.DataFrame, metric: str, log_color: bool | None = None) -> Any:
    """A plotly Heatmap of one summary column, layers on y, scales on x; ★ best scale, ✕ collapsed.

    Colours diverge around the baseline (0 for deltas, the baseline's perplexity for perplexity), blue where
    the value is better and red where it is worse (HIGHER_IS_BETTER); an empty cell says why in its text.
    customdata holds [layer, scale] per cell, so a click handler can call `cell_rows`.
    """
    import plotly.graph_objects as go

    if metric not in summary:
        raise ValueError(f"unknown metric {metric!r}: choose one of {list(summary.columns)}")
    log_color = metric.startswith("perplexity") and metric != "perplexity_ratio" if log_color is None else log_color
    layers = sorted(summary["layer"].unique())
    scales = sorted(summary["scale"].unique())
    table = summary.set_index(["layer", "scale"])
    z, text, hover, custom = [], [], [], []
    for layer in layers:
        z_row, text_row, hover_row, custom_row = [], [], [], []
        for scale in scales:
            if (layer, scale) in table.index:
                cell = table.loc[(layer, scale)]
                value = float(cell[metric])
                missing = math.isnan(value)
                colour = math.log10(value) if log_color and value > 0 else (math.nan if log_color else value)
                z_row.append(colour)
                text_row.append(_cell_text(value, ".3g", bool(cell["best"]), bool(cell["collapsed"])))
                detail = _missing_reason(cell) if missing else f"{value:.4g}"
                if bool(cell["collapsed"]):
                    detail += f"<br>collapsed: {float(cell.get('collapsed_share', 0.0)):.0%} of steered answers"
                hover_row.append(detail)
            else:
                z_row.append(math.nan)
                text_row.append("")
                hover_row.append("not run")
            custom_row.append([int(layer), float(scale)])
        z.append(z_row)
        text.append(text_row)
        hover.append(hover_row)
        custom.append(custom_row)
    direction = HIGHER_IS_BETTER.get(metric, 1)
    midpoint = None
    if metric.endswith("delta"):
        midpoint = 0.0
    elif metric == "perplexity_ratio":
        midpoint = 1.0
    elif log_color and "baseline_perplexity" in summary and summary["baseline_perplexity"].gt(0).any():
        midpoint = math.log10(float(summary["baseline_perplexity"][summary["baseline_perplexity"] > 0].median()))
    colorbar: dict[str, Any] = {"title": {"text": metric_title(metric).replace(" (", "<br>(")}}
    finite = [v for row in z for v in row if not math.isnan(v)]
    if log_color and finite:
        ticks = [t for t in range(math.floor(min(finite)), math.ceil(max(finite)) + 1)]
        colorbar |= {"tickvals": ticks, "ticktext": [f"{10**t:g}" for t in ticks]}
    return go.Heatmap(
        z=z,
        x=[f"{s:g}" for s in scales],
        y=[int(layer) for layer in layers],
        text=text,
        texttemplate="%{text}",
        customdata=custom,
        colorscale="RdBu" if direction > 0 else "RdBu_r",
        zmid=midpoint,
        colorbar=colorbar,
        hovertext=hover,
        hovertemplate="layer %{y}, scale %{x}<br>" + metric + ": %{hovertext}<extra></extra>",
        name=metric,
    )


NOT_RUN_COLOUR = "#c8c8c8"
"""The plot background: a layer x scale cell with no run shows grey, a colour no value takes."""

SHORT_TITLES: dict[str, str] = {"concept_delta": "Δ concept", "perplexity": "perplexity", "probe_delta": "Δ probe"}


def _legend(best_by: str) -> str:
    return (
        f"★ best scale by {best_by}; ✕ collapsed (at least {CELL_COLLAPSE_SHARE:.0%} of steered answers loop, "
        "repeat or read as nonsense: chunky_utils.collapse)<br>blue = better, red = worse; n/a: nothing to "
        "score; grey: not run"
    )


def _short_colorbar(trace: Any, metric: str) -> None:
    """A colour bar title short enough to sit beside a subplot (the subplot's title has the long form)."""
    arrow = {1: " ↑ better", -1: " ↓ better"}.get(HIGHER_IS_BETTER.get(metric, 0), "")
    trace.colorbar.title.text = f"{SHORT_TITLES.get(metric, metric)}<br>{arrow.strip()}" if arrow else metric


def layer_scale_heatmap(
    frame: pd.DataFrame,
    metric: str = "concept_delta",
    experiment: str | None = None,
    best_by: str = "concept_delta",
) -> Any:
    """A layer x scale heatmap (plotly Figure) of one summary column, e.g. concept_delta or perplexity,
    titled with its experiment."""
    import plotly.graph_objects as go

    summary = layer_scale_summary(frame, experiment, best_by)
    figure = go.Figure(heatmap_trace(summary, metric))
    name = experiment or _only_experiment(frame)
    figure.update_layout(
        title={"text": f"{name}: {metric_title(metric)}<br><sup>{_legend(best_by)}</sup>"},
        xaxis={"title": "scale", "type": "category"},
        yaxis={"title": "layer", "type": "category"},
        plot_bgcolor=NOT_RUN_COLOUR,
        margin={"t": 120},
    )
    return figure


def _only_experiment(frame: pd.DataFrame) -> str:
    names = experiments(frame)
    return names[0] if len(names) == 1 else "all results"


def metric_heatmaps(
    frame: pd.DataFrame,
    metrics: tuple[str, ...] = ("concept_delta", "perplexity"),
    experiment: str | None = None,
    best_by: str = "concept_delta",
) -> Any:
    """Side-by-side layer x scale heatmaps (default: concept delta and steered perplexity) in one Figure,
    titled with the experiment; each with its own colour bar saying which way is better."""
    from plotly.subplots import make_subplots

    summary = layer_scale_summary(frame, experiment, best_by)
    titles = [metric_title(metric) for metric in metrics]
    figure = make_subplots(rows=1, cols=len(metrics), subplot_titles=titles, horizontal_spacing=0.2)
    for column, metric in enumerate(metrics, start=1):
        trace = heatmap_trace(summary, metric)
        _short_colorbar(trace, metric)
        axis_name = "xaxis" if column == 1 else f"xaxis{column}"
        trace.colorbar.x = figure.layout[axis_name].domain[1] + 0.01
        trace.colorbar.len = 0.9
        figure.add_trace(trace, row=1, col=column)
        figure.update_xaxes(title_text="scale", type="category", row=1, col=column)
        figure.update_yaxes(title_text="layer", type="category", row=1, col=column)
    name = experiment or _only_experiment(frame)
    figure.update_layout(
        title={"text": f"{name}<br><sup>{_legend(best_by)}</sup>"}, margin={"t": 130}, plot_bgcolor=NOT_RUN_COLOUR
    )
    return figure
