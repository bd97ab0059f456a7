"""The one run path: prompts -> cached means -> vector -> batched generation -> metrics -> results JSON.

`Runner` is what the CLI, the playground and the sweep's notebook all call: it prepares prompts, gets the
vector (through the activation cache), generates (baselines through the baseline cache), scores, marks
collapsed answers, and builds the seed-format payload; `Runner.save` writes a payload as it is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chunky_utils.baselines import VECTOR_FREE_METRICS, Baseline, BaselineCache
from chunky_utils.collapse import collapse_reason, collapse_summary
from chunky_utils.concept import concept_readers
from chunky_utils.config import RunConfig
from chunky_utils.data import PreparedPrompts
from chunky_utils.errors import UsageError
from chunky_utils.generation import GenerationOutput, generate_with_scales
from chunky_utils.metric_summary import RunMetrics, complete_metrics
from chunky_utils.metrics import score_texts, score_texts_and_means
from chunky_utils.models import LoadedModel, check_layer, peek_n_layers
from chunky_utils.preparation import (
    build_metadata,
    load_run_model,
    prepare_prompts,
    result_path_for,
    steering_vector_for,
)
from chunky_utils.results import guard_existing, write_results
from chunky_utils.steering import SteeringVector

log = logging.getLogger(__name__)

__all__ = [
    "ExistingResultError",
    "PreparedPrompts",
    "RunOutcome",
    "RunRecord",
    "Runner",
    "build_metadata",
    "load_run_model",
    "prepare_prompts",
    "result_path_for",
    "run_experiment",
    "steering_vector_for",
]


@dataclass
class RunRecord:
    """One scale of a run: its config and the seed-format payload (`metadata` and `results`)."""

    config: RunConfig
    payload: dict[str, Any]

    @property
    def path(self) -> Path:
        return result_path_for(self.config)


@dataclass
class RunOutcome:
    """What a run wrote and what it skipped because it was already finished."""

    written: dict[float, Path] = field(default_factory=dict)
    skipped: dict[float, Path] = field(default_factory=dict)
    payloads: dict[float, dict[str, Any]] = field(default_factory=dict)


def _concept_layer_means(baseline: Baseline, layer: int) -> Any:
    return None if baseline.layer_means is None else baseline.layer_means[layer]


class Runner:
    """One loaded model and everything already drawn or computed with it: the path every caller takes."""

    def __init__(self, loaded: LoadedModel | None = None) -> None:
        self.loaded = loaded
        self._prompts: dict[tuple[Any, ...], PreparedPrompts] = {}
        self._vectors: dict[tuple[Any, ...], tuple[SteeringVector, dict[str, bool]]] = {}
        self.last_vector_source: str | None = None

    def model(self, config: RunConfig) -> LoadedModel:
        """The loaded model, loading `config.model` on first use."""
        if self.loaded is None:
            n_layers = peek_n_layers(config.model, config.model_cache_path)
            if n_layers is not None and config.layer >= n_layers:
                raise UsageError(f"layer {config.layer} is out of range: this model has layers 0..{n_layers - 1}")
            self.loaded = load_run_model(config)
        return self.loaded

    def prompts(self, config: RunConfig) -> PreparedPrompts:
        """Vector and inference prompts, drawn once per setting."""
        key = (
            config.target_subset,
            config.baseline_subset,
            config.n_samples,
            config.inference_dataset,
            config.inference_n_samples,
            config.include_vector_prompts,
            config.data_source,
            config.seed,
        )
        if key not in self._prompts:
            self._prompts[key] = prepare_prompts(config)
        return self._prompts[key]

    def vector(self, config: RunConfig, prompts: PreparedPrompts) -> tuple[SteeringVector, dict[str, bool]]:
        """The contrastive vector: from memory, else through the activation cache. With `capture='all'` it holds
        every layer (one extraction pass reads them all), so another layer is a memory hit."""
        every_layer = config.capture == "all"
        key = (
            prompts.target.subset,
            prompts.target.content_hash,
            prompts.baseline.subset,
            prompts.baseline.content_hash,
            prompts.target.data_source,
            config.read_position,
            str(config.cache_path),
            None if every_layer else config.layer,
        )
        if key in self._vectors:
            self.last_vector_source = "memory"
            return self._vectors[key]
        loaded = self.model(config)
        found = steering_vector_for(config, loaded, prompts, range(loaded.n_layers) if every_layer else None)
        self.last_vector_source = "cache" if all(found[1].values()) else "extracted"
        self._vectors[key] = found
        return found

    def run(self, config: RunConfig, scales: Sequence[float] | None = None) -> list[RunRecord]:
        """Generate and score `config` at each scale (default: its own); nothing is written."""
        started = time.perf_counter()
        config.validated()
        scale_list = [float(s) for s in (scales if scales is not None else [config.scale])]
        timings: dict[str, float] = {}
        load_started = time.perf_counter()
        loaded = self.model(config)
        timings["load_model_s"] = round(time.perf_counter() - load_started, 3)
        check_layer(loaded.model, config.layer)
        prompts = self.prompts(config)
        vector_started = time.perf_counter()
        vector, cache_hits = self.vector(config, prompts)
        timings["vector_s"] = round(time.perf_counter() - vector_started, 3)
        settings = config.generation_settings()
        texts = prompts.inference.prompts
        baselines = BaselineCache(config.cache_path, loaded, settings)
        with baselines.lock(prompts.inference.subset) if config.reuse_baselines else nullcontext():
            known = self._known_baselines(config, baselines, texts)
            generated = generate_with_scales(
                loaded,
                texts,
                config.layer,
                vector,
                [0.0] + [s for s in scale_list if s != 0.0],
                settings,
                progress=config.progress,
                skip_baseline=set(known),
            )
            timings["generate_s"] = round(generated.seconds, 3)
            baseline_texts = [known[i].text if i in known else generated.for_scale(0.0)[i] for i in range(len(texts))]
            run_metrics = (
                self._score(config, loaded, prompts, vector, generated, baseline_texts, known, baselines)
                if config.metrics
                else None
            )
            if config.reuse_baselines and not config.metrics:
                for i in range(len(texts)):
                    if i not in known:
                        baselines.put(texts[i], Baseline(baseline_texts[i]))
        if run_metrics is not None:
            timings["metrics_s"] = round(run_metrics.seconds, 3)
        timings["total_s"] = round(time.perf_counter() - started, 3)
        baseline_cache = {"reused": len(known), "generated": len(texts) - len(known), "folder": str(baselines.folder)}
        records = []
        for scale in scale_list:
            item = config.with_changes(scale=scale)
            steered_texts = baseline_texts if scale == 0.0 else generated.for_scale(scale)
            rows = [
                {
                    "prompt_idx": i,
                    "prompt": row.prompt,
                    "prompt_id": row.id,
                    "baseline": baseline_texts[i],
                    "steered": steered_texts[i],
                }
                for i, row in enumerate(prompts.inference.rows)
            ]
            metadata = build_metadata(item, loaded, prompts, vector, cache_hits, timings, len(scale_list) + 1)
            metadata["baseline_cache"] = baseline_cache if config.reuse_baselines else None
            if run_metrics is not None:
                run_metrics.attach(rows, metadata, scale)
            self._mark_collapse(loaded, rows)
            metadata["collapsed"] = collapse_summary(rows)
            records.append(RunRecord(item, {"metadata": metadata, "results": rows}))
        return records

    def _known_baselines(self, config: RunConfig, cache: BaselineCache, prompts: Sequence[str]) -> dict[int, Baseline]:
        if not config.reuse_baselines:
            return {}
        known = {}
        for i, prompt in enumerate(prompts):
            entry = cache.get(prompt)
            if entry is not None and (not config.metrics or entry.layer_means is not None):
                known[i] = entry
        log.info(
            "baseline cache %s: %d of %d prompts' unsteered answers reused",
            "hit" if len(known) == len(prompts) else ("partial hit" if known else "miss"),
            len(known),
            len(prompts),
        )
        return known

    def _score(
        self,
        config: RunConfig,
        loaded: LoadedModel,
        prompts: PreparedPrompts,
        vector: SteeringVector,
        generated: GenerationOutput,
        baseline_texts: list[str],
        known: dict[int, Baseline],
        baselines: BaselineCache,
    ) -> RunMetrics:
        """Score steered answers and new baselines with the unsteered model; reused baselines need no model."""
        started = time.perf_counter()
        axis, probe, probe_seconds = concept_readers(config, loaded, prompts, vector)
        texts = prompts.inference.prompts
        fresh = [i for i in range(len(texts)) if i not in known]
        fresh_scores, fresh_means = score_texts_and_means(
            loaded,
            [texts[i] for i in fresh],
            [baseline_texts[i] for i in fresh],
            axis,
            probe,
            keep_layers=list(range(loaded.n_layers)) if config.reuse_baselines else (),
            batch_size=config.batch_size,
            progress=config.progress,
        )
        baseline_scores: list[dict[str, Any]] = [{}] * len(texts)
        for position, i in enumerate(fresh):
            baseline_scores[i] = fresh_scores[position]
            if config.reuse_baselines and fresh_means is not None:
                metrics = {name: fresh_scores[position][name] for name in VECTOR_FREE_METRICS}
                baselines.put(texts[i], Baseline(baseline_texts[i], metrics, fresh_means[position]))
        for i, entry in known.items():
            baseline_scores[i] = complete_metrics(
                entry.metrics or {}, _concept_layer_means(entry, config.layer), axis, probe
            )
        per_scale = {0.0: baseline_scores}
        steered_scales = [s for s in generated.scales if s != 0.0]
        flat = score_texts(
            loaded,
            [prompt for _ in steered_scales for prompt in texts],
            [text or "" for s in steered_scales for text in generated.for_scale(s)],
            axis,
            probe,
            batch_size=config.batch_size,
            progress=config.progress,
        )
        for n, scale in enumerate(steered_scales):
            per_scale[scale] = flat[n * len(texts) : (n + 1) * len(texts)]
        seconds = time.perf_counter() - started
        log.info(
            "scored %d steered and %d new baseline answers with the unsteered model in %.1f s (%d baselines reused)",
            len(flat),
            len(fresh),
            seconds,
            len(known),
        )
        return RunMetrics(per_scale, axis, probe, seconds, probe_seconds)

    @staticmethod
    def _mark_collapse(loaded: LoadedModel, rows: list[dict[str, Any]]) -> None:
        """`row["collapse"]` = each side's reason (None = fine) and `row["collapsed"]` = the steered verdict."""
        for row in rows:
            reasons = {}
            for side in ("baseline", "steered"):
                tokens = loaded.tokenizer(row[side] or "", add_special_tokens=False)["input_ids"]
                perplexity = row.get("metrics", {}).get(side, {}).get("perplexity")
                reasons[side] = collapse_reason(tokens, perplexity)
            row["collapsed"] = reasons["steered"] is not None
            row["collapse"] = reasons

    def save(self, record: RunRecord, overwrite: bool = False, path: Path | None = None) -> Path:
        """Write a record's payload as it is; refuse to replace another run's result unless `overwrite`."""
        target = path if path is not None else record.path
        status = guard_existing(target, record.config.settings_hash, overwrite=True)
        if status != "absent" and not overwrite:
            raise ExistingResultError(target, status)
        return write_results(target, record.payload["metadata"], record.payload["results"])


class ExistingResultError(UsageError):
    """A result already exists where a payload would be saved."""

    def __init__(self, path: Path, status: str) -> None:
        self.path, self.status = path, status
        what = "with these settings" if status == "same" else "made with other settings"
        super().__init__(f"{path} already holds a result {what}")


def run_experiment(
    config: RunConfig, loaded: LoadedModel | None = None, scales: Sequence[float] | None = None
) -> RunOutcome:
    """The CLI's and the sweep's run: skip finished scales, run the rest in one batch, write a JSON per scale."""
    config.validated()
    configs = [config.with_changes(scale=float(s)) for s in (scales if scales is not None else [config.scale])]
    outcome = RunOutcome()
    todo = []
    for item in configs:
        path = result_path_for(item)
        if guard_existing(path, item.settings_hash, item.overwrite) == "same" and not item.overwrite:
            log.info("already finished with these settings: %s (pass --overwrite to recompute)", path)
            outcome.skipped[item.scale] = path
        else:
            todo.append(item)
    if not todo:
        return outcome
    runner = Runner(loaded)
    for record in runner.run(config, scales=[item.scale for item in todo]):
        outcome.written[record.config.scale] = runner.save(record, overwrite=True)
        outcome.payloads[record.config.scale] = record.payload
    return outcome
