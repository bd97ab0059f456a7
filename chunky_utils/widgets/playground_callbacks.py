"""The playground's callbacks: what each control does when it changes or is pressed, and how an error is
shown in the widget instead of raised."""

from __future__ import annotations

import html
import logging
from collections.abc import Callable
from typing import Any

from chunky_utils.errors import UsageError
from chunky_utils.notebook.own_prompts import typed_prompts
from chunky_utils.notebook.scale_guidance import scale_bands
from chunky_utils.widgets.playground_controls import BUILTIN_PROMPTS, N_BUILTIN_PROMPTS, TYPED_PROMPTS

log = logging.getLogger(__name__)

ERROR_STYLE = "color:#b00020"


class PlaygroundCallbacks:
    """Wires the controls to the playground's actions. (A mixin of `SteeringPlayground`.)"""

    def _wire_controls(self) -> None:
        """Observers on the values and click handlers on the buttons."""
        for control in (
            self.layer_slider,
            self.scale_slider,
            self.target_dropdown,
            self.baseline_dropdown,
            self.prompt_source_dropdown,
            self.n_prompts,
            self.max_tokens,
            self.temperature,
        ):
            control.observe(self._on_change, names="value")
        for control in (self.layer_slider, self.scale_slider):
            control.observe(lambda _change: self.update_guidance(preview=True), names="value")
        self.prompt_source_dropdown.observe(self._on_prompt_source, names="value")
        self.prompts_box.observe(self._on_typing, names="value")
        self.n_prompts.observe(self._remember_n_prompts, names="value")
        self._on_prompt_source({})
        self.generate_button.on_click(self._on_generate)
        self.grid_button.on_click(self._on_grid)
        self.stop_button.on_click(self._on_stop)
        self.save_button.on_click(self._on_save)
        self.csv_button.on_click(lambda _b: self._action(lambda: self.export("csv")))
        self.html_button.on_click(lambda _b: self._action(lambda: self.export("html")))
        self.cli_button.on_click(lambda _b: self._action(self.show_cli_command))

    def _on_change(self, _change: dict[str, Any]) -> None:
        if self.last_payload is not None and not self.busy:
            self.status.value = "Settings changed: press <b>Generate</b>."

    def _on_prompt_source(self, _change: dict[str, Any]) -> None:
        source = self.prompt_source_dropdown.value
        self.n_prompts.disabled = source in (BUILTIN_PROMPTS, TYPED_PROMPTS)
        if source == BUILTIN_PROMPTS:
            self._set_count(N_BUILTIN_PROMPTS)
        elif source == TYPED_PROMPTS:
            self._set_count(max(1, len(typed_prompts(self.prompts_box.value))))
        else:
            self._set_count(self._subset_n_prompts)
        self.update_guidance(preview=not getattr(self, "_typing", False))

    def _set_count(self, value: int) -> None:
        self.n_prompts.max = max(self.max_prompts, value)
        self._setting_count = True
        self.n_prompts.value = value
        self._setting_count = False

    def _remember_n_prompts(self, change: dict[str, Any]) -> None:
        if not getattr(self, "_setting_count", False) and not self.n_prompts.disabled:
            self._subset_n_prompts = int(change["new"])

    def _on_typing(self, _change: dict[str, Any]) -> None:
        """Typing selects 'your prompts'; the preview waits for the next slider move or run (not per keystroke)."""
        self._typing = True
        try:
            if self.prompt_source_dropdown.value != TYPED_PROMPTS and typed_prompts(self.prompts_box.value):
                self.prompt_source_dropdown.value = TYPED_PROMPTS  # calls _on_prompt_source
            elif self.prompt_source_dropdown.value == TYPED_PROMPTS:
                self._set_count(max(1, len(typed_prompts(self.prompts_box.value))))
        finally:
            self._typing = False
        if self.last_preview is not None and self.prompt_source_dropdown.value == TYPED_PROMPTS:
            self.preview_view.value = (
                '<div style="color:#777;font-size:12px">Next-token preview: your prompts changed; it follows the '
                "next slider move or run.</div>"
            )

    def _on_generate(self, button: Any) -> None:
        self._start("generating", self.generate, button)

    def _on_grid(self, button: Any) -> None:
        self._start("grid", self.generate_grid, button)

    def _on_stop(self, _button: Any) -> None:
        self.stop()

    def _on_save(self, _button: Any) -> None:
        self._action(lambda: self.status.__setattr__("value", f"Saved {html.escape(str(self.save_results()))}"))
        if self.last_error is None:
            self.bands = scale_bands(self.base_config.output_dir, self.loaded.name) or self.bands

    def _action(self, action: Callable[[], Any]) -> None:
        self.last_error = None
        try:
            action()
        except Exception as exc:
            self._show_error(exc)

    def _show_error(self, exc: Exception) -> None:
        if not isinstance(exc, UsageError):
            log.exception("playground action failed")
        self.last_error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, UsageError) else str(exc)
        self.status.value = f'<span style="{ERROR_STYLE}">error: {html.escape(self.last_error)}</span>'
