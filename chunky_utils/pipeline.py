"""One steering run end to end: prompts -> cached means -> vector -> batched generation -> results JSON."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from chunky_utils.activations import subset_means
from chunky_utils.config import RunConfig
from chunky_utils.data import PromptSet, default_prompt_set, load_prompt_set
from chunky_utils.errors import UsageError
from chunky_utils.generation import generate_with_scales
from chunky_utils.metrics import score_run
from chunky_utils.models import LoadedModel, check_layer, load_model, peek_n_layers
from chunky_utils.results import guard_existing, results_path, write_results
from chunky_utils.steering import SteeringVector, contrastive_vector

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedPrompts:
    target: PromptSet
    baseline: PromptSet
    inference: PromptSet


@dataclass
class RunOutcome:
    """What a run wrote and what it skipped because it was already finished."""

    written: dict[float, Path] = field(default_factory=dict)
    skipped: dict[float, Path] = field(default_factory=dict)
    payloads: dict[float, dict[str, Any]] = field(default_factory=dict)


def result_path_for(config: RunConfig) -> Path:
    return results_path(
        config.output_dir,
        config.target_subset,
        config.baseline_subset,
        config.layer,
        config.scale,
        config.inference_dataset,
        config.inference_n_samples,
    )


def prepare_prompts(config: RunConfig) -> PreparedPrompts:
    """Draw vector and inference prompts; inference excludes vector prompts unless asked otherwise."""
    target = load_prompt_set(config.target_subset, config.n_samples, config.data_source, config.seed)
    baseline = load_prompt_set(config.baseline_subset, config.n_samples, config.data_source, config.seed)
    if config.inference_dataset is None:
        inference = default_prompt_set()
    else:
        exclude = set() if config.include_vector_prompts else set(target.prompts) | set(baseline.prompts)
        inference = load_prompt_set(
            config.inference_dataset, config.inference_n_samples, config.data_source, config.seed + 1, exclude
        )
    return PreparedPrompts(target, baseline, inference)


def load_run_model(config: RunConfig) -> LoadedModel:
    return load_model(
        config.model,
        cache_dir=config.model_cache_path,
        device=config.device,
        dtype=config.dtype,
        tensor_parallel_size=config.tensor_parallel_size,
        trust_remote_code=config.trust_remote_code,
    )


def steering_vector_for(
    config: RunConfig, loaded: LoadedModel, prompts: PreparedPrompts
) -> tuple[SteeringVector, dict[str, bool]]:
    """The contrastive vector at `config.layer`, through the cache; also which side hit the cache."""
    check_layer(loaded.model, config.layer)
    sides = {}
    for side, prompt_set in (("target", prompts.target), ("baseline", prompts.baseline)):
        sides[side] = subset_means(
            loaded,
            prompt_set,
            [config.layer],
            config.cache_path,
            read_position=config.read_position,
            capture=config.capture,
            batch_size=config.batch_size,
            progress=config.progress,
        )
    vector = contrastive_vector(sides["target"], sides["baseline"])
    return vector, {side: means.cache_hit for side, means in sides.items()}


def build_metadata(
    config: RunConfig,
    loaded: LoadedModel,
    prompts: PreparedPrompts,
    vector: SteeringVector,
    cache_hits: dict[str, bool],
    timings: dict[str, float],
    n_scales: int,
) -> dict[str, Any]:
    """The seed's metadata keys first, then provenance the seed lacked."""
    norm = vector.norm(config.layer)
    return {
        "target_subset": prompts.target.subset,
        "target_subset_name": prompts.target.name,
        "baseline_subset": prompts.baseline.subset,
        "baseline_subset_name": prompts.baseline.name,
        "n_samples": config.n_samples,
        "layer": config.layer,
        "scale": float(config.scale),
        "contrastive_vector_norm": norm,
        "effective_magnitude": float(config.scale) * norm,
        "inference_dataset": prompts.inference.subset if config.inference_dataset is not None else None,
        "inference_n_samples": config.inference_n_samples if config.inference_dataset is not None else None,
        "target_norm": vector.metadata["target_norms"][config.layer],
        "baseline_norm": vector.metadata["baseline_norms"][config.layer],
        "model_name": loaded.name,
        "model_fingerprint": loaded.fingerprint,
        "n_layers": loaded.n_layers,
        "hidden_size": loaded.hidden_size,
        "seed": config.seed,
        "temperature": config.temperature,
        "max_tokens": config.max_tokens,
        "data_source": prompts.target.data_source,
        "data_sources": {
            "target": prompts.target.data_source,
            "baseline": prompts.baseline.data_source,
            "inference": prompts.inference.data_source,
        },
        "inference_prompt_source": prompts.inference.name,
        "n_inference_prompts": len(prompts.inference.rows),
        "inference_sampling": {
            **prompts.inference.sampling,
            "excludes_vector_prompts": not config.include_vector_prompts and config.inference_dataset is not None,
        },
        "read_position": config.read_position,
        "steer_positions": config.steer_positions,
        "cache_hits": cache_hits,
        "cache_dir": str(config.cache_path),
        "scales_generated_together": n_scales,
        "timings": timings,
        "settings_hash": config.settings_hash,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def run_experiment(
    config: RunConfig, loaded: LoadedModel | None = None, scales: Sequence[float] | None = None
) -> RunOutcome:
    """Run one config (or several scales of it in one batch), writing a seed-format JSON per scale."""
    started = time.perf_counter()
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
    n_layers = peek_n_layers(config.model, config.model_cache_path)
    if n_layers is not None and config.layer >= n_layers:
        raise UsageError(f"layer {config.layer} is out of range: this model has layers 0..{n_layers - 1}")
    prompts = prepare_prompts(config)
    timings: dict[str, float] = {}
    if loaded is None:
        load_started = time.perf_counter()
        loaded = load_run_model(config)
        timings["load_model_s"] = round(time.perf_counter() - load_started, 3)
    vector_started = time.perf_counter()
    vector, cache_hits = steering_vector_for(config, loaded, prompts)
    timings["vector_s"] = round(time.perf_counter() - vector_started, 3)
    scale_list = [0.0] + [item.scale for item in todo if item.scale != 0.0]
    generated = generate_with_scales(
        loaded,
        prompts.inference.prompts,
        config.layer,
        vector.at(config.layer),
        scale_list,
        config.generation_settings(),
        progress=config.progress,
    )
    timings["generate_s"] = round(generated.seconds, 3)
    run_metrics = score_run(config, loaded, prompts, vector, generated) if config.metrics else None
    if run_metrics is not None:
        timings["metrics_s"] = round(run_metrics.seconds, 3)
    timings["total_s"] = round(time.perf_counter() - started, 3)
    baseline_texts = generated.for_scale(0.0)
    for item in todo:
        steered_texts = generated.for_scale(item.scale)
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
        metadata = build_metadata(item, loaded, prompts, vector, cache_hits, timings, len(scale_list))
        if run_metrics is not None:
            run_metrics.attach(rows, metadata, item.scale)
        path = write_results(result_path_for(item), metadata, rows)
        outcome.written[item.scale] = path
        outcome.payloads[item.scale] = {"metadata": metadata, "results": rows}
    return outcome
