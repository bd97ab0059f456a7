"""Gathering a sweep's results: one row per point and prompt (summary.csv) and layer x scale heatmaps
(overview.html)."""

from __future__ import annotations

import importlib.util
import logging
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


def overview_figure(frame: Any) -> Any:
    """Layer x scale heatmaps of a sweep's summary (`chunky_utils.sweep_overview.sweep_overview_figure`)."""
    from chunky_utils.sweep_overview import sweep_overview_figure

    return sweep_overview_figure(frame)


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
    from chunky_utils.sweep_overview import sweep_overview_html

    html = sweep_overview_html(frame, title=f"Sweep overview: {folder.name}")
    return summary, atomic_write_text(folder / FIGURE_FILE, html)


def read_summary(folder: Path | str) -> Any:
    """A sweep's summary.csv as a DataFrame (a folder or the CSV itself)."""
    import pandas as pd

    path = Path(folder)
    path = path / SUMMARY_FILE if path.is_dir() else path
    if not path.is_file():
        raise UsageError(f"no sweep summary at {path}: run chunky-sweep first")
    return pd.read_csv(path)
