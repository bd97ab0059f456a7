"""Plotly figures of results over layer and scale (response length, metric trends), and the offline renderer
every notebook figure uses. Plotly is imported inside the functions, so `import chunky_utils` works without it.

Figures of vectors and activations live in `activation_plots`, a sweep's overview page in `sweep_overview`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from chunky_utils.errors import UsageError
from chunky_utils.tables import LENGTH_MEASURES, measure_names_of, metric_names

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

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
