"""Steering vectors without extraction: from the activation cache alone, and their size relative to a
layer's mean residual norm."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from chunky_utils.activations import SubsetMeans, cache_key_for
from chunky_utils.cache import ActivationCache
from chunky_utils.models import LoadedModel
from chunky_utils.steering import SteeringVector, contrastive_vector


def cached_means(
    loaded: LoadedModel, prompts: Any, cache_root: Any, read_position: str, layers: Sequence[int]
) -> tuple[SubsetMeans, SubsetMeans] | None:
    """Target and baseline means at `layers` when the activation cache holds both, else None (no extraction)."""
    found = []
    for prompt_set in (prompts.target, prompts.baseline):
        cache = ActivationCache(cache_root, cache_key_for(loaded, read_position, prompt_set.data_source))
        means = cache.load_means(prompt_set.subset, len(prompt_set.rows), layers, prompt_set.content_hash)
        if means is None:
            return None
        found.append(SubsetMeans(prompt_set, means, True, None))
    return found[0], found[1]


def cached_vector(loaded: LoadedModel, prompts: Any, cache_root: Any, read_position: str) -> SteeringVector | None:
    """The contrastive vector at every layer from the cache alone, or None when any layer is missing."""
    means = cached_means(loaded, prompts, cache_root, read_position, range(loaded.n_layers))
    return None if means is None else contrastive_vector(*means)


def relative_magnitude(vector: SteeringVector, layer: int, scale: float) -> float:
    """|scale| x vector norm as a share of the layer's mean residual norm (mean of the two subset means' norms)."""
    meta = vector.metadata
    mean_norm = (float(meta["target_norms"][layer]) + float(meta["baseline_norms"][layer])) / 2
    return abs(float(scale)) * vector.norm(layer) / mean_norm if mean_norm > 0 else math.inf
