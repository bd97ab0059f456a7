"""Plotly figures of vectors and activations: per-layer norms, cosine similarity between subset means, PCA of
per-prompt activations. Plotly is imported inside the functions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from chunky_utils.errors import UsageError
from chunky_utils.tables import subset_title

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from chunky_utils.activations import SubsetMeans
    from chunky_utils.steering import SteeringVector


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
