"""One run's metrics: every scale's scores, their means and deltas, and the summary written to the metadata."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from chunky_utils.concept import ConceptAxis, LinearProbe, concept_readers
from chunky_utils.config import RunConfig
from chunky_utils.data import PreparedPrompts
from chunky_utils.metrics import METRIC_NAMES, finite_or_none, score_generations
from chunky_utils.models import LoadedModel
from chunky_utils.steering import SteeringVector
from chunky_utils.text_metrics import OVERALL_FORMULA, RELEVANCE_TOKENS, overall_score

if TYPE_CHECKING:
    from chunky_utils.generation import GenerationOutput


@dataclass
class RunMetrics:
    """Scores of every scale of one run, and what they were read with."""

    per_scale: dict[float, list[dict[str, float | int | None]]]
    axis: ConceptAxis | None
    probe: LinearProbe | None
    seconds: float
    probe_seconds: float = 0.0

    def summary(self, scale: float) -> dict[str, Any]:
        """Means (and medians) of each metric for baseline and steered at `scale`, and their deltas."""
        baseline, steered = self.per_scale[0.0], self.per_scale[scale]
        summary: dict[str, Any] = {
            "baseline_mean": metric_means(baseline),
            "steered_mean": metric_means(steered),
        }
        summary["delta"] = {
            name: _delta(summary["steered_mean"][name], summary["baseline_mean"][name]) for name in METRIC_NAMES
        }
        summary["baseline_median"] = metric_means(baseline, statistics.median)
        summary["steered_median"] = metric_means(steered, statistics.median)
        summary["probe_auroc"] = self.probe.heldout_auroc if self.probe is not None else None
        summary["probe"] = self.probe.describe() if self.probe is not None else None
        summary["concept_axis"] = (
            {
                "layer": self.axis.layer,
                "baseline_projection": round(self.axis.baseline_projection, 6),
                "target_projection": round(self.axis.target_projection, 6),
                "read": "steering-layer output averaged over the text tokens, prompt in context",
            }
            if self.axis is not None
            else None
        )
        summary["scorer"] = "unsteered model"
        summary["relevance_tokens"] = RELEVANCE_TOKENS
        summary["overall_formula"] = OVERALL_FORMULA
        summary["seconds"] = round(self.seconds, 3)
        summary["probe_seconds"] = round(self.probe_seconds, 3)
        summary["scales_scored_together"] = len(self.per_scale)
        return summary

    def attach(self, rows: list[dict[str, Any]], metadata: dict[str, Any], scale: float) -> None:
        """Add `row["metrics"] = {"baseline", "steered"}` to each row and `metadata["metrics"]` (the summary)."""
        baseline, steered = self.per_scale[0.0], self.per_scale[scale]
        for row in rows:
            index = row["prompt_idx"]
            row["metrics"] = {"baseline": dict(baseline[index]), "steered": dict(steered[index])}
        metadata["metrics"] = self.summary(scale)


def metric_means(
    scores: Sequence[Mapping[str, float | int | None]], reduce: Any = statistics.fmean
) -> dict[str, float | None]:
    """Per-metric reduction (mean by default) over rows, skipping undefined values."""
    out: dict[str, float | None] = {}
    for name in METRIC_NAMES:
        values = [float(s[name]) for s in scores if s.get(name) is not None]
        out[name] = round(float(reduce(values)), 6) if values else None
    return out


def _delta(steered: float | None, baseline: float | None) -> float | None:
    return None if steered is None or baseline is None else round(steered - baseline, 6)


def score_run(
    config: RunConfig,
    loaded: LoadedModel,
    prompts: PreparedPrompts,
    vector: SteeringVector,
    generated: GenerationOutput,
) -> RunMetrics:
    """Every scale's texts of one generation scored in one batched pass (no baseline cache: see pipeline.Runner)."""
    started = time.perf_counter()
    axis, probe, probe_seconds = concept_readers(config, loaded, prompts, vector)
    per_scale = score_generations(
        loaded, prompts.inference.prompts, generated, axis, probe, config.batch_size, config.progress
    )
    return RunMetrics(per_scale, axis, probe, time.perf_counter() - started, probe_seconds)


@torch.no_grad()
def complete_metrics(
    vector_free: Mapping[str, Any],
    layer_mean: torch.Tensor | None,
    axis: ConceptAxis | None,
    probe: LinearProbe | None,
) -> dict[str, float | int | None]:
    """A text's full metrics from its vector-free metrics and its mean activation at the steering layer."""
    usable = layer_mean is not None and bool(torch.isfinite(layer_mean).all())
    concept = finite_or_none(axis.score(layer_mean)) if axis is not None and usable else None
    metrics = dict.fromkeys(METRIC_NAMES, None) | dict(vector_free)
    metrics["concept_score"] = concept
    metrics["concept_probe"] = finite_or_none(probe.predict_proba(layer_mean)) if probe is not None and usable else None
    metrics["overall"] = round(
        overall_score(concept, metrics["perplexity"], metrics["distinct_2"], metrics["relevance"]), 6
    )
    return metrics
