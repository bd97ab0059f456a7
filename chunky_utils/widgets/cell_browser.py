"""The metric cell browser: the texts and metrics behind one (layer, scale) cell of the heatmaps."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

from chunky_utils.comparison_html import cell_table_html
from chunky_utils.errors import UsageError
from chunky_utils.widgets.common import PAGE_SIZE, PagedView, Pager

if TYPE_CHECKING:
    import pandas as pd


class MetricCellBrowser(PagedView):
    """A dropdown of (layer, scale) cells, best and collapsed ones flagged, showing the texts behind the cell
    a page at a time, with real line breaks and each side's metrics."""

    def __init__(self, scores: pd.DataFrame, experiment: str | None = None, page_size: int = PAGE_SIZE) -> None:
        import ipywidgets as widgets

        from chunky_utils.metric_views import cell_options

        if scores.empty:
            raise UsageError("no scored results to browse")
        self.scores = scores
        self.experiment = experiment
        self.dropdown = widgets.Dropdown(options=cell_options(scores, experiment), description="cell")
        self.dropdown.layout = widgets.Layout(width="95%")
        self.dropdown.observe(self._on_change, names="value")
        self.pager = Pager(lambda _page: self.render(), page_size)
        self.table = widgets.HTML()
        self.table.add_class("chunky-cell-browser")
        title = widgets.HTML(f"<b>{html.escape(experiment or 'all results')}</b>")
        self.view = widgets.VBox([title, self.dropdown, self.pager.view, self.table])
        self.render()

    def render(self) -> str:
        """Show the current cell's prompts, texts and metrics (one page); return the HTML."""
        from chunky_utils.metric_views import cell_rows

        layer, scale = self.dropdown.value
        cell = cell_rows(self.scores, layer, scale, self.experiment)
        self.pager.set_rows(len(cell))
        caption = f"{self.experiment + ': ' if self.experiment else ''}layer {layer}, scale {scale:g}: "
        self.table.value = cell_table_html(cell, self.pager.page, self.pager.page_size, caption)
        return self.table.value
