"""Preparing a run: its prompts, its model, its steering vector, its result path and its metadata."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from chunky_utils.activations import prompt_sets_means
from chunky_utils.config import RunConfig
from chunky_utils.data import PreparedPrompts, default_prompt_set, load_prompt_set
from chunky_utils.models import LoadedModel, load_model
from chunky_utils.results import results_path
from chunky_utils.sampling import SAMPLER_NAME
from chunky_utils.steering import SteeringVector, contrastive_vector


def result_path_for(config: RunConfig, decoding_in_name: bool = False) -> Path:
    """The seed's path (what the CLI and sweeps write); with `decoding_in_name`, decoding settings that differ
    from the defaults are added to the file name, so saves at another temperature or length do not collide."""
    return results_path(
        config.output_dir,
        config.target_subset,
        config.baseline_subset,
        config.layer,
        config.scale,
        config.inference_dataset,
        config.inference_n_samples,
        config.decoding_suffix if decoding_in_name else "",
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
    config: RunConfig, loaded: LoadedModel, prompts: PreparedPrompts, layers: Sequence[int] | None = None
) -> tuple[SteeringVector, dict[str, bool]]:
    """The contrastive vector at `layers` (default `config.layer`), through the cache; also which side hit it.
    The layer was validated where the run was prepared (`Runner.run`)."""
    target, baseline = prompt_sets_means(  # cache misses of both sides extracted in one call
        loaded,
        [prompts.target, prompts.baseline],
        list(layers) if layers is not None else [config.layer],
        config.cache_path,
        read_position=config.read_position,
        capture=config.capture,
        batch_size=config.batch_size,
        progress=config.progress,
    )
    sides = {"target": target, "baseline": baseline}
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
        "n_samples": len(prompts.target.rows),
        "n_samples_requested": config.n_samples,
        "vector_prompts": {
            "target": len(prompts.target.rows),
            "baseline": len(prompts.baseline.rows),
            "order": prompts.target.sampling.get("method"),
        },
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
        "min_tokens": config.min_tokens,
        "top_k": config.top_k,
        "top_p": config.top_p,
        "sampler": SAMPLER_NAME if config.temperature > 0 else "greedy",
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
