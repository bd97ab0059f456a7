"""ipywidgets views: the steering playground (sliders over a loaded model) and viewers of finished results.

ipywidgets is imported inside the classes, so `import chunky_utils` works without it. Every view can be
driven from code: set a control's `.value`, call `generate_button.click()` (then `playground.wait()`: the
playground generates on a worker thread, so the kernel stays free for Stop), read `.table.value`.
"""

from __future__ import annotations

import functools
import html
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chunky_utils.config import RunConfig
from chunky_utils.data import TULU_SET_MAP, safe_label
from chunky_utils.errors import UsageError
from chunky_utils.instrument import (
    RunProgress,
    RunWatch,
    StopRequested,
    TokenReading,
    cached_means,
    eos_token_ids,
    generate_grid,
    match_readings,
    next_token_preview,
    relative_magnitude,
)
from chunky_utils.models import LoadedModel, check_layer
from chunky_utils.notebook import (
    DEFAULT_BANDS,
    ScaleBands,
    cli_command,
    scale_bands,
    typed_prompts,
    with_typed_prompts,
)
from chunky_utils.pipeline import ExistingResultError, PreparedPrompts, Runner, RunRecord, result_path_for
from chunky_utils.steering import SteeringVector, contrastive_vector
from chunky_utils.tables import (
    SIDES,
    cell_table_html,
    comparison_rows,
    export_frame,
    grid_html,
    page_slice,
    preview_html,
    side_by_side_html,
    standalone_html,
    subset_title,
    token_view_html,
    vector_caption,
)

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

BUILTIN_PROMPTS = "builtin"
"""Prompt-source value meaning the five built-in inference prompts (`inference_dataset=None`)."""
TYPED_PROMPTS = "typed"
"""Prompt-source value meaning the prompts typed in the playground's text box."""
N_BUILTIN_PROMPTS = 5
MAX_TOKENS_LIMIT = 4096
PAGE_SIZE = 10

ERROR_STYLE = "color:#b00020"
BAND_COLOURS = {"subtle": "#666", "strong": "#1b7a3a", "likely to collapse": "#b00020"}


def subset_options(extra: Sequence[str | None] = ()) -> list[tuple[str, str]]:
    """Dropdown options for every Tulu key ('12 CoCoNot'), plus any other subset given (e.g. a prompt file)."""
    options = [(subset_title(key), key) for key in TULU_SET_MAP]
    for value in extra:
        if value is not None and value not in TULU_SET_MAP and value not in [v for _, v in options]:
            options.append((Path(str(value)).name, str(value)))
    return options


def dimmed(fragment: str, note: str) -> str:
    """An HTML fragment greyed out under a note, while a new one is made."""
    if not fragment:
        return f'<div class="chunky-stale" style="color:#777">{html.escape(note)}</div>'
    return (
        f'<div class="chunky-stale"><div style="color:#777;font-style:italic">{html.escape(note)}</div>'
        f'<div style="opacity:0.35;pointer-events:none">{fragment}</div></div>'
    )


def parse_numbers(text: str, kind: type, what: str) -> list[Any]:
    """'8, 16 24' -> [8, 16, 24] (ints or floats); a UsageError naming `what` on anything else."""
    values = []
    for part in text.replace(",", " ").split():
        try:
            values.append(kind(part))
        except ValueError:
            raise UsageError(f"{what}: {part!r} is not a number") from None
    if not values:
        raise UsageError(f"{what}: give at least one value, e.g. 8, 16")
    return list(dict.fromkeys(values))


GUARD_CSS = (
    "<style>.chunky-guarded.mod-active{pointer-events:none;opacity:0.55;cursor:progress}"
    ".chunky-guarded.mod-active::after{content:' (running)'}</style>"
)
"""Makes a pressed guarded button inert in the browser at once: a ToggleButton gets `mod-active` on the
click itself, before any message reaches the kernel, so a second click of a double click goes nowhere."""


@functools.cache
def guarded_button_class() -> type:
    """A ToggleButton used as a push button that turns inert in the browser the moment it is pressed (its
    `mod-active` class and GUARD_CSS), so a double click cannot start a second run before the kernel hears
    of the first; the kernel also ignores presses while a run is going on, and calls `release()` after it."""
    import ipywidgets as widgets

    class GuardedButton(widgets.ToggleButton):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(value=False, **kwargs)
            self._handlers: list[Callable[[Any], None]] = []
            self.add_class("chunky-guarded")
            self.observe(self._pressed, names="value")

        def on_click(self, handler: Callable[[Any], None]) -> None:
            self._handlers.append(handler)

        def click(self) -> None:
            """Press it, as a click in the browser does (nothing while it is disabled or pressed)."""
            if not self.disabled and not self.value:
                self.value = True

        def release(self) -> None:
            self.value = False
            self.disabled = False

        def _pressed(self, change: dict[str, Any]) -> None:
            if change["new"]:
                for handler in self._handlers:
                    handler(self)

    return GuardedButton


class Pager:
    """Previous / next buttons and a 'page 2 of 5' label; `on_change(page)` redraws."""

    def __init__(self, on_change: Callable[[int], None], page_size: int = PAGE_SIZE) -> None:
        import ipywidgets as widgets

        self.page = 0
        self.n_pages = 1
        self.page_size = page_size
        self.on_change = on_change
        self.previous = widgets.Button(description="previous", icon="chevron-left", layout={"width": "110px"})
        self.next = widgets.Button(description="next", icon="chevron-right", layout={"width": "110px"})
        self.label = widgets.HTML()
        self.previous.on_click(lambda _b: self.go(self.page - 1))
        self.next.on_click(lambda _b: self.go(self.page + 1))
        self.view = widgets.HBox([self.previous, self.label, self.next])
        self.view.add_class("chunky-pager")
        self.set_rows(0)

    def set_rows(self, n_rows: int) -> None:
        _, _, self.page, self.n_pages = page_slice(n_rows, self.page, self.page_size)
        self.label.value = f'<span style="padding:0 8px">page {self.page + 1} of {self.n_pages}</span>'
        self.previous.disabled = self.page == 0
        self.next.disabled = self.page >= self.n_pages - 1
        self.view.layout.display = "flex" if self.n_pages > 1 else "none"

    def go(self, page: int) -> None:
        self.page = min(max(0, page), self.n_pages - 1)
        self.on_change(self.page)


class SteeringPlayground:
    """Sliders and dropdowns over one loaded model. Vectors for every layer come from the activation cache
    (and are then kept in memory), so moving the layer or scale slider costs only generation.

    Generate and Grid run on a worker thread (Stop ends them within one forward step; a progress bar says
    the stage and the time left); the next-token preview and the scale guidance follow the sliders.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        config: RunConfig,
        scale_limit: float = 10.0,
        scale_step: float = 0.25,
        max_prompts: int = 50,
        prompts: Sequence[str] | str | None = None,
        page_size: int = PAGE_SIZE,
        background: bool = True,
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
        self.background = background
        self.last_payload: dict[str, Any] | None = None
        self.last_record: RunRecord | None = None
        self.last_readings: dict[tuple[int, str], TokenReading] = {}
        self.last_grid: Any = None
        self.last_preview: Any = None
        self.last_progress: RunProgress | None = None
        self.last_error: str | None = None
        self.last_timings: dict[str, float] = {}
        self.saved_path: Path | None = None
        self.exported: list[Path] = []
        self.runs = 0
        self.bands: ScaleBands = scale_bands(config.output_dir, loaded.name) or DEFAULT_BANDS
        self._vectors: dict[tuple[Any, ...], SteeringVector] = {}
        self._vector_source: str | None = None
        self._stop = threading.Event()
        self._busy = threading.Lock()
        self._thread: threading.Thread | None = None
        self._shown = {"table": "", "tokens": "", "grid": ""}
        self._subset_n_prompts = (
            max(1, min(config.inference_n_samples, max_prompts)) if config.inference_n_samples > 0 else 10
        )
        self._reading_layer = config.layer
        self._reading_unit = 1.0

        limit = max(float(scale_limit), abs(float(config.scale)))
        wide = {"description_width": "110px"}
        slider_layout = {"width": "420px"}
        self.max_tokens_limit = min(MAX_TOKENS_LIMIT, _context_length(loaded) or MAX_TOKENS_LIMIT)
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
        self.guidance = widgets.HTML(value="")
        typed = typed_prompts(prompts)
        extra = (config.target_subset, config.baseline_subset, None if typed else config.inference_dataset)
        self.target_dropdown = widgets.Dropdown(
            options=subset_options(extra), value=config.target_subset, description="target", style=wide
        )
        self.baseline_dropdown = widgets.Dropdown(
            options=subset_options(extra), value=config.baseline_subset, description="baseline", style=wide
        )
        source = TYPED_PROMPTS if typed else (config.inference_dataset or BUILTIN_PROMPTS)
        self.prompt_source_dropdown = widgets.Dropdown(
            options=[
                (f"built-in prompts ({N_BUILTIN_PROMPTS})", BUILTIN_PROMPTS),
                ("your prompts (typed below)", TYPED_PROMPTS),
                *subset_options(extra),
            ],
            value=source,
            description="prompt source",
            style=wide,
        )
        self.n_prompts = widgets.BoundedIntText(
            value=self._subset_n_prompts, min=1, max=max_prompts, description="prompts", style=wide
        )
        self.max_prompts = max_prompts
        self.prompts_box = widgets.Textarea(
            value="\n".join(typed),
            placeholder="Your prompts, one per line (typing here selects 'your prompts')",
            description="your prompts",
            rows=3,
            style=wide,
            layout={"width": "410px"},
        )
        self.max_tokens = widgets.BoundedIntText(
            value=min(config.max_tokens, self.max_tokens_limit),
            min=1,
            max=self.max_tokens_limit,
            description=f"max tokens (1-{self.max_tokens_limit})",
            style={"description_width": "150px"},
            layout={"width": "260px"},
        )
        self.temperature = widgets.BoundedFloatText(
            value=config.temperature, min=0.0, max=5.0, step=0.05, description="temperature", style=wide
        )
        self.read_tokens = widgets.Checkbox(
            value=True,
            description="read tokens",
            indent=False,
            tooltip="colour every generated token by its reading at the steered layer (baselines are regenerated)",
        )
        guarded = guarded_button_class()
        self.generate_button = guarded(description="Generate", button_style="primary", icon="play")
        self.stop_button = widgets.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.grid_layers = widgets.Text(
            value=_default_grid_layers(config.layer, loaded.n_layers),
            description="grid layers",
            style=wide,
            layout={"width": "300px"},
        )
        self.grid_scales = widgets.Text(
            value=_default_grid_scales(float(config.scale)),
            description="grid scales",
            style=wide,
            layout={"width": "300px"},
        )
        self.grid_prompts = widgets.BoundedIntText(value=1, min=1, max=5, description="grid prompts", style=wide)
        self.grid_button = guarded(description="Grid", icon="th", button_style="info")
        self.progress = widgets.FloatProgress(value=0.0, min=0.0, max=1.0, layout={"width": "300px"})
        self.progress_label = widgets.HTML(value="")
        self.status = widgets.HTML(value="Press <b>Generate</b> to steer with these settings.")
        self.table = widgets.HTML(value="")
        self.tokens_view = widgets.HTML(value="")
        self.grid_view = widgets.HTML(value="")
        self.preview_view = widgets.HTML(value="")
        self.table_pager = Pager(lambda _page: self._draw(), page_size)
        self.save_button = widgets.Button(description="Save JSON", icon="save", disabled=True)
        self.save_name = widgets.Text(
            value="", placeholder="optional name", description="save as", style=wide, layout={"width": "260px"}
        )
        self.overwrite_toggle = widgets.Checkbox(value=False, description="overwrite", indent=False)
        self.csv_button = widgets.Button(description="Export CSV", icon="table", disabled=True)
        self.html_button = widgets.Button(description="Export HTML", icon="file", disabled=True)
        self.cli_button = widgets.Button(description="CLI command", icon="terminal")
        self.cli_text = widgets.Textarea(
            value="", placeholder="the command line for the current settings", rows=2, layout={"width": "95%"}
        )
        self.copy_html = widgets.HTML(value="")
        named = {
            "layer": self.layer_slider,
            "scale": self.scale_slider,
            "guidance": self.guidance,
            "target": self.target_dropdown,
            "baseline": self.baseline_dropdown,
            "prompt-source": self.prompt_source_dropdown,
            "prompts": self.n_prompts,
            "prompts-box": self.prompts_box,
            "max-tokens": self.max_tokens,
            "temperature": self.temperature,
            "read-tokens": self.read_tokens,
            "generate": self.generate_button,
            "stop": self.stop_button,
            "grid-layers": self.grid_layers,
            "grid-scales": self.grid_scales,
            "grid-prompts": self.grid_prompts,
            "grid-button": self.grid_button,
            "progress": self.progress,
            "progress-label": self.progress_label,
            "status": self.status,
            "table": self.table,
            "tokens": self.tokens_view,
            "grid": self.grid_view,
            "preview": self.preview_view,
            "save": self.save_button,
            "save-name": self.save_name,
            "overwrite": self.overwrite_toggle,
            "export-csv": self.csv_button,
            "export-html": self.html_button,
            "cli": self.cli_button,
            "cli-text": self.cli_text,
        }
        for name, control in named.items():
            control.add_class(f"chunky-{name}")
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
        self.tabs = widgets.Tab(
            children=[
                widgets.VBox([self.table_pager.view, self.table]),
                self.tokens_view,
                widgets.VBox([widgets.HBox([self.grid_layers, self.grid_scales, self.grid_prompts]), self.grid_view]),
            ],
            titles=("Side by side", "Tokens", "Grid"),
        )
        self.tabs.add_class("chunky-tabs")
        controls = widgets.HBox(
            [
                widgets.VBox([self.layer_slider, self.scale_slider, self.guidance, self.max_tokens, self.temperature]),
                widgets.VBox(
                    [
                        self.target_dropdown,
                        self.baseline_dropdown,
                        self.prompt_source_dropdown,
                        self.n_prompts,
                        self.prompts_box,
                    ]
                ),
                widgets.VBox([self.preview_view], layout={"width": "360px", "margin": "0 0 0 12px"}),
            ],
            layout={"flex_flow": "row wrap"},
        )
        self.guard_css = widgets.HTML(GUARD_CSS, layout={"display": "none"})
        self.view = widgets.VBox(
            [
                self.guard_css,
                controls,
                widgets.HBox(
                    [self.generate_button, self.stop_button, self.grid_button, self.read_tokens],
                    layout={"align_items": "center"},
                ),
                widgets.HBox([self.progress, self.progress_label], layout={"align_items": "center"}),
                self.status,
                self.tabs,
                widgets.HBox(
                    [self.save_button, self.save_name, self.overwrite_toggle, self.csv_button, self.html_button]
                ),
                widgets.HBox([self.cli_button, self.copy_html]),
                self.cli_text,
            ]
        )
        self.view.add_class("chunky-playground")
        self.update_guidance(preview=True)

    # ------------------------------------------------------------ state

    def current_config(self) -> RunConfig:
        """The run the controls describe now (the base config with the controls' values)."""
        source = self.prompt_source_dropdown.value
        config = self.base_config.with_changes(
            layer=int(self.layer_slider.value),
            scale=float(self.scale_slider.value),
            target_subset=self.target_dropdown.value,
            baseline_subset=self.baseline_dropdown.value,
            inference_dataset=None if source in (BUILTIN_PROMPTS, TYPED_PROMPTS) else source,
            inference_n_samples=int(self.n_prompts.value)
            if source not in (BUILTIN_PROMPTS, TYPED_PROMPTS)
            else self.base_config.inference_n_samples,
            max_tokens=int(self.max_tokens.value),
            temperature=float(self.temperature.value),
            progress=False,
        )
        if source == TYPED_PROMPTS:
            if not typed_prompts(self.prompts_box.value):
                raise UsageError("'your prompts' is chosen but the box is empty: type one prompt per line")
            config = with_typed_prompts(config, self.prompts_box.value)
        return config

    def prompts_for(self, config: RunConfig) -> PreparedPrompts:
        """Vector and inference prompts, drawn once per setting (the same draw as the CLI's)."""
        return self.runner.prompts(config)

    def vector_for(self, config: RunConfig, prompts: PreparedPrompts) -> tuple[SteeringVector, dict[str, bool]]:
        """The contrastive vector at the config's layer: from memory, else from the cache (extracting once)."""
        found = self.runner.vector(config, prompts)
        self._vectors[_vector_key(config)] = found[0]
        self._vector_source = self.runner.last_vector_source
        return found

    def known_vector(self, config: RunConfig) -> SteeringVector | None:
        """This pair's vector if it is in memory or in the activation cache (never extracts)."""
        key = _vector_key(config)
        if key not in self._vectors:
            try:
                prompts = self.runner.prompts(config)
            except UsageError:
                return None
            means = cached_means(
                self.loaded, prompts, config.cache_path, config.read_position, range(self.loaded.n_layers)
            )
            if means is None:
                return None
            self._vectors[key] = contrastive_vector(*means)
        return self._vectors[key]

    @property
    def last_vector_source(self) -> str | None:
        """Where the last run's vector came from: memory, cache or extracted."""
        return self._vector_source

    @property
    def last_config(self) -> RunConfig | None:
        """The settings the answers on screen were made with (not the controls' current values)."""
        return self.last_record.config if self.last_record is not None else None

    @property
    def busy(self) -> bool:
        return self._busy.locked()

    # ------------------------------------------------------------ generation

    def generate(self) -> dict[str, Any]:
        """Generate baseline and steered answers for the current controls (the CLI's run path), here and now;
        show the payload and, with 'read tokens', the per-token readings. The button runs this on a thread."""
        started = time.perf_counter()
        config = self.current_config().validated()
        read = bool(self.read_tokens.value)
        run_config = config.with_changes(reuse_baselines=False) if read else config
        self._stop.clear()
        prompts = self.runner.prompts(run_config)
        n_inference = len(prompts.inference.rows)
        cached = cached_means(self.loaded, prompts, config.cache_path, config.read_position, [config.layer])
        expected = {
            "extracting": 0 if cached is not None else len(prompts.target.rows) + len(prompts.baseline.rows),
            "generating": 2 * n_inference,
            "scoring": 2 * n_inference,
            "max_new_tokens": config.max_tokens,
        }
        watch = RunWatch(self.loaded, self._stop, self._on_progress, config.layer if read else None, None, expected)
        with watch.attached():
            watch.phase("extracting")
            vector_started = time.perf_counter()
            vector, _ = self.vector_for(run_config, prompts)
            vector_source, vector_s = self.last_vector_source, time.perf_counter() - vector_started
            unit = vector.at(config.layer) / max(vector.norm(config.layer), 1e-12)
            watch.unit = unit.detach().float().flatten()
            watch.phase("generating")
            (record,) = self.runner.run(run_config)
        self.runs += 1
        record = RunRecord(config, record.payload)
        rows = record.payload["results"]
        self.last_readings = match_readings(self.loaded.tokenizer, rows, watch.row_readings(eos_token_ids(self.loaded)))
        self._reading_layer, self._reading_unit = config.layer, vector.norm(config.layer)
        self.last_timings = dict(record.payload["metadata"]["timings"])
        self.show_record(record)
        timings = record.payload["metadata"]["timings"]
        reused = (record.payload["metadata"].get("baseline_cache") or {}).get("reused", 0)
        self.status.value = (
            f"Run {self.runs}: generated layer {config.layer}, scale {config.scale:g} on {n_inference} prompts | "
            f"vector from {vector_source} ({vector_s:.2f} s), generation "
            f"{timings['generate_s']:.2f} s{f', {reused} baselines from the cache' if reused else ''}"
            f"{', metrics ' + format(timings['metrics_s'], '.2f') + ' s' if 'metrics_s' in timings else ''} | "
            f"{time.perf_counter() - started:.1f} s in all"
        )
        self.update_guidance(preview=True)
        return record.payload

    def generate_grid(self) -> Any:
        """The first `grid prompts` prompts at every grid layer x scale, plus baselines, in one batch; shown
        in the Grid tab with collapse badges."""
        config = self.current_config().validated()
        layers = parse_numbers(self.grid_layers.value, int, "grid layers")
        for layer in layers:
            check_layer(self.loaded.model, layer)
        scales = parse_numbers(self.grid_scales.value, float, "grid scales")
        config = config.with_changes(capture="all")
        self._stop.clear()
        prompts = self.runner.prompts(config)
        texts = prompts.inference.prompts[: int(self.grid_prompts.value)]
        expected = {
            "extracting": len(prompts.target.rows) + len(prompts.baseline.rows),
            "generating": len(texts) * (1 + len(layers) * len(scales)),
            "max_new_tokens": config.max_tokens,
        }
        watch = RunWatch(self.loaded, self._stop, self._on_progress, expected=expected)
        with watch.attached():
            watch.phase("extracting")
            vector, _ = self.vector_for(config, prompts)
            watch.phase("generating")
            result = generate_grid(self.loaded, vector, texts, layers, scales, config.generation_settings())
        self.runs += 1
        self.last_grid = result
        self._shown["grid"] = grid_html(
            result, lambda layer, scale: relative_magnitude(vector, layer, scale), self.bands.band
        )
        self.grid_view.value = self._shown["grid"]
        self.tabs.selected_index = 2
        self.status.value = (
            f"Run {self.runs}: grid of {len(texts)} prompt(s) x layers {', '.join(map(str, result.layers))} x scales "
            f"{', '.join(f'{s:g}' for s in result.scales)} in {result.seconds:.1f} s"
        )
        return result

    def stop(self) -> None:
        """Ask the running generation to end at its next forward step."""
        if self.busy:
            self._stop.set()
            self.status.value = "Stopping at the next step..."

    def wait(self, timeout: float | None = 600.0) -> bool:
        """Wait for the background run (if any) to finish; False when it is still running after `timeout`."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def _start(self, name: str, work: Callable[[], Any], button: Any) -> bool:
        """Run `work` on a worker thread (or here, when `background` is off), unless a run is going on."""
        if not self._busy.acquire(blocking=False):
            return False
        self.last_error = None
        self.last_progress = None
        self._stop.clear()
        for control in (self.generate_button, self.grid_button):
            control.disabled = True
        self.stop_button.disabled = False
        self.progress.bar_style = ""
        self.progress.value = 0.0
        self.progress_label.value = f"{name}: starting..."
        self.status.value = f"{name.capitalize()}... (Stop ends it within one step)"
        note = f"{name} in progress: these are the previous answers"
        self.table.value = dimmed(self._shown["table"], note)
        self.tokens_view.value = dimmed(self._shown["tokens"], note)
        self.grid_view.value = dimmed(self._shown["grid"], note)

        def job() -> None:
            try:
                work()
            except StopRequested:
                at = self.last_progress
                where = f"while {at.stage} ({at.detail}) after {at.elapsed_s:.0f} s" if at else "before the first step"
                self.status.value = f"Stopped {html.escape(where)}. The answers below are the previous ones."
                self.progress_label.value = f"{name}: stopped"
                self.progress.bar_style = "warning"
                self._restore()
            except Exception as exc:  # shown in the widget: a callback has nowhere else to report
                self._show_error(exc)
                self.progress_label.value = f"{name}: failed"
                self.progress.bar_style = "danger"
                self._restore()
            else:
                self.progress.value = 1.0
                self.progress.bar_style = "success"
                self.progress_label.value = f"{name}: done"
            finally:
                self.stop_button.disabled = True
                for control in (self.generate_button, self.grid_button):
                    control.release()
                self._busy.release()
            try:
                self.update_guidance(preview=True)
            except Exception:  # the preview is a nicety: never let it hide the run's own outcome
                log.exception("next-token preview failed")

        if self.background:
            self._thread = threading.Thread(target=job, name=f"chunky-{name}", daemon=True)
            self._thread.start()
        else:
            job()
        return True

    def _restore(self) -> None:
        self.table.value = self._shown["table"]
        self.tokens_view.value = self._shown["tokens"]
        self.grid_view.value = self._shown["grid"]

    def _on_progress(self, progress: RunProgress) -> None:
        self.last_progress = progress
        fraction = progress.fraction
        self.progress.value = fraction if fraction is not None else 0.0
        self.progress_label.value = html.escape(progress.describe())

    # ------------------------------------------------------------ display

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

    # ------------------------------------------------------------ saving and exporting

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

    def export(self, kind: str) -> Path:
        """The table on screen as CSV (one row per prompt, texts, collapse reasons, metrics) or as a
        standalone HTML page, beside where Save JSON writes."""
        if self.last_payload is None:
            raise UsageError("nothing generated yet: press Generate first")
        path = self.save_path().with_suffix(f".{kind}")
        path.parent.mkdir(parents=True, exist_ok=True)
        from chunky_utils.cache import atomic_write_text

        if kind == "csv":
            atomic_write_text(path, export_frame(self.last_payload).to_csv(index=False))
        elif kind == "html":
            meta = self.last_payload["metadata"]
            body = side_by_side_html(self.last_payload["results"], meta)
            atomic_write_text(path, standalone_html(vector_caption(meta), body))
        else:
            raise UsageError(f"export kind must be csv or html, got {kind!r}")
        self.exported.append(path)
        self.status.value = f"Exported {html.escape(str(path))}"
        return path

    def show_cli_command(self) -> str:
        """The command line for the current settings, in the text box (and a button copying it)."""
        command = cli_command(self.current_config())
        self.cli_text.value = command
        self.copy_html.value = (
            f'<button class="chunky-copy" data-command="{html.escape(command)}" '
            "onclick=\"navigator.clipboard.writeText(this.dataset.command).then(() => this.innerText = 'copied')\">"
            "copy to clipboard</button>"
        )
        return command

    # ------------------------------------------------------------ callbacks

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

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.view._repr_mimebundle_(**kwargs)


def _vector_key(config: RunConfig) -> tuple[Any, ...]:
    return (
        config.target_subset,
        config.baseline_subset,
        config.n_samples,
        config.data_source,
        config.seed,
        config.read_position,
        str(config.cache_path),
    )


def _context_length(loaded: LoadedModel) -> int | None:
    value = getattr(loaded.model.config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def _default_grid_layers(layer: int, n_layers: int) -> str:
    step = max(1, n_layers // 6)
    return ", ".join(str(x) for x in sorted({max(0, layer - step), layer, min(n_layers - 1, layer + step)}))


def _default_grid_scales(scale: float) -> str:
    base = abs(scale) or 2.0
    return ", ".join(f"{value:g}" for value in (base / 2, base, 2 * base))


class ComparisonViewer:
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

    def _on_change(self, _change: dict[str, Any]) -> None:
        self.pager.page = 0
        self.render()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.view._repr_mimebundle_(**kwargs)


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


class MetricCellBrowser:
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

    def _on_change(self, _change: dict[str, Any]) -> None:
        self.pager.page = 0
        self.render()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.view._repr_mimebundle_(**kwargs)
