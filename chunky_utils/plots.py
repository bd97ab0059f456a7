"""Plotly figures: per-layer norms, cosine similarity between subset means, PCA of activations, trends over
layer and scale. Plotly is imported inside the functions, so `import chunky_utils` works without it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from chunky_utils.errors import UsageError
from chunky_utils.tables import LENGTH_MEASURES, measure_names_of, metric_names, subset_title

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

    from chunky_utils.activations import SubsetMeans
    from chunky_utils.steering import SteeringVector

OFFLINE_RENDERER = "chunky_offline"
OFFLINE_DEFAULT = f"plotly_mimetype+{OFFLINE_RENDERER}"


# ---------------------------------------------------------------- offline rendering


def setup_offline_plotly() -> str:
    """Render figures with no internet: JupyterLab's plotly mimetype (plotly.js bundled in the extension) plus
    an HTML fallback whose plotly.js is embedded once, inline, in the notebook (no CDN, no MathJax CDN).
    Returns the renderer string now set as default."""
    import plotly.io as pio
    from plotly.io._base_renderers import NotebookRenderer

    class OfflineNotebookRenderer(NotebookRenderer):
        """The 'notebook' renderer without the MathJax CDN script in each figure."""

        def to_mimebundle(self, fig_dict: dict[str, Any]) -> dict[str, str]:
            html = pio.to_html(
                fig_dict,
                config=self.config,
                include_plotlyjs=False,
                include_mathjax=False,
                full_html=False,
                default_width="100%",
                default_height=525,
                validate=False,
            )
            return {"text/html": html}

    if OFFLINE_RENDERER not in pio.renderers:
        pio.renderers[OFFLINE_RENDERER] = OfflineNotebookRenderer(connected=False)
    if pio.renderers.default != OFFLINE_DEFAULT:
        pio.renderers.default = OFFLINE_DEFAULT
    return OFFLINE_DEFAULT


# ---------------------------------------------------------------- vectors and activations


def layer_norms_figure(means: Mapping[str, SubsetMeans], vector: SteeringVector | None = None) -> go.Figure:
    """Norm of each subset's mean per layer (distinct dash and marker per subset, so lines that coincide stay
    visible), the contrastive vector's norm, and below it the vector's norm as a share of the mean norm of the
    target and baseline means: how far one unit of scale moves the residual stream."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if not means:
        raise UsageError("layer_norms_figure needs at least one subset")
    rows = 2 if vector is not None else 1
    fig = make_subplots(
        rows=rows,
        cols=1,
        shared_xaxes=True,
        row_heights=[0.65, 0.35] if rows == 2 else [1.0],
        vertical_spacing=0.08,
        subplot_titles=["L2 norm", "vector norm / mean norm of target and baseline means"][:rows],
    )
    dashes = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]
    symbols = ["circle", "diamond", "square", "triangle-up", "x", "star"]
    for index, (subset, subset_mean) in enumerate(means.items()):
        layers = sorted(subset_mean.means)
        fig.add_trace(
            go.Scatter(
                x=layers,
                y=[subset_mean.means[layer].norm for layer in layers],
                mode="lines+markers",
                name=f"mean of {subset_title(subset)}",
                line={"dash": dashes[index % len(dashes)], "width": 4 if index == 0 else 2},
                marker={"symbol": symbols[index % len(symbols)], "size": 9 if index == 0 else 6},
                opacity=0.55 if index == 0 else 0.9,
            ),
            row=1,
            col=1,
        )
    if vector is not None:
        meta = vector.metadata
        name = f"vector {meta.get('target_subset', 'target')} - {meta.get('baseline_subset', 'baseline')}"
        fig.add_trace(
            go.Scatter(
                x=vector.layers,
                y=[vector.norm(layer) for layer in vector.layers],
                mode="lines+markers",
                name=name,
                line={"dash": "dash", "width": 3, "color": "black"},
            ),
            row=1,
            col=1,
        )
        shares = [
            vector.norm(layer) / ((meta["target_norms"][layer] + meta["baseline_norms"][layer]) / 2)
            for layer in vector.layers
        ]
        fig.add_trace(
            go.Scatter(
                x=vector.layers,
                y=shares,
                mode="lines+markers",
                name="vector norm / mean norm",
                line={"color": "black"},
                hovertemplate="layer %{x}: %{y:.1%}<extra></extra>",
            ),
            row=2,
            col=1,
        )
        fig.update_yaxes(tickformat=".0%", row=2, col=1)
    fig.update_layout(
        title="Norm per layer: subset means and the contrastive vector",
        legend_title="",
        hovermode="x unified",
        height=620 if rows == 2 else 450,
    )
    fig.update_xaxes(title_text="layer", row=rows, col=1)
    fig.update_yaxes(title_text="L2 norm", row=1, col=1)
    return fig


def cosine_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity of the rows of [n, hidden]."""
    unit = torch.nn.functional.normalize(vectors.float(), dim=1)
    return unit @ unit.T


def cosine_heatmap_figure(means: Mapping[str, SubsetMeans], layer: int, center: bool = False) -> go.Figure:
    """Cosine similarity between subset means at one layer; `center` removes the mean over the subsets first."""
    import plotly.graph_objects as go

    missing = [subset for subset, m in means.items() if layer not in m.means]
    if missing:
        raise UsageError(f"no mean at layer {layer} for subsets {', '.join(missing)}")
    if len(means) < 2:
        raise UsageError("a cosine heatmap needs at least two subsets")
    if center and len(means) < 3:
        raise UsageError(
            "the centred view needs at least three subsets: two means minus their average point in opposite "
            "directions by construction (cosine -1), whatever the subsets"
        )
    stacked = torch.stack([m.means[layer].mean_vector.float() for m in means.values()])
    if center:
        stacked = stacked - stacked.mean(dim=0, keepdim=True)
    similarity = cosine_matrix(stacked).tolist()
    labels = [subset_title(subset) for subset in means]
    fig = go.Figure(
        go.Heatmap(
            z=similarity,
            x=labels,
            y=labels,
            colorscale="RdBu",
            zmin=-1.0,
            zmax=1.0,
            zmid=0.0,
            texttemplate="%{z:.3f}" if len(labels) <= 8 else None,
            hovertemplate="%{y} vs %{x}: cosine %{z:.4f}<extra></extra>",
            colorbar={"title": "cosine", "tickvals": [-1, -0.5, 0, 0.5, 1]},
        )
    )
    off_diagonal = [v for i, row in enumerate(similarity) for j, v in enumerate(row) if i != j]
    spread = f"off-diagonal {min(off_diagonal):.3f} to {max(off_diagonal):.3f}" if off_diagonal else ""
    if center:
        what, note = "centred subset means", "the mean over these subsets removed first, so their differences show"
    else:
        what = "subset means"
        note = "raw means share a large common part, so all are alike; the centred view shows how they differ"
    fig.update_layout(
        title={
            "text": f"Cosine similarity of {what} at layer {layer}<br><sup>{spread}; fixed range -1..1; {note}</sup>"
        },
        yaxis={"autorange": "reversed"},
        height=max(420, 28 * len(labels) + 160),
    )
    return fig


def pca_2d(matrix: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Coordinates of the rows of [n, hidden] on the first two principal components, and explained shares."""
    if matrix.dim() != 2 or matrix.shape[0] < 2:
        raise UsageError(f"PCA needs at least two rows of activations, got shape {tuple(matrix.shape)}")
    centred = matrix.float() - matrix.float().mean(dim=0, keepdim=True)
    _, singular, right = torch.linalg.svd(centred, full_matrices=False)
    n_components = min(2, right.shape[0])
    coordinates = centred @ right[:n_components].T
    if n_components < 2:
        coordinates = torch.cat([coordinates, torch.zeros(coordinates.shape[0], 1)], dim=1)
    variance = singular**2
    total = float(variance.sum()) or 1.0
    shares = [float(v) / total for v in variance[:2]] + [0.0] * (2 - n_components)
    return coordinates, shares


def hover_text(text: str, width: int = 60, limit: int = 300) -> str:
    """A prompt for a plotly tooltip: cut to `limit` characters, broken into lines of about `width`."""
    import textwrap

    short = text if len(text) <= limit else text[: limit - 3] + "..."
    return "<br>".join(textwrap.wrap(short.replace("\n", " "), width)) or "(empty)"


def pca_figure(
    activations: Mapping[str, torch.Tensor], layer: int, prompts: Mapping[str, Sequence[str]] | None = None
) -> go.Figure:
    """2-D PCA of per-prompt activations ([n, hidden] per subset) at one layer, coloured by subset; with
    `prompts` (the texts per subset, in the same order) hovering a point shows its prompt."""
    import plotly.graph_objects as go

    if not activations:
        raise UsageError("pca_figure needs activations of at least one subset")
    coordinates, shares = pca_2d(torch.cat([a.float() for a in activations.values()]))
    fig = go.Figure()
    start = 0
    for subset, block in activations.items():
        points = coordinates[start : start + block.shape[0]]
        start += block.shape[0]
        texts = list((prompts or {}).get(subset, []))
        hover = [hover_text(t) for t in texts] if len(texts) == block.shape[0] else None
        fig.add_trace(
            go.Scatter(
                x=points[:, 0].tolist(),
                y=points[:, 1].tolist(),
                mode="markers",
                name=subset_title(subset),
                marker={"size": 7, "opacity": 0.8},
                hovertext=hover,
                hovertemplate=(f"<b>{subset_title(subset)}</b><br>%{{hovertext}}<extra></extra>" if hover else None),
            )
        )
    fig.update_layout(
        title=f"PCA of per-prompt activations at layer {layer}",
        xaxis_title=f"PC1 ({shares[0]:.0%} of variance)",
        yaxis_title=f"PC2 ({shares[1]:.0%} of variance)",
        legend_title="subset",
    )
    return fig


# ---------------------------------------------------------------- results over layer and scale


def varying_axis(frame: pd.DataFrame) -> tuple[str, str]:
    """(x, group): scale on x with a line per layer when scale varies, else layer on x with a line per scale."""
    if frame["scale"].nunique() > 1:
        return "scale", "layer"
    return "layer", "scale"


def trend_figure(frame: pd.DataFrame, measure: str, title: str | None = None) -> go.Figure:
    """Mean `steered.<measure>` per layer or scale, a solid line per pair and layer (or scale); the baseline
    answers of the same runs dotted in the same colour."""
    import plotly.colors
    import plotly.graph_objects as go

    steered, baseline = f"steered.{measure}", f"baseline.{measure}"
    if steered not in frame.columns:
        raise UsageError(f"no measure {measure!r} in the results (have {', '.join(measure_names_of(frame.columns))})")
    x, group = varying_axis(frame)
    palette = plotly.colors.qualitative.Plotly
    fig = go.Figure()
    for index, ((pair, group_value), part) in enumerate(frame.groupby(["pair", group], sort=True)):
        colour = palette[index % len(palette)]
        label = f"{pair} {group} {group_value:g}"
        for column, dash, name in ((steered, "solid", label), (baseline, "dot", f"{label} baseline")):
            if column not in part.columns:
                continue
            means = part.groupby(x, sort=True)[column].mean()
            fig.add_trace(
                go.Scatter(
                    x=means.index.tolist(),
                    y=means.tolist(),
                    mode="lines+markers" if dash == "solid" else "lines",
                    name=name,
                    legendgroup=label,
                    line={"color": colour, "dash": dash},
                )
            )
    fig.update_layout(
        title=title or f"{measure} of steered answers by {x} (dotted: baseline)",
        xaxis_title=x,
        yaxis_title=f"mean {measure}",
        legend_title="",
    )
    return fig


def response_length_figure(frame: pd.DataFrame, unit: str = "words") -> go.Figure:
    """Mean response length (words or chars) of steered answers over layer or scale, baseline dotted."""
    if unit not in LENGTH_MEASURES:
        raise UsageError(f"length unit must be one of {', '.join(LENGTH_MEASURES)}, got {unit!r}")
    x, _ = varying_axis(frame)
    return trend_figure(frame, unit, title=f"Response length ({unit}) by {x} (dotted: baseline)")


def metric_figures(frame: pd.DataFrame, names: Sequence[str] | None = None) -> list[go.Figure]:
    """One trend figure per metric the rows carry (none when there are none)."""
    return [trend_figure(frame, name) for name in (names if names is not None else metric_names(frame))]


# ---------------------------------------------------------------- a sweep's overview page

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
