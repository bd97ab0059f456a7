"""Scores for every generation, read back by the unsteered model: concept, fluency, relevance and overall.

Per text (see METRIC_NAMES): `concept_score` (steering-layer activations over the text, projected on the unit
contrastive direction; 0 = baseline mean, 1 = target mean), `concept_probe` (P(target) from a logistic probe fit
on the cached per-prompt activations), `perplexity` (of the text after the chat-formatted prompt), `distinct_2`
(distinct token bigrams), `relevance` (log-likelihood per token with the prompt minus without it) and `overall`.

One padded forward over `chat(prompt) + text` gives the perplexity and the concept activations together; a second
batch of `chat("") + text` gives the likelihood without the prompt. Each prompt is encoded once and its key/value
cache shared by the texts of every scale, and identical (prompt, text) pairs are read once.
"""

from __future__ import annotations

import inspect
import logging
import math
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from chunky_utils.activations import cache_key_for, output_hidden
from chunky_utils.cache import ActivationCache
from chunky_utils.collapse import DISTINCT_2_FLOOR, distinct_n
from chunky_utils.models import (
    LoadedModel,
    check_layer,
    find_decoder_layers,
    format_prompts,
    left_pad,
    pad_token_id,
    tokenize_prompts,
)
from chunky_utils.steering import active_hook_count

if TYPE_CHECKING:
    from chunky_utils.config import RunConfig
    from chunky_utils.data import PromptSet
    from chunky_utils.generation import GenerationOutput
    from chunky_utils.pipeline import PreparedPrompts
    from chunky_utils.steering import SteeringVector

log = logging.getLogger(__name__)

METRIC_NAMES: tuple[str, ...] = (
    "concept_score",
    "concept_probe",
    "perplexity",
    "distinct_2",
    "relevance",
    "overall",
    "n_tokens",
)
"""Keys of every `row["metrics"]["baseline"|"steered"]` dict."""

PPL_CEILING = 200.0
"""Perplexity at which the fluency part of `overall` reaches 0 (it is 1 at perplexity 1)."""
RELEVANCE_FULL = 1.0
"""Relevance (nats per token) at which the relevance part of `overall` saturates at 1."""
RELEVANCE_TOKENS = 16
"""Relevance reads the first this many tokens of a text (where its dependence on the prompt shows; later tokens
lean on the text itself): the 'without prompt' pass then costs at most this many tokens per text."""
OVERALL_FORMULA = (
    f"harmonic mean of c=clip(concept_score,0,1), f=min(clip(1-ln(ppl)/ln({PPL_CEILING:g}),0,1), "
    f"clip((distinct_2-{DISTINCT_2_FLOOR:g})/{1 - DISTINCT_2_FLOOR:g},0,1)), r=clip(relevance/{RELEVANCE_FULL:g},0,1); "
    "0 when any part is 0 or undefined"
)


# ---------------------------------------------------------------- per-text pure metrics


def fluency_part(perplexity: float | None, distinct_2: float | None) -> float:
    """The fluency part of `overall` in [0, 1]: the worse of the perplexity part and the repetition part."""
    if perplexity is None or distinct_2 is None or not math.isfinite(perplexity) or perplexity <= 0:
        return 0.0
    ppl_part = 1.0 - math.log(max(perplexity, 1.0)) / math.log(PPL_CEILING)
    repetition_part = (distinct_2 - DISTINCT_2_FLOOR) / (1.0 - DISTINCT_2_FLOOR)
    return _clip01(min(ppl_part, repetition_part))


def overall_score(
    concept_score: float | None,
    perplexity: float | None,
    distinct_2: float | None,
    relevance: float | None,
) -> float:
    """One number per text in [0, 1], in the spirit of AxBench's harmonic mean; 0 when any part collapses.

    overall = 3 / (1/c + 1/f + 1/r) with
      c = clip(concept_score, 0, 1)                       (moved toward the target),
      f = min(clip(1 - ln(perplexity) / ln(PPL_CEILING), 0, 1),
              clip((distinct_2 - DISTINCT_2_FLOOR) / (1 - DISTINCT_2_FLOOR), 0, 1))   (still fluent, not looping),
      r = clip(relevance / RELEVANCE_FULL, 0, 1)          (still answers its prompt);
    overall = 0 when any of c, f, r is 0 or undefined (None, e.g. an empty answer). The concept axis is
    calibrated on prompt reads, so an unsteered answer need not read 0: compare steered with baseline.
    """
    if concept_score is None or relevance is None or not math.isfinite(concept_score) or not math.isfinite(relevance):
        return 0.0
    parts = (_clip01(concept_score), fluency_part(perplexity, distinct_2), _clip01(relevance / RELEVANCE_FULL))
    if min(parts) <= 0.0:
        return 0.0
    return len(parts) / sum(1.0 / part for part in parts)


def _clip01(value: float) -> float:
    return min(1.0, max(0.0, value))


# ---------------------------------------------------------------- concept axis and probe


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


# ---------------------------------------------------------------- batched scoring by the unsteered model


@dataclass(frozen=True)
class _ScoredRow:
    """One text read after one context: a chat-formatted prompt, or the empty-prompt context (relevance)."""

    context: int
    text: int
    slot: int
    with_prompt: bool
    n_read: int


def _text_token_ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _context_free_ids(tokenizer: Any) -> list[int]:
    """The chat template around an empty user turn: the 'without prompt' context of relevance."""
    ids = tokenize_prompts(tokenizer, format_prompts(tokenizer, [""], add_generation_prompt=True))[0]
    if ids:
        return ids
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return [int(value)]
    return [pad_token_id(tokenizer)]


def _row_chunks(rows: Sequence[_ScoredRow], batch_size: int, max_tokens: int) -> list[list[int]]:
    """Consecutive row indices (rows sharing a context stay together) capped in rows and in padded text tokens."""
    chunks: list[list[int]] = []
    current: list[int] = []
    width = 0
    for index, row in enumerate(rows):
        new_width = max(width, row.n_read)
        if current and (len(current) >= batch_size or (len(current) + 1) * new_width > max_tokens):
            chunks.append(current)
            current, new_width = [], row.n_read
        current.append(index)
        width = new_width
    if current:
        chunks.append(current)
    return chunks


def _cache_argument(model: nn.Module) -> str:
    """The forward keyword for a key/value cache: `cache` in recent transformers, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for logits [..., vocab] and targets [...], in float32."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _read_chunk(
    model: nn.Module,
    contexts: Sequence[list[int]],
    texts: Sequence[list[int]],
    rows: Sequence[_ScoredRow],
    pad_id: int,
    device: torch.device,
    captured: dict[int, torch.Tensor],
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Log-prob of each read text token [rows, width] (0 past a row's end), and each row's mean activation over
    its text [rows, hidden] at every hooked layer.

    Each distinct context runs once; its key/value cache is then repeated for every text read after it.
    """
    context_order = list(dict.fromkeys(row.context for row in rows))
    context_inputs = left_pad([contexts[c] for c in context_order], pad_id, device)
    context_out = model(**context_inputs, use_cache=True, logits_to_keep=1)
    index = torch.tensor([context_order.index(row.context) for row in rows], device=device)
    cache = context_out.get("cache")
    if cache is None:  # transformers < 5 names it past_key_values
        cache = context_out.get("past_key_values")
    cache.reorder_cache(index)
    first_logits = context_out.logits[:, -1, :][index]

    lengths = torch.tensor([row.n_read for row in rows], device=device)
    width = int(lengths.max())
    text_ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    for position, row in enumerate(rows):
        text_ids[position, : row.n_read] = torch.tensor(texts[row.text][: row.n_read], dtype=torch.long)
    text_mask = (torch.arange(width, device=device)[None, :] < lengths[:, None]).long()
    context_lengths = context_inputs["attention_mask"].sum(-1)[index]
    captured.clear()
    text_out = model(
        input_ids=text_ids,
        attention_mask=torch.cat([context_inputs["attention_mask"][index], text_mask], dim=1),
        position_ids=context_lengths[:, None] + torch.arange(width, device=device)[None, :],
        use_cache=True,
        **{_cache_argument(model): cache},
    )
    token_logprobs = torch.cat(
        [_log_probs(first_logits, text_ids[:, 0])[:, None], _log_probs(text_out.logits[:, :-1, :], text_ids[:, 1:])],
        dim=1,
    )
    mask = text_mask.float()
    token_logprobs = (token_logprobs * mask).cpu()
    means = {
        layer: ((hidden.float() * mask[:, :, None]).sum(1) / lengths[:, None]).cpu()
        for layer, hidden in captured.items()
    }
    return token_logprobs, means


@torch.inference_mode()
def score_texts(
    loaded: LoadedModel,
    prompts: Sequence[str],
    texts: Sequence[str],
    axis: ConceptAxis | None = None,
    probe: LinearProbe | None = None,
    batch_size: int = 32,
    max_batch_tokens: int = 2048,
    relevance_tokens: int | None = RELEVANCE_TOKENS,
    progress: bool = True,
) -> list[dict[str, float | int | None]]:
    """Metrics of each (prompt, text) pair under the unsteered model, in input order (see METRIC_NAMES).

    Refuses to run while a steering hook is on the model. `concept_score` needs `axis`, `concept_probe` needs
    `probe` (both read the steering layer's output, averaged over the text tokens); otherwise they are None.
    Perplexity and concept read the whole text; relevance its first `relevance_tokens` tokens (None: all).
    Identical pairs are read once; each prompt (and the empty-prompt context) is encoded once per batch.
    """
    scores, _ = score_texts_and_means(
        loaded, prompts, texts, axis, probe, (), batch_size, max_batch_tokens, relevance_tokens, progress
    )
    return scores


def score_texts_and_means(
    loaded: LoadedModel,
    prompts: Sequence[str],
    texts: Sequence[str],
    axis: ConceptAxis | None = None,
    probe: LinearProbe | None = None,
    keep_layers: Sequence[int] = (),
    batch_size: int = 32,
    max_batch_tokens: int = 2048,
    relevance_tokens: int | None = RELEVANCE_TOKENS,
    progress: bool = True,
) -> tuple[list[dict[str, float | int | None]], torch.Tensor | None]:
    """`score_texts`, plus each text's mean activation over its tokens at `keep_layers`
    ([texts, len(keep_layers), hidden], NaN for an empty text; None when no layer is kept).

    Refuses to run while a steering hook is on the model. `concept_score` needs `axis`, `concept_probe` needs
    `probe` (both read the steering layer's output, averaged over the text tokens); otherwise they are None.
    Perplexity and concept read the whole text; relevance its first `relevance_tokens` tokens (None: all).
    Identical pairs are read once; each prompt (and the empty-prompt context) is encoded once per batch.
    """
    if len(prompts) != len(texts):
        raise ValueError(f"{len(prompts)} prompts but {len(texts)} texts")
    if not prompts:
        return [], (torch.empty(0, len(keep_layers), loaded.hidden_size) if keep_layers else None)
    model, tokenizer = loaded.model, loaded.tokenizer
    if active_hook_count(model):
        raise RuntimeError("a steering hook is still on the model: metrics must be read by the unsteered model")
    layer = axis.layer if axis is not None else (probe.layer if probe is not None else None)
    if axis is not None and probe is not None and axis.layer != probe.layer:
        raise ValueError(f"axis reads layer {axis.layer} but the probe layer {probe.layer}")
    read_layers = sorted(set(keep_layers) | ({layer} if layer is not None else set()))
    for read_layer in read_layers:
        check_layer(model, read_layer)

    unique_prompts = list(dict.fromkeys(prompts))
    unique_texts = list(dict.fromkeys(texts))
    contexts = tokenize_prompts(tokenizer, format_prompts(tokenizer, unique_prompts, add_generation_prompt=True))
    contexts.append(_context_free_ids(tokenizer))
    free_context = len(contexts) - 1
    text_ids = _text_token_ids(tokenizer, unique_texts)
    prompt_slot = {p: i for i, p in enumerate(unique_prompts)}
    text_slot = {t: i for i, t in enumerate(unique_texts)}
    pairs = list(dict.fromkeys((prompt_slot[p], text_slot[t]) for p, t in zip(prompts, texts, strict=True)))
    pairs = [(p, t) for p, t in pairs if text_ids[t]]
    read_texts = list(dict.fromkeys(t for _, t in pairs))
    window = relevance_tokens if relevance_tokens is not None else max((len(ids) for ids in text_ids), default=1)
    if window < 1:
        raise ValueError(f"relevance_tokens must be at least 1, got {relevance_tokens}")
    rows = [_ScoredRow(p, t, i, True, len(text_ids[t])) for i, (p, t) in enumerate(pairs)]
    rows += [_ScoredRow(free_context, t, i, False, min(window, len(text_ids[t]))) for i, t in enumerate(read_texts)]
    rows.sort(key=lambda row: (-len(contexts[row.context]), row.context))

    with_prompt = torch.full((len(pairs),), float("nan"))
    with_prompt_window = torch.full((len(pairs),), float("nan"))
    without_prompt_window = torch.full((len(read_texts),), float("nan"))
    means = {read_layer: torch.zeros(len(pairs), loaded.hidden_size) for read_layer in read_layers}
    captured: dict[int, torch.Tensor] = {}

    def capture_at(read_layer: int) -> Any:
        def capture(_module: nn.Module, _args: Any, output: Any) -> None:
            captured[read_layer] = output_hidden(output)

        return capture

    decoder_layers = find_decoder_layers(model)
    handles = [decoder_layers[index].register_forward_hook(capture_at(index)) for index in read_layers]
    chunks = _row_chunks(rows, batch_size, max_batch_tokens)
    pad_id = pad_token_id(tokenizer)
    try:
        for chunk in tqdm(chunks, desc="metrics", unit="batch", disable=not progress, leave=False):
            members = [rows[i] for i in chunk]
            logprobs, hidden = _read_chunk(model, contexts, text_ids, members, pad_id, loaded.device, captured)
            for position, row in enumerate(members):
                n_window = min(window, row.n_read)
                window_mean = logprobs[position, :n_window].sum() / n_window
                if row.with_prompt:
                    with_prompt[row.slot] = logprobs[position].sum() / row.n_read
                    with_prompt_window[row.slot] = window_mean
                    for read_layer, layer_hidden in hidden.items():
                        means[read_layer][row.slot] = layer_hidden[position]
                else:
                    without_prompt_window[row.slot] = window_mean
    finally:
        for handle in handles:
            handle.remove()

    activations = means.get(layer) if layer is not None else None
    concept = axis.score(activations) if axis is not None and activations is not None else None
    probe_scores = probe.predict_proba(activations) if probe is not None and activations is not None else None
    read_slot = {t: i for i, t in enumerate(read_texts)}
    by_pair: dict[tuple[int, int], dict[str, float | int | None]] = {}
    for i, (prompt_index, text_index) in enumerate(pairs):
        concept_score = _finite(concept[i]) if concept is not None else None
        perplexity = _finite(torch.exp(-with_prompt[i]))
        distinct_2 = distinct_n(text_ids[text_index], 2)
        relevance = _finite(with_prompt_window[i] - without_prompt_window[read_slot[text_index]])
        by_pair[(prompt_index, text_index)] = {
            "concept_score": concept_score,
            "concept_probe": _finite(probe_scores[i]) if probe_scores is not None else None,
            "perplexity": perplexity,
            "distinct_2": round(distinct_2, 6),
            "relevance": relevance,
            "overall": round(overall_score(concept_score, perplexity, distinct_2, relevance), 6),
            "n_tokens": len(text_ids[text_index]),
        }
    log.info(
        "metrics: read %d (prompt, text) pairs and %d texts without prompt in %d batches",
        len(pairs),
        len(read_texts),
        len(chunks),
    )
    empty = dict.fromkeys(METRIC_NAMES, None) | {"distinct_2": 0.0, "overall": 0.0, "n_tokens": 0}
    order = [(prompt_slot[p], text_slot[t]) for p, t in zip(prompts, texts, strict=True)]
    scores = [dict(by_pair.get(pair, empty)) for pair in order]
    if not keep_layers:
        return scores, None
    pair_slot = {pair: i for i, pair in enumerate(pairs)}
    kept = torch.full((len(order), len(keep_layers), loaded.hidden_size), float("nan"))
    for i, pair in enumerate(order):
        if pair in pair_slot:
            kept[i] = torch.stack([means[read_layer][pair_slot[pair]] for read_layer in keep_layers])
    return scores, kept


def _finite(value: torch.Tensor | float) -> float | None:
    number = float(value)
    return round(number, 6) if math.isfinite(number) else None


def score_generations(
    loaded: LoadedModel,
    prompts: Sequence[str],
    generated: GenerationOutput,
    axis: ConceptAxis | None = None,
    probe: LinearProbe | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[float, list[dict[str, float | int | None]]]:
    """Metrics of every scale's texts ({scale: [per prompt]}), all scales scored in the same batches."""
    flat_prompts = [prompt for _ in generated.scales for prompt in prompts]
    flat_texts = [text or "" for texts in generated.texts for text in texts]
    flat = score_texts(loaded, flat_prompts, flat_texts, axis, probe, batch_size=batch_size, progress=progress)
    n = len(prompts)
    return {scale: flat[i * n : (i + 1) * n] for i, scale in enumerate(generated.scales)}


# ---------------------------------------------------------------- one run: cache -> axis + probe -> scores


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
    concept = _finite(axis.score(layer_mean)) if axis is not None and usable else None
    metrics = dict.fromkeys(METRIC_NAMES, None) | dict(vector_free)
    metrics["concept_score"] = concept
    metrics["concept_probe"] = _finite(probe.predict_proba(layer_mean)) if probe is not None and usable else None
    metrics["overall"] = round(
        overall_score(concept, metrics["perplexity"], metrics["distinct_2"], metrics["relevance"]), 6
    )
    return metrics


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
