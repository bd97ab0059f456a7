"""The steering playground: sliders and dropdowns over one loaded model, generating through the CLI's run path.

The class is assembled from one mixin per concern: `playground_controls` (the widgets and their layout),
`playground_callbacks` (what the controls do), `playground_runs` (Generate, Grid, Stop, the worker thread),
`playground_display` (tables, scale guidance, next-token preview) and `playground_save` (Save JSON, exports,
the CLI command). This module holds the state: the settings the controls describe and the vectors known.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chunky_utils.config import RunConfig
from chunky_utils.errors import UsageError
from chunky_utils.instrument.readings import TokenReading
from chunky_utils.instrument.vectors import cached_means
from chunky_utils.instrument.watch import RunProgress
from chunky_utils.models import LoadedModel, check_layer
from chunky_utils.notebook.own_prompts import typed_prompts, with_typed_prompts
from chunky_utils.notebook.scale_guidance import DEFAULT_BANDS, ScaleBands, scale_bands
from chunky_utils.pipeline import PreparedPrompts, Runner, RunRecord
from chunky_utils.steering import SteeringVector, contrastive_vector
from chunky_utils.widgets.common import PAGE_SIZE
from chunky_utils.widgets.playground_callbacks import PlaygroundCallbacks
from chunky_utils.widgets.playground_controls import BUILTIN_PROMPTS, TYPED_PROMPTS, PlaygroundControls
from chunky_utils.widgets.playground_display import PlaygroundDisplay
from chunky_utils.widgets.playground_runs import PlaygroundRuns
from chunky_utils.widgets.playground_save import PlaygroundSaving


class SteeringPlayground(PlaygroundControls, PlaygroundCallbacks, PlaygroundRuns, PlaygroundDisplay, PlaygroundSaving):
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

        self._build_controls(config, scale_limit, scale_step, max_prompts, prompts, page_size)
        self._name_controls()
        self._wire_controls()
        self._lay_out()
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
