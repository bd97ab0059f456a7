"""Layer x scale heatmaps of `metric_views.layer_scale_summary`: ★ best scale, ✕ collapsed, better blue and
worse red. plotly is imported inside the functions."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from chunky_utils.collapse import CELL_COLLAPSE_SHARE
from chunky_utils.metric_views import experiments, layer_scale_summary

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
