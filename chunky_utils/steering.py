"""Steering vectors as values, and the additive hook that applies one delta per batch row."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chunky_utils.activations import SubsetMeans
from chunky_utils.layers import RowDeltaHook, active_hook_count, add_deltas
from chunky_utils.models import LoadedModel
from chunky_utils.options import BATCH_ROWS, STEER_POSITIONS

__all__ = [  # the layer hooks are steering's too
    "STEER_POSITIONS",
    "RowDeltaHook",
    "SteeringVector",
    "active_hook_count",
    "add_to_layers",
    "contrastive_vector",
    "extract",
]

add_to_layers = add_deltas
"""The steering name of `layers.add_deltas`."""


@dataclass
class SteeringVector:
    """A direction per layer plus where it came from; supports `a - b`, `v * 2`, `-v`."""

    directions: dict[int, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    def _combine(self, other: SteeringVector, sign: float) -> SteeringVector:
        if set(self.directions) != set(other.directions):
            raise ValueError(f"layers differ: {sorted(self.directions)} vs {sorted(other.directions)}")
        return SteeringVector({k: v + sign * other.directions[k] for k, v in self.directions.items()}, {})

    def __add__(self, other: SteeringVector) -> SteeringVector:
        return self._combine(other, 1.0)

    def __sub__(self, other: SteeringVector) -> SteeringVector:
        return self._combine(other, -1.0)

    def __mul__(self, factor: float) -> SteeringVector:
        return SteeringVector({k: v * float(factor) for k, v in self.directions.items()}, dict(self.metadata))

    __rmul__ = __mul__

    def __truediv__(self, divisor: float) -> SteeringVector:
        return self * (1.0 / float(divisor))

    def __neg__(self) -> SteeringVector:
        return self * -1.0

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)

    def norm(self, layer: int | None = None) -> float:
        return float(self.directions[self._one_layer(layer)].norm())

    def _one_layer(self, layer: int | None) -> int:
        if layer is None:
            if len(self.directions) != 1:
                raise ValueError(f"vector has layers {self.layers}: name one")
            return next(iter(self.directions))
        if layer not in self.directions:
            raise KeyError(f"vector has no layer {layer} (has {self.layers})")
        return layer

    def at(self, layer: int) -> torch.Tensor:
        return self.directions[self._one_layer(layer)]

    def apply(self, model: nn.Module, scale: float = 1.0, positions: str = "all") -> Any:
        """Context manager steering every batch row by `scale` x this vector."""
        return add_to_layers(model, {k: v * float(scale) for k, v in self.directions.items()}, positions)

    def save(self, path: Path | str) -> None:
        from safetensors.torch import save_file

        from chunky_utils.cache import atomic_write

        tensors = {f"layer_{k}": v.contiguous().float() for k, v in self.directions.items()}
        metadata = {"metadata": json.dumps(self.metadata, default=str)}
        atomic_write(Path(path), lambda temp: save_file(tensors, str(temp), metadata=metadata))

    @classmethod
    def load(cls, path: Path | str) -> SteeringVector:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            directions = {int(name.removeprefix("layer_")): handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
            metadata = json.loads((handle.metadata() or {}).get("metadata", "{}"))
        return cls(directions, metadata)


def extract(
    loaded: LoadedModel,
    target_prompts: Sequence[str],
    baseline_prompts: Sequence[str],
    layers: Sequence[int] | None = None,
    read_position: str = "generation_prompt",
    batch_size: int = BATCH_ROWS,
    progress: bool = True,
) -> SteeringVector:
    """Prompts in, vector out, no cache: `mean(target) - mean(baseline)` of the read token at each layer
    (default: every layer). The cached path (`activations.subset_means`) gives the same numbers."""
    from chunky_utils.activations import extract_prompt_sets

    if not target_prompts or not baseline_prompts:
        raise ValueError("extract needs at least one target and one baseline prompt")
    extracted = extract_prompt_sets(
        loaded.model,
        loaded.tokenizer,
        [list(target_prompts), list(baseline_prompts)],
        layers,
        batch_size,
        read_position,
        progress=progress,
    )
    means = [activations.mean(dim=0) for activations, _ in extracted]
    wanted = sorted(set(range(loaded.n_layers) if layers is None else layers))
    directions = {layer: means[0][i] - means[1][i] for i, layer in enumerate(wanted)}
    metadata = {
        "n_target": len(target_prompts),
        "n_baseline": len(baseline_prompts),
        "read_position": read_position,
        "model_fingerprint": loaded.fingerprint,
        "target_norms": {layer: float(means[0][i].norm()) for i, layer in enumerate(wanted)},
        "baseline_norms": {layer: float(means[1][i].norm()) for i, layer in enumerate(wanted)},
    }
    return SteeringVector(directions, metadata)


def contrastive_vector(target: SubsetMeans, baseline: SubsetMeans) -> SteeringVector:
    """`target_mean - baseline_mean` at every layer both hold, with provenance."""
    layers = sorted(set(target.means) & set(baseline.means))
    directions = {layer: target.means[layer].mean_vector - baseline.means[layer].mean_vector for layer in layers}
    metadata = {
        "target_subset": target.prompt_set.subset,
        "baseline_subset": baseline.prompt_set.subset,
        "n_samples": len(target.prompt_set.rows),
        "target_norms": {layer: target.means[layer].norm for layer in layers},
        "baseline_norms": {layer: baseline.means[layer].norm for layer in layers},
    }
    return SteeringVector(directions, metadata)
