"""A sweep's overview page: layer x scale heatmaps of its summary, a panel per pair and inference set, buttons
choosing the measure. Plotly is imported inside the functions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from chunky_utils.errors import UsageError
from chunky_utils.tables import subset_title

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

OVERVIEW_HIGHER_IS_BETTER: dict[str, int] = {
    "concept_score": 1,
    "concept_probe": 1,
    "overall": 1,
    "relevance": 1,
    "distinct_2": 1,
    "perplexity": -1,
}
"""For `delta.<metric>`: +1 where a rise is better, -1 where it is worse; others are shown without a verdict."""
_OVERVIEW_ORDER = ("concept_score", "concept_probe", "overall", "relevance", "distinct_2", "perplexity")


def overview_measures(frame: pd.DataFrame) -> list[str]:
    """The sweep overview's measures, each once: the metric deltas (concept first), then the text change."""
    found = [str(c) for c in frame.columns if str(c).startswith("delta.")]
    found = list(dict.fromkeys(found))
    rank = {f"delta.{name}": index for index, name in enumerate(_OVERVIEW_ORDER)}
    found.sort(key=lambda column: (rank.get(column, len(rank)), column))
    return found + (["text_change"] if "text_change" in frame.columns else [])


def overview_label(measure: str) -> str:
    """'concept score, steered - baseline (higher is better)' for a measure column."""
    if measure == "text_change":
        return "text change from the baseline (0 same, 1 all different)"
    name = measure.removeprefix("delta.")
    verdict = {1: " (higher is better)", -1: " (lower is better)"}.get(OVERVIEW_HIGHER_IS_BETTER.get(name, 0), "")
    return f"{name.replace('_', ' ')}, steered - baseline{verdict}"


def _panel_label(value: Any) -> str:
    missing = value is None or (isinstance(value, float) and value != value)
    return "None" if missing else str(value)


def sweep_overview_figure(frame: pd.DataFrame) -> go.Figure:
    """Layer x scale heatmaps of a sweep summary (one row per point and prompt; `chunky_utils.sweep.summarize`),
    a panel per pair and inference set, and a row of buttons choosing the measure. Each measure has one
    colour bar shared by all panels; deltas diverge around 0 with blue where the change is better and red
    where it is worse; a cell whose points have no value reads 'n/a', one with no point stays blank."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    measures = overview_measures(frame)
    if not measures:
        raise UsageError("the sweep summary has no delta.<metric> or text_change column to show")
    keys = ["target_subset", "baseline_subset", "inference_dataset", "inference_n_samples"]
    frame = frame.assign(**{key: frame[key].map(_panel_label) for key in keys if key in frame.columns})
    keys = [key for key in keys if key in frame.columns]
    panels = list(frame.groupby(keys, sort=False, dropna=False))
    titles = []
    for key, _ in panels:
        values = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        dataset = values.get("inference_dataset", "None")
        prompts = "built-in prompts" if dataset == "None" else f"{dataset} x {values.get('inference_n_samples')}"
        titles.append(
            f"{subset_title(values.get('target_subset'))} vs {subset_title(values.get('baseline_subset'))} on {prompts}"
        )
    n_rows_of_buttons = -(-len(measures) // 5)
    height = max(420, 330 * len(panels) + 120 + 36 * n_rows_of_buttons)
    plot_height = height - (110 + 36 * n_rows_of_buttons) - 80
    spacing = min(0.5, 130 / plot_height) if len(panels) > 1 else 0.0
    figure = make_subplots(rows=len(panels), cols=1, subplot_titles=titles, vertical_spacing=spacing)
    axes: dict[str, Any] = {}
    for index, measure in enumerate(measures):
        axis = "coloraxis" if index == 0 else f"coloraxis{index + 1}"
        tables = [
            part.pivot_table(index="layer", columns="scale", values=measure, aggfunc="mean", dropna=False)
            .sort_index()
            .sort_index(axis=1)
            for _, part in panels
        ]
        counted = [
            part.pivot_table(index="layer", columns="scale", values=measure, aggfunc="size") for _, part in panels
        ]
        finite = [float(v) for table in tables for v in table.to_numpy().ravel() if v == v]
        direction = OVERVIEW_HIGHER_IS_BETTER.get(measure.removeprefix("delta."), 0)
        spec: dict[str, Any] = {
            "colorbar": {"title": {"text": overview_label(measure).replace(" (", "<br>(")}, "len": 0.9},
            "showscale": index == 0,
        }
        if measure == "text_change":
            spec |= {"colorscale": "Greys", "cmin": 0.0, "cmax": 1.0}
        else:
            reach = max((abs(v) for v in finite), default=1.0) or 1.0
            colours = {1: "RdBu", -1: "RdBu_r"}.get(direction, "PiYG")
            spec |= {"colorscale": colours, "cmin": -reach, "cmax": reach}
        axes[axis] = spec
        for row, (table, counts) in enumerate(zip(tables, counted, strict=True), start=1):
            z = table.to_numpy()
            runs = counts.reindex(index=table.index, columns=table.columns).fillna(0).to_numpy()
            text = [
                [("n/a" if n else "") if v != v else f"{v:.3g}" for v, n in zip(line, run_line, strict=True)]
                for line, run_line in zip(z, runs, strict=True)
            ]
            figure.add_trace(
                go.Heatmap(
                    z=z,
                    x=[f"scale {scale:g}" for scale in table.columns],
                    y=[f"layer {layer}" for layer in table.index],
                    coloraxis=axis,
                    text=text,
                    texttemplate="%{text}",
                    hovertemplate=f"%{{y}}, %{{x}}<br>{overview_label(measure)}: %{{text}}<extra></extra>",
                    visible=index == 0,
                    name=measure,
                ),
                row=row,
                col=1,
            )
    n_panels = len(panels)
    buttons = []
    for index, measure in enumerate(measures):
        visible = [m == measure for m in measures for _ in range(n_panels)]
        shown = {
            f"{'coloraxis' if i == 0 else f'coloraxis{i + 1}'}.showscale": i == index for i in range(len(measures))
        }
        buttons.append(
            {
                "label": overview_label(measure).split(" (")[0].replace(", steered - baseline", " change"),
                "method": "update",
                "args": [{"visible": visible}, {"title.text": _overview_title(measure), **shown}],
            }
        )
    per_row = 5
    rows_of_buttons = [buttons[i : i + per_row] for i in range(0, len(buttons), per_row)]
    menus = [
        {
            "type": "buttons",
            "direction": "right",
            "buttons": row_buttons,
            "showactive": False,  # the title names the measure shown
            "x": 0.0,
            "xanchor": "left",
            "y": 1.0 + 0.02 + 0.07 * (len(rows_of_buttons) - 1 - number) * (420 / max(420, 330 * n_panels)),
            "yanchor": "bottom",
            "pad": {"b": 30},
        }
        for number, row_buttons in enumerate(rows_of_buttons)
    ]
    figure.update_layout(
        title={"text": _overview_title(measures[0]), "y": 0.99, "yanchor": "top"},
        updatemenus=menus,
        margin={"t": 110 + 36 * len(rows_of_buttons), "b": 80},
        height=height,
        plot_bgcolor="#c8c8c8",  # grey where a layer x scale point was not run, distinct from any colour
        annotations=[
            *figure.layout.annotations,
            {
                "text": "grey: not run; n/a: run, but nothing to score",
                "xref": "paper",
                "yref": "paper",
                "x": 1.0,
                "y": 1.0,
                "xanchor": "right",
                "yanchor": "bottom",
                "yshift": 4,
                "showarrow": False,
                "font": {"size": 11, "color": "#555"},
            },
        ],
        **axes,
    )
    return figure


def _overview_title(measure: str) -> str:
    return f"Sweep overview: <b>mean {overview_label(measure)}</b> per layer and scale"


def sweep_overview_html(frame: pd.DataFrame, title: str = "Sweep overview") -> str:
    """`sweep_overview_figure` as a whole offline page (plotly.js inline) with a page title."""
    import html as html_module

    page = sweep_overview_figure(frame).to_html(include_plotlyjs=True, full_html=True)
    return page.replace("<head>", f"<head><title>{html_module.escape(title)}</title>", 1)
