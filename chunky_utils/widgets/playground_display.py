"""What the playground shows: the side-by-side and token tables a page at a time, the scale guidance under
the scale slider, and the next-token preview beside the controls."""

from __future__ import annotations

import html
from typing import Any

from chunky_utils.comparison_html import side_by_side_html
from chunky_utils.config import RunConfig
from chunky_utils.errors import UsageError
from chunky_utils.instrument.preview import next_token_preview
from chunky_utils.instrument.vectors import relative_magnitude
from chunky_utils.instrument_html import preview_html, token_view_html
from chunky_utils.pipeline import RunRecord
from chunky_utils.steering import SteeringVector

BAND_COLOURS = {"subtle": "#666", "strong": "#1b7a3a", "likely to collapse": "#b00020"}


class PlaygroundDisplay:
    """Draws results, guidance and the preview. (A mixin of `SteeringPlayground`.)"""

    def show_record(self, record: RunRecord) -> None:
        """Show a run's payload; Save JSON then writes exactly this payload."""
        self.last_record = record
        self.show_payload(record.payload)

    def show_payload(self, payload: dict[str, Any], config: RunConfig | None = None) -> None:
        """Show a results payload (from `generate` or a results JSON) in the side-by-side table; with its
        config, Save JSON can write it."""
        self.last_payload = payload
        if config is not None:
            self.last_record = RunRecord(config, payload)
            self.last_readings = {}
            meta = payload["metadata"]
            self.status.value = (
                f"Showing the batch run: layer {meta.get('layer')}, scale {float(meta.get('scale', 0)):g} on "
                f"{len(payload['results'])} prompts. Move the sliders and press <b>Generate</b> for another."
            )
        self.table_pager.page = 0
        self._draw()
        for button in (self.save_button, self.csv_button, self.html_button):
            button.disabled = self.last_record is None

    def _draw(self) -> None:
        payload = self.last_payload
        if payload is None:
            return
        rows = payload["results"]
        self.table_pager.set_rows(len(rows))
        page, size = self.table_pager.page, self.table_pager.page_size
        self._shown["table"] = side_by_side_html(rows, payload["metadata"], page=page, page_size=size)
        self._shown["tokens"] = token_view_html(
            rows, self.last_readings, self._reading_layer, self._reading_unit, page=page, page_size=size
        )
        self.table.value = self._shown["table"]
        self.tokens_view.value = self._shown["tokens"]

    def update_guidance(self, preview: bool = True) -> None:
        """The scale's effective magnitude as a share of the layer's mean residual norm, its band, and (with
        `preview`) the next-token preview; both wait for a vector in memory or in the cache."""
        try:
            config = self.current_config()
        except UsageError as exc:
            self.guidance.value = f'<span style="color:#777">{html.escape(str(exc))}</span>'
            return
        vector = self.known_vector(config)
        if vector is None or config.layer not in vector.layers:
            self.guidance.value = (
                '<span style="color:#777">scale guidance and next-token preview appear once this pair\'s vector '
                "is loaded (press Generate)</span>"
            )
            self.preview_view.value = ""
            return
        share = relative_magnitude(vector, config.layer, config.scale)
        band = self.bands.band(share)
        rule = (
            f"bands from {self.bands.source}: subtle below {self.bands.subtle_below:.0%}, likely to collapse from "
            f"{self.bands.collapse_from:.0%} of the layer's mean residual norm"
        )
        self.guidance.value = (
            f'<div class="chunky-band" title="{html.escape(rule)}" style="margin-left:20px;font-size:12px">'
            f"scale x norm = {abs(config.scale) * vector.norm(config.layer):.3g} = <b>{share:.0%}</b> of layer "
            f'{config.layer}\'s mean residual norm: <b style="color:{BAND_COLOURS[band]}">{band}</b></div>'
        )
        if preview and not self.busy:
            self.preview(config, vector)

    def preview(self, config: RunConfig | None = None, vector: SteeringVector | None = None) -> Any:
        """The next-token preview for the first prompt of the current source (one forward, unsteered and
        steered in one batch); None while a run holds the model or no vector is known."""
        if self.busy:
            return None
        config = config or self.current_config()
        vector = vector or self.known_vector(config)
        if vector is None or config.layer not in vector.layers:
            return None
        prompt = self.runner.prompts(config).inference.prompts[0]
        delta = vector.at(config.layer) * float(config.scale)
        self.last_preview = next_token_preview(
            self.loaded, prompt, config.layer, delta, top=5, positions=config.steer_positions
        )
        self.preview_view.value = preview_html(self.last_preview, f"at layer {config.layer}, scale {config.scale:g}")
        return self.last_preview
