"""The comparison viewer: two configs' answers (baseline or steered) side by side, a page at a time."""

from __future__ import annotations

from typing import TYPE_CHECKING

from chunky_utils.comparison_html import comparison_rows, side_by_side_html
from chunky_utils.errors import UsageError
from chunky_utils.tables import SIDES
from chunky_utils.widgets.common import PAGE_SIZE, PagedView, Pager

if TYPE_CHECKING:
    import pandas as pd


class ComparisonViewer(PagedView):
    """Two dropdowns, each picking a config and its baseline or steered answers, shown side by side, a page
    at a time. By default the two sides are two configs that share the most prompts."""

    def __init__(
        self, frame: pd.DataFrame, left: str | None = None, right: str | None = None, page_size: int = PAGE_SIZE
    ) -> None:
        import ipywidgets as widgets

        if frame.empty:
            raise UsageError("no results to compare")
        self.frame = frame
        configs = frame.drop_duplicates("config_id")[["config_id", "config"]].itertuples(index=False)
        options = [(f"{label} - {side}", f"{config_id}::{side}") for config_id, label in configs for side in SIDES]
        values = [value for _, value in options]
        default_left, default_right = default_pair(frame)
        self.left_dropdown = widgets.Dropdown(
            options=options, value=self._pick(left, values, default_left), description="left"
        )
        self.right_dropdown = widgets.Dropdown(
            options=options, value=self._pick(right, values, default_right), description="right"
        )
        for dropdown in (self.left_dropdown, self.right_dropdown):
            dropdown.layout = widgets.Layout(width="95%")
            dropdown.observe(self._on_change, names="value")
        self.pager = Pager(lambda _page: self.render(), page_size)
        self.table = widgets.HTML()
        self.table.add_class("chunky-comparison")
        self.view = widgets.VBox([self.left_dropdown, self.right_dropdown, self.pager.view, self.table])
        self.render()

    @staticmethod
    def _pick(wanted: str | None, values: list[str], default: str) -> str:
        """A dropdown value from a full value ('<config_id>::steered') or a config id (its steered side)."""
        if not wanted:
            return default
        for candidate in (wanted, f"{wanted}::steered"):
            if candidate in values:
                return candidate
        raise UsageError(f"no config {wanted!r} in the results: pick one of {', '.join(sorted(set(values)))}")

    @staticmethod
    def _split(value: str) -> tuple[str, str]:
        config_id, _, side = value.rpartition("::")
        return config_id, side

    def render(self) -> str:
        """Redraw the table for the current dropdowns and page; return its HTML."""
        left, right = self._split(self.left_dropdown.value), self._split(self.right_dropdown.value)
        rows, caption = comparison_rows(self.frame, left, right)
        self.pager.set_rows(len(rows))
        self.table.value = side_by_side_html(
            rows,
            left="left",
            right="right",
            left_title=self.left_dropdown.label,
            right_title=self.right_dropdown.label,
            caption=caption,
            page=self.pager.page,
            page_size=self.pager.page_size,
        )
        return self.table.value


def default_pair(frame: pd.DataFrame) -> tuple[str, str]:
    """Dropdown values for the viewer's two sides: the steered answers of the two configs sharing the most
    prompts (first in the frame's order on ties); one config's baseline and steered when none share any."""
    prompts = {cid: set(part["prompt"]) for cid, part in frame.groupby("config_id", sort=False)}
    ids = list(prompts)
    best: tuple[int, str, str] | None = None
    for i, left in enumerate(ids):
        for right in ids[i + 1 :]:
            shared = len(prompts[left] & prompts[right])
            if shared and (best is None or shared > best[0]):
                best = (shared, left, right)
    if best is None:
        return f"{ids[0]}::baseline", f"{ids[0]}::steered"
    return f"{best[1]}::steered", f"{best[2]}::steered"
