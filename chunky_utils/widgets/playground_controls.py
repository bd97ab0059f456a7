"""The playground's controls: every slider, dropdown, box, button and output area, their class names for
the browser, and their layout; plus the prompt-source values and the grid's starting layers and scales."""

from __future__ import annotations

from collections.abc import Sequence

from chunky_utils.config import RunConfig
from chunky_utils.models import LoadedModel
from chunky_utils.notebook.own_prompts import typed_prompts
from chunky_utils.widgets.common import GUARD_CSS, Pager, guarded_button_class, subset_options

BUILTIN_PROMPTS = "builtin"
"""Prompt-source value meaning the five built-in inference prompts (`inference_dataset=None`)."""
TYPED_PROMPTS = "typed"
"""Prompt-source value meaning the prompts typed in the playground's text box."""
N_BUILTIN_PROMPTS = 5
MAX_TOKENS_LIMIT = 4096


class PlaygroundControls:
    """Builds, names and lays out the playground's widgets. (A mixin of `SteeringPlayground`.)"""

    def _build_controls(
        self,
        config: RunConfig,
        scale_limit: float,
        scale_step: float,
        max_prompts: int,
        prompts: Sequence[str] | str | None,
        page_size: int,
    ) -> None:
        """Every control and output area, as attributes, starting from `config`'s values."""
        import ipywidgets as widgets

        loaded = self.loaded
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

    def _name_controls(self) -> None:
        """A `chunky-<name>` class on each control, so the browser check and CSS can find it."""
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

    def _lay_out(self) -> None:
        """The tabs and the whole view: controls, buttons, progress, status, tabs, save and CLI rows."""
        import ipywidgets as widgets

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


def _context_length(loaded: LoadedModel) -> int | None:
    value = getattr(loaded.model.config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def _default_grid_layers(layer: int, n_layers: int) -> str:
    step = max(1, n_layers // 6)
    return ", ".join(str(x) for x in sorted({max(0, layer - step), layer, min(n_layers - 1, layer + step)}))


def _default_grid_scales(scale: float) -> str:
    base = abs(scale) or 2.0
    return ", ".join(f"{value:g}" for value in (base / 2, base, 2 * base))
