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
    """Norm of each subset's mean per layer, and of the contrastive vector when given."""
    import plotly.graph_objects as go

    if not means:
        raise UsageError("layer_norms_figure needs at least one subset")
    fig = go.Figure()
    for subset, subset_mean in means.items():
        layers = sorted(subset_mean.means)
        fig.add_trace(
            go.Scatter(
                x=layers,
                y=[subset_mean.means[layer].norm for layer in layers],
                mode="lines+markers",
                name=f"mean of {subset_title(subset)}",
            )
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
                line={"dash": "dash", "width": 3},
            )
        )
    fig.update_layout(
        title="Norm per layer: subset means and the contrastive vector",
        xaxis_title="layer",
        yaxis_title="L2 norm",
        legend_title="",
    )
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
            zmid=0 if center else None,
            texttemplate="%{z:.2f}" if len(labels) <= 8 else None,
            colorbar={"title": "cosine"},
        )
    )
    what = "centred subset means" if center else "subset means"
    fig.update_layout(
        title=f"Cosine similarity of {what} at layer {layer}",
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


def pca_figure(activations: Mapping[str, torch.Tensor], layer: int) -> go.Figure:
    """2-D PCA of per-prompt activations ([n, hidden] per subset) at one layer, coloured by subset."""
    import plotly.graph_objects as go

    if not activations:
        raise UsageError("pca_figure needs activations of at least one subset")
    coordinates, shares = pca_2d(torch.cat([a.float() for a in activations.values()]))
    fig = go.Figure()
    start = 0
    for subset, block in activations.items():
        points = coordinates[start : start + block.shape[0]]
        start += block.shape[0]
        fig.add_trace(
            go.Scatter(
                x=points[:, 0].tolist(),
                y=points[:, 1].tolist(),
                mode="markers",
                name=subset_title(subset),
                marker={"size": 7, "opacity": 0.8},
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
