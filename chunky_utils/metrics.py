"""Batched scoring of every generation by the unsteered model: concept, fluency, relevance and overall.

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from chunky_utils.chat import format_prompts, left_pad, pad_token_id, tokenize_prompts
from chunky_utils.collapse import DISTINCT_2_FLOOR, distinct_n
from chunky_utils.concept import (
    ConceptAxis,
    LinearProbe,
    auroc,
    fit_probe,
    load_contrast_activations,
)
from chunky_utils.layers import active_hook_count, read_layers
from chunky_utils.models import LoadedModel
from chunky_utils.options import BATCH_ROWS
from chunky_utils.text_metrics import (
    OVERALL_FORMULA,
    PPL_CEILING,
    RELEVANCE_FULL,
    RELEVANCE_TOKENS,
    fluency_part,
    overall_score,
)

__all__ = [  # re-exported for callers of the one-module layout
    "DISTINCT_2_FLOOR",
    "OVERALL_FORMULA",
    "PPL_CEILING",
    "RELEVANCE_FULL",
    "RELEVANCE_TOKENS",
    "ConceptAxis",
    "LinearProbe",
    "auroc",
    "distinct_n",
    "fit_probe",
    "fluency_part",
    "load_contrast_activations",
    "overall_score",
]

if TYPE_CHECKING:
    from chunky_utils.generation import GenerationOutput

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
    batch_size: int = BATCH_ROWS,
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


@torch.no_grad()  # scoring reads the model: no autograd graph is kept
def score_texts_and_means(
    loaded: LoadedModel,
    prompts: Sequence[str],
    texts: Sequence[str],
    axis: ConceptAxis | None = None,
    probe: LinearProbe | None = None,
    keep_layers: Sequence[int] = (),
    batch_size: int = BATCH_ROWS,
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
    layers_read = sorted(set(keep_layers) | ({layer} if layer is not None else set()))

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
    means = {read_layer: torch.zeros(len(pairs), loaded.hidden_size) for read_layer in layers_read}
    chunks = _row_chunks(rows, batch_size, max_batch_tokens)
    pad_id = pad_token_id(tokenizer)
    with read_layers(model, layers_read) as captured:
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

    activations = means.get(layer) if layer is not None else None
    concept = axis.score(activations) if axis is not None and activations is not None else None
    probe_scores = probe.predict_proba(activations) if probe is not None and activations is not None else None
    read_slot = {t: i for i, t in enumerate(read_texts)}
    by_pair: dict[tuple[int, int], dict[str, float | int | None]] = {}
    for i, (prompt_index, text_index) in enumerate(pairs):
        concept_score = finite_or_none(concept[i]) if concept is not None else None
        perplexity = finite_or_none(torch.exp(-with_prompt[i]))
        distinct_2 = distinct_n(text_ids[text_index], 2)
        relevance = finite_or_none(with_prompt_window[i] - without_prompt_window[read_slot[text_index]])
        by_pair[(prompt_index, text_index)] = {
            "concept_score": concept_score,
            "concept_probe": finite_or_none(probe_scores[i]) if probe_scores is not None else None,
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


def finite_or_none(value: torch.Tensor | float) -> float | None:
    number = float(value)
    return round(number, 6) if math.isfinite(number) else None


def score_generations(
    loaded: LoadedModel,
    prompts: Sequence[str],
    generated: GenerationOutput,
    axis: ConceptAxis | None = None,
    probe: LinearProbe | None = None,
    batch_size: int = BATCH_ROWS,
    progress: bool = True,
) -> dict[float, list[dict[str, float | int | None]]]:
    """Metrics of every scale's texts ({scale: [per prompt]}), all scales scored in the same batches."""
    flat_prompts = [prompt for _ in generated.scales for prompt in prompts]
    flat_texts = [text or "" for texts in generated.texts for text in texts]
    flat = score_texts(loaded, flat_prompts, flat_texts, axis, probe, batch_size=batch_size, progress=progress)
    n = len(prompts)
    return {scale: flat[i * n : (i + 1) * n] for i, scale in enumerate(generated.scales)}


# ---------------------------------------------------------------- one run: cache -> axis + probe -> scores
