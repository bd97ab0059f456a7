"""The concept axis and the linear probe: how far a text's activations sit from baseline toward target.

Both are built from the activation cache (per-prompt last-token reads of the target and baseline sets at the
steering layer) and applied to a text's mean activation over its tokens.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from chunky_utils.activations import cache_key_for
from chunky_utils.cache import ActivationCache
from chunky_utils.config import RunConfig
from chunky_utils.data import PreparedPrompts, PromptSet
from chunky_utils.models import LoadedModel
from chunky_utils.steering import SteeringVector

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConceptAxis:
    """The unit contrastive direction at one layer, scaled so the baseline mean reads 0 and the target mean 1."""

    layer: int
    direction: torch.Tensor
    baseline_projection: float
    target_projection: float

    @classmethod
    def from_means(cls, layer: int, target_mean: torch.Tensor, baseline_mean: torch.Tensor) -> ConceptAxis:
        difference = target_mean.float().cpu() - baseline_mean.float().cpu()
        norm = float(difference.norm())
        if not math.isfinite(norm) or norm == 0.0:
            raise ValueError(f"target and baseline means coincide at layer {layer}: no concept direction")
        unit = difference / norm
        return cls(layer, unit, float(unit @ baseline_mean.float().cpu()), float(unit @ target_mean.float().cpu()))

    def score(self, activations: torch.Tensor) -> torch.Tensor:
        """Concept score of activations [..., hidden] -> [...]: 0 at the baseline mean, 1 at the target mean."""
        projection = activations.float().cpu() @ self.direction
        return (projection - self.baseline_projection) / (self.target_projection - self.baseline_projection)


@dataclass(frozen=True)
class LinearProbe:
    """A standardized logistic regression separating target (1) from baseline (0) activations at one layer."""

    layer: int
    weight: torch.Tensor
    bias: float
    center: torch.Tensor
    spread: torch.Tensor
    heldout_auroc: float | None
    folds: int
    n_target: int
    n_baseline: int

    def predict_proba(self, activations: torch.Tensor) -> torch.Tensor:
        """P(target) for activations [..., hidden] -> [...]."""
        standardized = (activations.float().cpu() - self.center) / self.spread
        return torch.sigmoid(standardized @ self.weight + self.bias)

    def describe(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "heldout_auroc": self.heldout_auroc,
            "folds": self.folds,
            "n_target": self.n_target,
            "n_baseline": self.n_baseline,
            "trained_on": "cached last-prompt-token activations",
        }


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count half); NaN when a class is missing."""
    positive = scores[labels == 1].float()
    negative = scores[labels == 0].float()
    if positive.numel() == 0 or negative.numel() == 0:
        return float("nan")
    greater = (positive[:, None] > negative[None, :]).float().mean()
    ties = (positive[:, None] == negative[None, :]).float().mean()
    return float(greater + 0.5 * ties)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run tiny CPU work on one thread: thread hand-offs cost more than the work (badly so on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fit_logistic(
    features: torch.Tensor, labels: torch.Tensor, l2: float
) -> tuple[torch.Tensor, float, torch.Tensor, torch.Tensor]:
    """(weight, bias, center, spread) of an L2-regularized logistic regression on standardized features."""
    with torch.inference_mode(False), torch.enable_grad(), _one_thread():
        x = features.float().cpu().clone()
        y = labels.float().cpu().clone()
        center = x.mean(dim=0)
        spread = x.std(dim=0).clamp_min(1e-6) if x.shape[0] > 1 else torch.ones_like(center)
        x = (x - center) / spread
        weight = torch.zeros(x.shape[1], requires_grad=True)
        bias = torch.zeros(1, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, y)
            loss = loss + l2 * (weight @ weight) / (2 * x.shape[0])
            loss.backward()
            return loss

        optimizer.step(closure)
        return weight.detach().clone(), float(bias.detach()), center, spread


def fit_probe(
    layer: int,
    target_activations: torch.Tensor,
    baseline_activations: torch.Tensor,
    folds: int = 5,
    l2: float = 1.0,
    seed: int = 0,
) -> LinearProbe:
    """Fit the probe on all rows; its held-out AUROC comes from stratified k-fold out-of-fold scores."""
    features = torch.cat([target_activations, baseline_activations]).float().cpu()
    labels = torch.cat([torch.ones(len(target_activations)), torch.zeros(len(baseline_activations))])
    n_folds = min(folds, len(target_activations), len(baseline_activations))
    heldout: float | None = None
    if n_folds >= 2:
        generator = torch.Generator().manual_seed(seed)
        fold_of = torch.empty(len(labels), dtype=torch.long)
        for label in (0, 1):
            members = torch.nonzero(labels == label).flatten()
            members = members[torch.randperm(len(members), generator=generator)]
            fold_of[members] = torch.arange(len(members)) % n_folds
        out_of_fold = torch.empty(len(labels))
        for fold in range(n_folds):
            train, test = fold_of != fold, fold_of == fold
            weight, bias, center, spread = _fit_logistic(features[train], labels[train], l2)
            out_of_fold[test] = ((features[test] - center) / spread) @ weight + bias
        heldout = round(auroc(out_of_fold, labels), 6)
    weight, bias, center, spread = _fit_logistic(features, labels, l2)
    return LinearProbe(
        layer, weight, bias, center, spread, heldout, n_folds, len(target_activations), len(baseline_activations)
    )


def load_contrast_activations(
    config: RunConfig, loaded: LoadedModel, target: PromptSet, baseline: PromptSet
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Cached per-prompt activations of target and baseline at `config.layer` ([n, hidden] each), if stored."""
    found = []
    for prompt_set in (target, baseline):
        cache = ActivationCache(config.cache_path, cache_key_for(loaded, config.read_position, prompt_set.data_source))
        stored = cache.load_activations(prompt_set.subset, len(prompt_set.rows), prompt_set.content_hash)
        if stored is None or config.layer not in stored[1]:
            return None
        activations, layers = stored
        found.append(activations[:, layers.index(config.layer), :].float())
    return found[0], found[1]


def concept_readers(
    config: RunConfig, loaded: LoadedModel, prompts: PreparedPrompts, vector: SteeringVector
) -> tuple[ConceptAxis | None, LinearProbe | None, float]:
    """The concept axis and probe at `config.layer`, from the activation cache; also the probe's fit seconds."""
    axis: ConceptAxis | None = None
    probe: LinearProbe | None = None
    probe_seconds = 0.0
    contrast = load_contrast_activations(config, loaded, prompts.target, prompts.baseline)
    if contrast is not None:
        target_activations, baseline_activations = contrast
        axis = _axis_or_none(config.layer, target_activations.mean(0), baseline_activations.mean(0))
        probe_started = time.perf_counter()
        probe = fit_probe(config.layer, target_activations, baseline_activations, seed=config.seed)
        probe_seconds = time.perf_counter() - probe_started
        log.info(
            "concept probe at layer %d: held-out AUROC %s (fit in %.2f s)",
            config.layer,
            probe.heldout_auroc,
            probe_seconds,
        )
    else:
        means = _cached_means(config, loaded, prompts)
        if means is not None:
            axis = _axis_or_none(config.layer, *means)
        log.warning("per-prompt activations not in the cache: no probe%s", "" if axis else ", no concept score")
    if axis is not None and not torch.allclose(
        axis.direction * vector.norm(config.layer), vector.at(config.layer).float().cpu(), atol=1e-4, rtol=1e-3
    ):
        log.warning("cached activations do not match the steering vector at layer %d", config.layer)
    return axis, probe, probe_seconds


def _axis_or_none(layer: int, target_mean: torch.Tensor, baseline_mean: torch.Tensor) -> ConceptAxis | None:
    try:
        return ConceptAxis.from_means(layer, target_mean, baseline_mean)
    except ValueError as exc:
        log.warning("no concept score: %s", exc)
        return None


def _cached_means(
    config: RunConfig, loaded: LoadedModel, prompts: PreparedPrompts
) -> tuple[torch.Tensor, torch.Tensor] | None:
    found = []
    for prompt_set in (prompts.target, prompts.baseline):
        cache = ActivationCache(config.cache_path, cache_key_for(loaded, config.read_position, prompt_set.data_source))
        mean = cache.load_mean(prompt_set.subset, len(prompt_set.rows), config.layer, prompt_set.content_hash)
        if mean is None:
            return None
        found.append(mean.mean_vector)
    return found[0], found[1]
