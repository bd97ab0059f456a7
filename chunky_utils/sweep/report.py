"""Gathering a sweep's results: one row per point and prompt (summary.csv) and layer x scale heatmaps
(overview.html)."""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path
from typing import Any

from chunky_utils.cache import atomic_write_text
from chunky_utils.errors import UsageError
from chunky_utils.results import results_table

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.csv"
FIGURE_FILE = "overview.html"


def summary_rows(folder: Path | str) -> list[dict[str, Any]]:
    """One dict per result file and prompt (`chunky_utils.results.results_table`'s columns)."""
    return summarize(folder).to_dict("records")


def summarize(folder: Path | str) -> Any:
    """Every result under a sweep folder as one pandas DataFrame (the rows of summary.csv)."""
    return results_table(Path(folder), skip_unreadable=True)


def overview_measures(frame: Any) -> list[str]:
    """What the overview can show: every metric's steered-minus-baseline delta, then the text change."""
    return [column for column in frame.columns if column.startswith("delta.")] + ["text_change"]


def _group_label(value: Any) -> str:
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    return "None" if missing else str(value)


def overview_figure(frame: Any) -> Any:
    """Layer x scale heatmaps of mean values over prompts, one per pair and inference set; a menu picks the measure."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    measures = overview_measures(frame)
    keys = ["target_subset", "baseline_subset", "inference_dataset", "inference_n_samples"]
    # built-in prompts have no inference set: name them, since pandas drops missing group keys
    frame = frame.assign(**{key: frame[key].map(_group_label) for key in keys})
    panels = list(frame.groupby(keys, sort=False, dropna=False))
    titles = [
        f"{target} vs {baseline} on {'built-in prompts' if dataset == 'None' else f'{dataset} x {n}'}"
        for (target, baseline, dataset, n), _ in panels
    ]
    figure = make_subplots(rows=len(panels), cols=1, subplot_titles=titles)
    for measure in measures:
        for row, (_key, panel) in enumerate(panels, start=1):
            table = panel.pivot_table(index="layer", columns="scale", values=measure, aggfunc="mean")
            table = table.sort_index().sort_index(axis=1)
            figure.add_trace(
                go.Heatmap(
                    z=table.to_numpy(),
                    x=[f"scale {scale:g}" for scale in table.columns],
                    y=[f"layer {layer}" for layer in table.index],
                    colorscale="RdBu" if measure.startswith("delta.") else "Viridis",
                    zmid=0 if measure.startswith("delta.") else None,
                    showscale=False,
                    texttemplate="%{z:.3g}",
                    hovertemplate=f"%{{y}}, %{{x}}<br>{measure}: %{{z:.4g}}<extra></extra>",
                    visible=measure == measures[0],
                    name=measure,
                ),
                row=row,
                col=1,
            )
    buttons = [
        {
            "label": measure,
            "method": "update",
            "args": [
                {"visible": [m == measure for m in measures for _ in panels]},
                {"title.text": f"Sweep overview: mean {measure} per layer and scale"},
            ],
        }
        for measure in measures
    ]
    figure.update_layout(
        title={"text": f"Sweep overview: mean {measures[0]} per layer and scale"},
        updatemenus=[
            {
                "buttons": buttons,
                "direction": "down",
                "x": 1.0,
                "xanchor": "right",
                "y": 1.0,
                "yanchor": "bottom",
                "pad": {"b": 36},
            }
        ],
        margin={"t": 140},
        height=max(360, 300 * len(panels)),
        width=760,
    )
    return figure


def write_summary(folder: Path | str) -> tuple[Path | None, Path | None]:
    """Write summary.csv (always, if any result exists) and overview.html beside it."""
    folder = Path(folder)
    frame = summarize(folder)
    if frame.empty:
        log.warning("no finished results under %s yet: no summary written", folder)
        return None, None
    summary = atomic_write_text(folder / SUMMARY_FILE, frame.to_csv(index=False))
    log.info("summary: %s (%d rows)", summary, len(frame))
    if importlib.util.find_spec("plotly") is None:
        log.warning("plotly is not installed: no %s (pip install plotly, then rerun to redraw)", FIGURE_FILE)
        return summary, None
    html = overview_figure(frame).to_html(include_plotlyjs=True, full_html=True)
    return summary, atomic_write_text(folder / FIGURE_FILE, html)


def read_summary(folder: Path | str) -> Any:
    """A sweep's summary.csv as a DataFrame (a folder or the CSV itself)."""
    import pandas as pd

    path = Path(folder)
    path = path / SUMMARY_FILE if path.is_dir() else path
    if not path.is_file():
        raise UsageError(f"no sweep summary at {path}: run chunky-sweep first")
    return pd.read_csv(path)
