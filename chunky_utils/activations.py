"""Reading the residual stream on the last prompt token, every layer in one stopped forward pass."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from chunky_utils.batching import greedy_batches
from chunky_utils.cache import ActivationCache, CacheKey, SubsetMean
from chunky_utils.chat import chat_template_hash, format_prompts, left_pad, pad_token_id, tokenize_prompts
from chunky_utils.data import PromptSet
from chunky_utils.layers import output_hidden as output_hidden  # re-exported for callers of activations
from chunky_utils.layers import read_layers, run_until_stop
from chunky_utils.models import LoadedModel, find_decoder_layers
from chunky_utils.options import BATCH_ROWS

log = logging.getLogger(__name__)

PACKING: tuple[str, ...] = ("auto", "packed", "padded")
"""How extraction batches prompts: 'packed' lays them end to end with block-diagonal attention (no padded
position computed), 'padded' pads length-sorted batches; 'auto' packs on a CUDA GPU where the model allows.
"""

READ_POSITIONS: tuple[str, ...] = ("generation_prompt", "user_end")
"""Where the read happens: after the template's assistant header (the token the model answers from,
the default) or on the last token of the user turn without the generation prompt."""


@dataclass(frozen=True)
class ExtractionStats:
    """What one extraction cost."""

    n_prompts: int
    real_tokens: int
    padded_tokens: int
    seconds: float

    @property
    def padding_waste(self) -> float:
        return 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.real_tokens / self.seconds if self.seconds else float("inf")


def length_sorted_batches(
    lengths: Sequence[int], batch_size: int, max_batch_tokens: int | None = None, max_padding: float = 0.1
) -> list[list[int]]:
    """Index batches of similar length, longest first.

    A batch closes when it has `batch_size` rows, would exceed `max_batch_tokens` padded tokens, or
    its padding share would pass `max_padding`.
    """

    def closes(batch: list[int], index: int) -> bool:
        width = lengths[batch[0]]
        rows = len(batch) + 1
        too_many_tokens = max_batch_tokens is not None and rows * width > max_batch_tokens
        too_padded = 1 - (sum(lengths[i] for i in batch) + lengths[index]) / (rows * width) > max_padding
        return len(batch) >= batch_size or too_many_tokens or too_padded

    return greedy_batches(sorted(range(len(lengths)), key=lambda i: -lengths[i]), closes)


def extract_last_token_activations(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    layers: Sequence[int] | None = None,
    batch_size: int = BATCH_ROWS,
    read_position: str = "generation_prompt",
    max_batch_tokens: int | None = 16384,
    progress: bool = True,
    packing: str = "auto",
) -> tuple[torch.Tensor, ExtractionStats]:
    """Activations [n_prompts, n_layers_read, hidden] (float32, CPU, prompt order) on the read token.

    The forward pass stops after the deepest requested layer, so `lm_head` and later layers never run.
    `packing` (see PACKING) picks packed or padded batches.
    """
    return extract_prompt_sets(
        model, tokenizer, [prompts], layers, batch_size, read_position, max_batch_tokens, progress, packing
    )[0]


@torch.inference_mode()
def extract_prompt_sets(
    model: nn.Module,
    tokenizer: Any,
    prompt_sets: Sequence[Sequence[str]],
    layers: Sequence[int] | None = None,
    batch_size: int = BATCH_ROWS,
    read_position: str = "generation_prompt",
    max_batch_tokens: int | None = 16384,
    progress: bool = True,
    packing: str = "auto",
) -> list[tuple[torch.Tensor, ExtractionStats]]:
    """`extract_last_token_activations` for several prompt sets (say target and baseline) in one call.

    Packed, the sets run back to back with no wait for the GPU in between: the next set is formatted and
    tokenized while the GPU runs the previous one. Their stats then share the call's time in proportion to
    their tokens.
    """
    if read_position not in READ_POSITIONS:
        raise ValueError(f"read_position must be one of {READ_POSITIONS}, got {read_position!r}")
    if packing not in PACKING:
        raise ValueError(f"packing must be one of {PACKING}, got {packing!r}")
    decoder_layers = find_decoder_layers(model)
    wanted = sorted(set(range(len(decoder_layers)) if layers is None else layers))
    add_generation_prompt = read_position == "generation_prompt"
    device = model.get_input_embeddings().weight.device
    if not _use_packing(model, packing, device):
        return [
            _extract_padded(
                model,
                tokenizer,
                _token_ids(tokenizer, prompts, add_generation_prompt),
                wanted,
                batch_size,
                max_batch_tokens,
                progress,
            )
            for prompts in prompt_sets
        ]
    from chunky_utils.packed_extraction import extract_packed_sets

    token_id_sets: list[list[list[int]]] = []

    def tokenized() -> Iterator[list[list[int]]]:
        for prompts in prompt_sets:
            token_id_sets.append(_token_ids(tokenizer, prompts, add_generation_prompt))
            yield token_id_sets[-1]

    started = time.perf_counter()
    activations = extract_packed_sets(model, tokenized(), wanted, max_batch_tokens or 16384)
    seconds = time.perf_counter() - started
    tokens = [sum(len(ids) for ids in token_ids) for token_ids in token_id_sets]
    results = []
    for result, n_tokens in zip(activations, tokens, strict=True):
        stats = ExtractionStats(result.shape[0], n_tokens, n_tokens, seconds * n_tokens / max(sum(tokens), 1))
        _log_extraction(stats, len(wanted), "packed")
        results.append((result, stats))
    return results


def _token_ids(tokenizer: Any, prompts: Sequence[str], add_generation_prompt: bool) -> list[list[int]]:
    if not prompts:
        return []
    return tokenize_prompts(tokenizer, format_prompts(tokenizer, prompts, add_generation_prompt))


def _extract_padded(
    model: nn.Module,
    tokenizer: Any,
    token_ids: list[list[int]],
    wanted: list[int],
    batch_size: int,
    max_batch_tokens: int | None,
    progress: bool,
) -> tuple[torch.Tensor, ExtractionStats]:
    """One set in length-sorted, left-padded batches, the forward stopped after the deepest layer read."""
    lengths = [len(ids) for ids in token_ids]
    device = model.get_input_embeddings().weight.device
    result: torch.Tensor | None = None
    real_tokens = padded_tokens = 0
    started = time.perf_counter()
    last_token = lambda output: output_hidden(output)[:, -1, :].float()  # noqa: E731
    with read_layers(model, wanted, stop_after=True, keep=last_token) as captured:
        batches = length_sorted_batches(lengths, batch_size, max_batch_tokens)
        for batch in tqdm(batches, desc="extract", unit="batch", disable=not progress, leave=False):
            inputs = left_pad([token_ids[i] for i in batch], pad_token_id(tokenizer), device)
            real_tokens += sum(lengths[i] for i in batch)
            padded_tokens += inputs["input_ids"].numel()
            captured.clear()
            run_until_stop(lambda inputs=inputs: model(**inputs, use_cache=False))
            stacked = torch.stack([captured[layer] for layer in wanted], dim=1).cpu()
            if result is None:
                result = torch.empty(len(token_ids), len(wanted), stacked.shape[-1], dtype=torch.float32)
            result[torch.tensor(batch)] = stacked
    stats = ExtractionStats(len(token_ids), real_tokens, padded_tokens, time.perf_counter() - started)
    _log_extraction(stats, len(wanted), "padded")
    if result is None:  # no prompts
        result = torch.empty(0, len(wanted), model.get_input_embeddings().weight.shape[1])
    return result, stats


def _use_packing(model: nn.Module, packing: str, device: torch.device) -> bool:
    """Whether this extraction runs packed (said in the log when a wish for packing cannot be met)."""
    if packing == "padded" or (packing == "auto" and device.type != "cuda"):
        return False
    from chunky_utils.packed_extraction import packing_reason

    reason = packing_reason(model)
    if reason is not None:
        log.info("extraction uses padded batches: %s", reason)
    return reason is None


def _log_extraction(stats: ExtractionStats, n_layers: int, how: str) -> None:
    log.info(
        "extracted %d prompts x %d layers (%s): %d tokens in %.2f s (%.0f tok/s, padding waste %.1f%%)",
        stats.n_prompts,
        n_layers,
        how,
        stats.real_tokens,
        stats.seconds,
        stats.tokens_per_second,
        100 * stats.padding_waste,
    )


def cache_key_for(loaded: LoadedModel, read_position: str, data_source: str) -> CacheKey:
    return CacheKey(
        model_name=loaded.name,
        model_fingerprint=loaded.fingerprint,
        hidden_size=loaded.hidden_size,
        chat_template_hash=chat_template_hash(loaded.tokenizer),
        read_position=read_position,
        data_source=data_source,
    )


@dataclass(frozen=True)
class SubsetMeans:
    """Per-layer means of one prompt set, and whether they came from the cache."""

    prompt_set: PromptSet
    means: dict[int, SubsetMean]
    cache_hit: bool
    stats: ExtractionStats | None


def subset_means(
    loaded: LoadedModel,
    prompt_set: PromptSet,
    layers: Sequence[int],
    cache_root: Path | str,
    read_position: str = "generation_prompt",
    capture: str = "all",
    batch_size: int = BATCH_ROWS,
    progress: bool = True,
) -> SubsetMeans:
    """Means at `layers` from the cache, or from one extraction pass (then cached) under a file lock."""
    return prompt_sets_means(loaded, [prompt_set], layers, cache_root, read_position, capture, batch_size, progress)[0]


def prompt_sets_means(
    loaded: LoadedModel,
    prompt_sets: Sequence[PromptSet],
    layers: Sequence[int],
    cache_root: Path | str,
    read_position: str = "generation_prompt",
    capture: str = "all",
    batch_size: int = BATCH_ROWS,
    progress: bool = True,
) -> list[SubsetMeans]:
    """`subset_means` of several sets (say target and baseline): the cache misses are extracted together in
    one call (`extract_prompt_sets`), under the file locks of all of them, taken in a fixed order."""
    caches = [ActivationCache(cache_root, cache_key_for(loaded, read_position, s.data_source)) for s in prompt_sets]
    found: dict[int, SubsetMeans] = {}

    def look_up(index: int) -> bool:
        prompt_set = prompt_sets[index]
        means = caches[index].load_means(prompt_set.subset, len(prompt_set.rows), layers, prompt_set.content_hash)
        if means is not None:
            log.info(
                "cache hit for subset %s (n=%d, layers %s): no extraction",
                prompt_set.subset,
                len(prompt_set.rows),
                list(layers),
            )
            found[index] = SubsetMeans(prompt_set, means, True, None)
        return means is not None

    missing = [index for index in range(len(prompt_sets)) if not look_up(index)]
    if missing:
        locks = {caches[i].lock_path(prompt_sets[i].subset, len(prompt_sets[i].rows)): (i, caches[i]) for i in missing}
        with ExitStack() as stack:
            for _, (index, cache) in sorted(locks.items()):
                stack.enter_context(cache.lock(prompt_sets[index].subset, len(prompt_sets[index].rows)))
            missing = [index for index in missing if not look_up(index)]
            found.update(
                _extract_and_save(
                    loaded, prompt_sets, caches, missing, layers, capture, read_position, batch_size, progress
                )
            )
    return [found[index] for index in range(len(prompt_sets))]


def _extract_and_save(
    loaded: LoadedModel,
    prompt_sets: Sequence[PromptSet],
    caches: Sequence[ActivationCache],
    missing: list[int],
    layers: Sequence[int],
    capture: str,
    read_position: str,
    batch_size: int,
    progress: bool,
) -> dict[int, SubsetMeans]:
    """The missing sets extracted in one call (a set listed twice, once), each saved to its cache."""
    if not missing:
        return {}
    read = list(range(loaded.n_layers)) if capture == "all" else list(range(max(layers) + 1))
    same_entry: dict[tuple[Path, str, int, str], list[int]] = {}
    for index in missing:
        prompt_set = prompt_sets[index]
        key = (caches[index].folder, prompt_set.subset, len(prompt_set.rows), prompt_set.content_hash)
        same_entry.setdefault(key, []).append(index)
        log.info(
            "cache miss for subset %s (n=%d) in %s: extracting layers 0..%d",
            prompt_set.subset,
            len(prompt_set.rows),
            caches[index].folder,
            read[-1],
        )
    extracted = extract_prompt_sets(
        loaded.model,
        loaded.tokenizer,
        [prompt_sets[indices[0]].prompts for indices in same_entry.values()],
        read,
        batch_size=batch_size,
        read_position=read_position,
        progress=progress,
    )
    saved: dict[int, SubsetMeans] = {}
    for indices, (activations, stats) in zip(same_entry.values(), extracted, strict=True):
        prompt_set = prompt_sets[indices[0]]
        means = caches[indices[0]].save(
            prompt_set.subset, len(prompt_set.rows), read, activations, prompt_set.content_hash, prompt_set.ids
        )
        for index in indices:
            saved[index] = SubsetMeans(prompt_sets[index], {layer: means[layer] for layer in layers}, False, stats)
    return saved
