"""Generation where each batch row carries its own steering scale: baseline and steered share one call."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from chunky_utils.activations import length_sorted_batches
from chunky_utils.attention import grouped_query_decoding
from chunky_utils.errors import UsageError
from chunky_utils.models import LoadedModel, format_prompts, left_pad, pad_token_id, tokenize_prompts
from chunky_utils.prefill import cache_argument_name, packed_prefill
from chunky_utils.steering import add_to_layers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode: temperature 0 means greedy."""

    max_new_tokens: int = 100
    temperature: float = 0.7
    seed: int = 0
    batch_size: int = 64
    positions: str = "all"
    min_new_tokens: int = 0
    cache_implementation: str | None = None  # None = transformers' dynamic cache; "static" also compiles on GPU
    packed_prefill: bool = True  # prompt KV cache built by chunky_utils.prefill, not inside generate
    prefill_batch_tokens: int = 16384  # padded tokens per prefill chunk

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UsageError(f"--max-tokens must be at least 1, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise UsageError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.prefill_batch_tokens < 1:
            raise UsageError(f"prefill_batch_tokens must be at least 1, got {self.prefill_batch_tokens}")


@dataclass(frozen=True)
class GenerationOutput:
    """texts[scale_index][prompt_index], in the order given."""

    scales: tuple[float, ...]
    texts: list[list[str]]
    seconds: float
    new_tokens: int

    def for_scale(self, scale: float) -> list[str]:
        return self.texts[self.scales.index(scale)]


@torch.inference_mode()
def generate_with_scales(
    loaded: LoadedModel,
    prompts: Sequence[str],
    layer: int,
    vector: torch.Tensor,
    scales: Sequence[float],
    settings: GenerationSettings,
    progress: bool = True,
) -> GenerationOutput:
    """Generate every prompt at every scale (0 = unsteered) with rows of the same prompt in one batch."""
    model, tokenizer = loaded.model, loaded.tokenizer
    token_ids = tokenize_prompts(tokenizer, format_prompts(tokenizer, prompts, add_generation_prompt=True))
    scale_values = [float(s) for s in scales]
    prompts_per_batch = max(1, settings.batch_size // max(1, len(scale_values)))
    # one decode loop for many rows is cheaper than several loops; packed prefill keeps prompt padding low
    batches = length_sorted_batches([len(ids) for ids in token_ids], prompts_per_batch, max_padding=1.0)
    texts: list[list[str]] = [[""] * len(prompts) for _ in scale_values]
    vector = vector.detach().float().cpu()
    started = time.perf_counter()
    new_tokens = 0
    torch.manual_seed(settings.seed)
    pad_id = pad_token_id(tokenizer)
    decoding: dict[str, object] = (
        {"do_sample": True, "temperature": settings.temperature, "top_k": 0, "top_p": 1.0}
        if settings.temperature > 0
        else {"do_sample": False}
    )
    with grouped_query_decoding(model):
        for batch in tqdm(batches, desc="generate", unit="batch", disable=not progress, leave=False):
            rows = [(prompt_index, scale_index) for prompt_index in batch for scale_index in range(len(scale_values))]
            inputs = left_pad([token_ids[p] for p, _ in rows], pad_id, loaded.device)
            deltas = torch.stack([vector * scale_values[s] for _, s in rows])
            prompt_cache = _prompt_cache(loaded, token_ids, rows, deltas, layer, settings)
            with add_to_layers(model, {layer: deltas}, settings.positions):
                output = model.generate(
                    input_ids=inputs["input_ids"],
                    attention_mask=inputs["attention_mask"],
                    **prompt_cache,
                    max_new_tokens=settings.max_new_tokens,
                    min_new_tokens=settings.min_new_tokens or None,
                    cache_implementation=settings.cache_implementation,
                    pad_token_id=pad_id,
                    **decoding,
                )
            generated = output[:, inputs["input_ids"].shape[1] :]
            new_tokens += int((generated != pad_id).sum())
            for row, (prompt_index, scale_index) in enumerate(rows):
                texts[scale_index][prompt_index] = tokenizer.decode(generated[row], skip_special_tokens=True).strip()
    seconds = time.perf_counter() - started
    log.info("generated %d prompts x %d scales in %.1f s", len(prompts), len(scale_values), seconds)
    return GenerationOutput(tuple(scale_values), texts, seconds, new_tokens)


def _prompt_cache(
    loaded: LoadedModel,
    token_ids: Sequence[Sequence[int]],
    rows: Sequence[tuple[int, int]],
    deltas: torch.Tensor,
    layer: int,
    settings: GenerationSettings,
) -> dict[str, Any]:
    """`generate` keyword arguments carrying a packed prompt cache, or none (prefill inside `generate`)."""
    if not settings.packed_prefill or settings.cache_implementation is not None:
        return {}
    if len({parameter.device for parameter in loaded.model.parameters()}) > 1:
        # split over devices, packed prefill gave slightly different numbers than the same model on one GPU
        # (greedy texts 13 of 16 equal, benchmarks/README.md), so it stays with generate's own prefill
        return {}
    prompt_deltas = None if settings.positions == "generated" else deltas
    row_prompts = [prompt for prompt, _ in rows]
    cache = packed_prefill(loaded, token_ids, row_prompts, prompt_deltas, layer, settings.prefill_batch_tokens)
    if cache is None:
        log.debug("model cache is not plain full attention: prefilling inside generate")
        return {}
    return {cache_argument_name(loaded.model): cache}
