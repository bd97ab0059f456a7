"""ipywidgets views: the steering playground (sliders over a loaded model) and a viewer comparing two configs.

ipywidgets is imported inside the classes, so `import chunky_utils` works without it. Both classes can be
driven from code: set a control's `.value`, call `generate_button.click()`, read `.table.value`.
"""

from __future__ import annotations

import html
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chunky_utils.config import RunConfig
from chunky_utils.data import TULU_SET_MAP, safe_label
from chunky_utils.errors import UsageError
from chunky_utils.models import LoadedModel, check_layer
from chunky_utils.pipeline import ExistingResultError, PreparedPrompts, Runner, RunRecord, result_path_for
from chunky_utils.steering import SteeringVector
from chunky_utils.tables import SIDES, comparison_rows, side_by_side_html, subset_title

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

BUILTIN_PROMPTS = "builtin"
"""Prompt-source value meaning the five built-in inference prompts (`inference_dataset=None`)."""

ERROR_STYLE = "color:#b00020"


def subset_options(extra: Sequence[str | None] = ()) -> list[tuple[str, str]]:
    """Dropdown options for every Tulu key ('12 CoCoNot'), plus any other subset given (e.g. a prompt file)."""
    options = [(subset_title(key), key) for key in TULU_SET_MAP]
    for value in extra:
        if value is not None and value not in TULU_SET_MAP and value not in [v for _, v in options]:
            options.append((Path(str(value)).name, str(value)))
    return options


class SteeringPlayground:
    """Sliders and dropdowns over one loaded model. Vectors for every layer come from the activation cache
    (and are then kept in memory), so moving the layer or scale slider costs only generation."""

    def __init__(
        self,
        loaded: LoadedModel,
        config: RunConfig,
        scale_limit: float = 10.0,
        scale_step: float = 0.25,
        max_prompts: int = 50,
    ) -> None:
        import ipywidgets as widgets

        check_layer(loaded.model, config.layer)
        config = config.with_changes(
            target_subset=str(config.target_subset),
            baseline_subset=str(config.baseline_subset),
            inference_dataset=None if config.inference_dataset is None else str(config.inference_dataset),
        ).validated()
        self.loaded = loaded
        self.base_config = config
        self.runner = Runner(loaded)
        self.last_payload: dict[str, Any] | None = None
        self.last_record: RunRecord | None = None
        self.last_error: str | None = None
        self.last_timings: dict[str, float] = {}
        self.saved_path: Path | None = None

        limit = max(float(scale_limit), abs(float(config.scale)))
        wide = {"description_width": "110px"}
        slider_layout = {"width": "420px"}
        self.layer_slider = widgets.IntSlider(
            value=config.layer,
            min=0,
            max=loaded.n_layers - 1,
            description="layer",
            continuous_update=False,
            style=wide,
            layout=slider_layout,
        )
        self.scale_slider = widgets.FloatSlider(
            value=float(config.scale),
            min=-limit,
            max=limit,
            step=scale_step,
            description="scale",
            continuous_update=False,
            readout_format=".2f",
            style=wide,
            layout=slider_layout,
        )
        extra = (config.target_subset, config.baseline_subset, config.inference_dataset)
        self.target_dropdown = widgets.Dropdown(
            options=subset_options(extra), value=config.target_subset, description="target", style=wide
        )
        self.baseline_dropdown = widgets.Dropdown(
            options=subset_options(extra), value=config.baseline_subset, description="baseline", style=wide
        )
        self.prompt_source_dropdown = widgets.Dropdown(
            options=[("built-in prompts (5)", BUILTIN_PROMPTS), *subset_options(extra)],
            value=config.inference_dataset if config.inference_dataset is not None else BUILTIN_PROMPTS,
            description="prompt source",
            style=wide,
        )
        self.n_prompts = widgets.BoundedIntText(
            value=max(1, min(config.inference_n_samples, max_prompts)),
            min=1,
            max=max_prompts,
            description="prompts",
            style=wide,
        )
        self.max_tokens = widgets.BoundedIntText(
            value=config.max_tokens, min=1, max=4096, description="max tokens", style=wide
        )
        self.temperature = widgets.BoundedFloatText(
            value=config.temperature, min=0.0, max=5.0, step=0.05, description="temperature", style=wide
        )
        self.generate_button = widgets.Button(description="Generate", button_style="primary", icon="play")
        self.save_button = widgets.Button(description="Save JSON", icon="save", disabled=True)
        self.save_name = widgets.Text(
            value="", placeholder="optional name", description="save as", style=wide, layout={"width": "260px"}
        )
        self.overwrite_toggle = widgets.Checkbox(value=False, description="overwrite", indent=False)
        self.status = widgets.HTML(value="Press <b>Generate</b> to steer with these settings.")
        self.table = widgets.HTML(value="")
        for control, name in (
            (self.layer_slider, "layer"),
            (self.scale_slider, "scale"),
            (self.target_dropdown, "target"),
            (self.baseline_dropdown, "baseline"),
            (self.prompt_source_dropdown, "prompt-source"),
            (self.n_prompts, "prompts"),
            (self.max_tokens, "max-tokens"),
            (self.temperature, "temperature"),
            (self.generate_button, "generate"),
            (self.save_button, "save"),
            (self.save_name, "save-name"),
            (self.overwrite_toggle, "overwrite"),
            (self.status, "status"),
            (self.table, "table"),
        ):
            control.add_class(f"chunky-{name}")
            passive = (self.generate_button, self.save_button, self.save_name, self.overwrite_toggle)
            if control not in (*passive, self.status, self.table):
                control.observe(self._on_change, names="value")
        self.prompt_source_dropdown.observe(self._on_prompt_source, names="value")
        self._on_prompt_source({})
        self.generate_button.on_click(self._on_generate)
        self.save_button.on_click(self._on_save)
        self.view = widgets.VBox(
            [
                widgets.HBox(
                    [
                        widgets.VBox([self.layer_slider, self.scale_slider, self.max_tokens, self.temperature]),
                        widgets.VBox(
                            [self.target_dropdown, self.baseline_dropdown, self.prompt_source_dropdown, self.n_prompts]
                        ),
                    ]
                ),
                widgets.HBox([self.generate_button, self.save_button, self.save_name, self.overwrite_toggle]),
                self.status,
                self.table,
            ]
        )
        self.view.add_class("chunky-playground")

    # ------------------------------------------------------------ state

    def current_config(self) -> RunConfig:
        """The run the controls describe now (the base config with the controls' values)."""
        source = self.prompt_source_dropdown.value
        return self.base_config.with_changes(
            layer=int(self.layer_slider.value),
            scale=float(self.scale_slider.value),
            target_subset=self.target_dropdown.value,
            baseline_subset=self.baseline_dropdown.value,
            inference_dataset=None if source == BUILTIN_PROMPTS else source,
            inference_n_samples=int(self.n_prompts.value),
            max_tokens=int(self.max_tokens.value),
            temperature=float(self.temperature.value),
            progress=False,
        )

    def prompts_for(self, config: RunConfig) -> PreparedPrompts:
        """Vector and inference prompts, drawn once per setting (the same draw as the CLI's)."""
        return self.runner.prompts(config)

    def vector_for(self, config: RunConfig, prompts: PreparedPrompts) -> tuple[SteeringVector, dict[str, bool]]:
        """The contrastive vector at the config's layer: from memory, else from the cache (extracting once)."""
        return self.runner.vector(config, prompts)

    @property
    def last_vector_source(self) -> str | None:
        return self.runner.last_vector_source

    @property
    def last_config(self) -> RunConfig | None:
        """The settings the answers on screen were made with (not the controls' current values)."""
        return self.last_record.config if self.last_record is not None else None

    # ------------------------------------------------------------ actions

    def generate(self) -> dict[str, Any]:
        """Generate baseline and steered answers for the current controls (the CLI's run path); show the payload."""
        started = time.perf_counter()
        config = self.current_config().validated()
        (record,) = self.runner.run(config)
        self.last_timings = dict(record.payload["metadata"]["timings"])
        self.show_record(record)
        timings = record.payload["metadata"]["timings"]
        reused = (record.payload["metadata"].get("baseline_cache") or {}).get("reused", 0)
        self.status.value = (
            f"Generated: layer {config.layer}, scale {config.scale:g} | vector from {self.last_vector_source} "
            f"({timings['vector_s']:.2f} s), generation {timings['generate_s']:.2f} s"
            f"{f', {reused} baselines from the cache' if reused else ''} | "
            f"{time.perf_counter() - started:.1f} s in all"
        )
        return record.payload

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
        self.table.value = side_by_side_html(payload["results"], payload["metadata"])
        self.save_button.disabled = self.last_record is None

    def save_path(self) -> Path:
        """Where Save JSON writes: the seed's layout, decoding settings in the name when not the defaults,
        and the 'save as' name when one is given."""
        if self.last_record is None:
            raise UsageError("nothing generated yet: press Generate first")
        path = result_path_for(self.last_record.config, decoding_in_name=True)
        name = self.save_name.value.strip()
        return path.with_name(f"{path.stem}_{safe_label(name)}.json") if name else path

    def save_results(self) -> Path:
        """Write the payload on screen, as it is, with the settings it was made with."""
        path = self.save_path()
        assert self.last_record is not None
        record = RunRecord(self.last_record.config, self.last_payload or self.last_record.payload)
        try:
            self.saved_path = self.runner.save(record, overwrite=bool(self.overwrite_toggle.value), path=path)
        except ExistingResultError as exc:
            raise UsageError(f"{exc}: tick 'overwrite' or type a name under 'save as'") from None
        return self.saved_path

    def _on_change(self, _change: dict[str, Any]) -> None:
        if self.last_payload is not None:
            self.status.value = "Settings changed: press <b>Generate</b>."

    def _on_prompt_source(self, _change: dict[str, Any]) -> None:
        self.n_prompts.disabled = self.prompt_source_dropdown.value == BUILTIN_PROMPTS

    def _on_generate(self, _button: Any) -> None:
        self.generate_button.disabled = True
        self.last_error = None
        self.status.value = "Generating..."
        try:
            self.generate()
        except Exception as exc:  # shown in the widget: a callback has nowhere else to report
            self._show_error(exc)
        finally:
            self.generate_button.disabled = False

    def _on_save(self, _button: Any) -> None:
        self.last_error = None
        try:
            path = self.save_results()
        except Exception as exc:
            self._show_error(exc)
        else:
            self.status.value = f"Saved {html.escape(str(path))}"

    def _show_error(self, exc: Exception) -> None:
        if not isinstance(exc, UsageError):
            log.exception("playground action failed")
        self.last_error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, UsageError) else str(exc)
        self.status.value = f'<span style="{ERROR_STYLE}">error: {html.escape(self.last_error)}</span>'

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.view._repr_mimebundle_(**kwargs)


class ComparisonViewer:
    """Two dropdowns, each picking a config and its baseline or steered answers, shown side by side."""

    def __init__(self, frame: pd.DataFrame, left: str | None = None, right: str | None = None) -> None:
        import ipywidgets as widgets

        if frame.empty:
            raise UsageError("no results to compare")
        self.frame = frame
        configs = frame.drop_duplicates("config_id")[["config_id", "config"]].itertuples(index=False)
        options = [(f"{label} - {side}", f"{config_id}::{side}") for config_id, label in configs for side in SIDES]
        values = [value for _, value in options]
        default_left = values[1] if len(values) > 1 else values[0]
        default_right = values[3] if len(values) > 3 else values[0]
        self.left_dropdown = widgets.Dropdown(
            options=options, value=self._pick(left, values, default_left), description="left"
        )
        self.right_dropdown = widgets.Dropdown(
            options=options, value=self._pick(right, values, default_right), description="right"
        )
        for dropdown in (self.left_dropdown, self.right_dropdown):
            dropdown.layout = widgets.Layout(width="95%")
            dropdown.observe(self._on_change, names="value")
        self.table = widgets.HTML()
        self.table.add_class("chunky-comparison")
        self.view = widgets.VBox([self.left_dropdown, self.right_dropdown, self.table])
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
        """Redraw the table for the current dropdowns; return its HTML."""
        left, right = self._split(self.left_dropdown.value), self._split(self.right_dropdown.value)
        rows, caption = comparison_rows(self.frame, left, right)
        self.table.value = side_by_side_html(
            rows,
            left="left",
            right="right",
            left_title=self.left_dropdown.label,
            right_title=self.right_dropdown.label,
            caption=caption,
        )
        return self.table.value

    def _on_change(self, _change: dict[str, Any]) -> None:
        self.render()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.view._repr_mimebundle_(**kwargs)


class MetricCellBrowser:
    """A dropdown of (layer, scale) cells, best and collapsed ones flagged, showing the texts behind the cell."""

    def __init__(self, scores: pd.DataFrame, experiment: str | None = None) -> None:
        import ipywidgets as widgets

        from chunky_utils.metric_views import cell_options

        if scores.empty:
            raise UsageError("no scored results to browse")
        self.scores = scores
        self.experiment = experiment
        self.dropdown = widgets.Dropdown(options=cell_options(scores, experiment), description="cell")
        self.dropdown.layout = widgets.Layout(width="95%")
        self.dropdown.observe(lambda _change: self.render(), names="value")
        self.table = widgets.HTML()
        self.view = widgets.VBox([self.dropdown, self.table])
        self.render()

    def render(self) -> str:
        """Show the current cell's prompts, texts and metrics; return the HTML."""
        from chunky_utils.metric_views import cell_rows

        layer, scale = self.dropdown.value
        self.table.value = cell_rows(self.scores, layer, scale, self.experiment).to_html(index=False, na_rep="")
        return self.table.value

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.view._repr_mimebundle_(**kwargs)
