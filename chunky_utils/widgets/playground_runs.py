"""The playground's runs: Generate (the CLI's run path, with per-token readings) and Grid, on a worker thread
that Stop ends within one forward step, with a progress bar."""

from __future__ import annotations

import html
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from chunky_utils.instrument.grid import generate_grid
from chunky_utils.instrument.readings import eos_token_ids, match_readings
from chunky_utils.instrument.vectors import cached_means, relative_magnitude
from chunky_utils.instrument.watch import RunProgress, RunWatch, StopRequested
from chunky_utils.instrument_html import grid_html
from chunky_utils.models import check_layer
from chunky_utils.pipeline import RunRecord
from chunky_utils.widgets.common import dimmed, parse_numbers

log = logging.getLogger(__name__)


class PlaygroundRuns:
    """Generate, Grid, Stop and the worker thread. (A mixin of `SteeringPlayground`.)"""

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
