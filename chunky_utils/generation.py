"""Generation where each batch row carries its own steering scale: baseline and steered share one call."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessorList

from chunky_utils.attention import grouped_query_decoding
from chunky_utils.batching import greedy_batches
from chunky_utils.chat import format_prompts, left_pad, pad_token_id, tokenize_prompts
from chunky_utils.errors import StopRequested, UsageError
from chunky_utils.layers import observers_suspended
from chunky_utils.models import LoadedModel
from chunky_utils.options import BATCH_ROWS
from chunky_utils.prefill import cache_argument_name, packed_prefill
from chunky_utils.sampling import SAMPLER_NAME, SamplingSettings, SharedStreamProcessor, prompt_key
from chunky_utils.steering import SteeringVector, add_to_layers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeControls:
    """What an observer of a run tells generation: a stop flag, a per-step callback (steps done, rows) for the
    GPU decode loop, which runs no module hooks, and why that loop must not be used (None: it may be)."""

    stop: threading.Event | None = None
    on_step: Callable[[int, int], None] | None = None
    no_fast_decode: str | None = None


_CONTROLS: ContextVar[DecodeControls | None] = ContextVar("chunky_decode_controls", default=None)


@contextmanager
def decode_controls(controls: DecodeControls) -> Iterator[None]:
    """Generation in this block (this thread or task) follows `controls`."""
    token = _CONTROLS.set(controls)
    try:
        yield
    finally:
        _CONTROLS.reset(token)


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode: temperature 0 means greedy; top_k 0 and top_p 1.0 keep every token."""

    max_new_tokens: int = 100
    temperature: float = 0.7
    seed: int = 0
    batch_size: int = BATCH_ROWS
    positions: str = "all"
    min_new_tokens: int = 0
    top_k: int = 0
    top_p: float = 1.0
    cache_implementation: str | None = None  # None = transformers' dynamic cache; "static" also compiles on GPU
    packed_prefill: bool = True  # prompt KV cache built by chunky_utils.prefill, not inside generate
    fast_decode: bool = True  # on one CUDA GPU, chunky_utils.fast_decode's captured decode loop when it applies
    prefill_batch_tokens: int = 16384  # padded tokens per prefill chunk

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UsageError(f"--max-tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise UsageError(f"--min-tokens must be between 0 and --max-tokens, got {self.min_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise UsageError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UsageError(f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.prefill_batch_tokens < 1:
            raise UsageError(f"prefill_batch_tokens must be at least 1, got {self.prefill_batch_tokens}")

    @property
    def sampling(self) -> SamplingSettings:
        return SamplingSettings(self.temperature, self.top_k, self.top_p, self.seed)

    def decoding_key(self) -> dict[str, Any]:
        """What an unsteered answer depends on besides the model and the prompt (the baseline cache's key)."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "temperature": self.temperature,
            "top_k": self.top_k if self.temperature > 0 else 0,
            "top_p": self.top_p if self.temperature > 0 else 1.0,
            "seed": self.seed if self.temperature > 0 else 0,
            "sampler": SAMPLER_NAME,
        }


@dataclass(frozen=True)
class GenerationOutput:
    """texts[scale_index][prompt_index], in the order given; None where a row was not asked for."""

    scales: tuple[float, ...]
    texts: list[list[str | None]]
    seconds: float
    new_tokens: int

    def for_scale(self, scale: float) -> list[str | None]:
        return self.texts[self.scales.index(scale)]


def row_batches(prompt_lengths: Sequence[int], rows_per_prompt: Sequence[int], batch_rows: int) -> list[list[int]]:
    """Prompt indices in batches of at most `batch_rows` rows (a prompt's rows stay together), longest first."""
    order = sorted((i for i in range(len(prompt_lengths)) if rows_per_prompt[i]), key=lambda i: (-prompt_lengths[i], i))

    def closes(batch: list[int], index: int) -> bool:
        return sum(rows_per_prompt[i] for i in batch) + rows_per_prompt[index] > batch_rows

    return greedy_batches(order, closes)


@torch.inference_mode()
def generate_with_scales(
    loaded: LoadedModel,
    prompts: Sequence[str],
    layer: int,
    vector: torch.Tensor | SteeringVector,
    scales: Sequence[float],
    settings: GenerationSettings,
    progress: bool = True,
    skip_baseline: Collection[int] = (),
) -> GenerationOutput:
    """Generate every prompt at every scale (0 = unsteered), the rows of a prompt in one batch.

    Sampling uses the shared random stream (chunky_utils.sampling): a row's draws depend only on
    (seed, prompt, step), so a prompt's baseline is the same whatever else shares its batch. Prompts in
    `skip_baseline` get no scale-0 row (their baseline is known, e.g. from the baseline cache).
    """
    direction = vector.at(layer) if isinstance(vector, SteeringVector) else vector
    scale_values = [float(s) for s in scales]
    wanted = [
        [s for s, scale in enumerate(scale_values) if not (scale == 0.0 and p in skip_baseline)]
        for p in range(len(prompts))
    ]
    row_prompts = [p for p in range(len(prompts)) for _ in wanted[p]]
    row_scales = [scale_values[s] for p in range(len(prompts)) for s in wanted[p]]
    direction = direction.detach().float().cpu()
    deltas = torch.stack([direction * scale for scale in row_scales]) if row_scales else direction[None, :0]
    generated = generate_rows(loaded, prompts, row_prompts, {layer: deltas}, settings, progress)
    texts: list[list[str | None]] = [[None] * len(prompts) for _ in scale_values]
    row = 0
    for p in range(len(prompts)):
        for s in wanted[p]:
            texts[s][p] = generated.texts[row]
            row += 1
    log.info(
        "generated %d rows (%d prompts x %d scales%s) in %.1f s",
        len(row_prompts),
        len(prompts),
        len(scale_values),
        f", {len(skip_baseline)} baselines known" if skip_baseline else "",
        generated.seconds,
    )
    return GenerationOutput(tuple(scale_values), texts, generated.seconds, generated.new_tokens)


@dataclass(frozen=True)
class RowsOutput:
    """One text per requested row, in the order given."""

    texts: list[str]
    seconds: float
    new_tokens: int


@torch.inference_mode()
def generate_rows(
    loaded: LoadedModel,
    prompts: Sequence[str],
    row_prompts: Sequence[int],
    layer_deltas: Mapping[int, torch.Tensor],
    settings: GenerationSettings,
    progress: bool = True,
) -> RowsOutput:
    """Generate one answer per row: row r continues `prompts[row_prompts[r]]` with `layer_deltas[layer][r]`
    added to that layer's output (a zero row is unsteered). Rows of a prompt share a batch and a random stream."""
    model, tokenizer = loaded.model, loaded.tokenizer
    started = time.perf_counter()
    texts = [""] * len(row_prompts)
    if not row_prompts:
        return RowsOutput(texts, 0.0, 0)
    token_ids = tokenize_prompts(tokenizer, format_prompts(tokenizer, prompts, add_generation_prompt=True))
    keys = [prompt_key(prompt) for prompt in prompts]
    rows_of: dict[int, list[int]] = {}
    for row, prompt in enumerate(row_prompts):
        rows_of.setdefault(prompt, []).append(row)
    rows_per_prompt = [len(rows_of.get(p, ())) for p in range(len(prompts))]
    batches = row_batches([len(ids) for ids in token_ids], rows_per_prompt, settings.batch_size)
    layer_deltas = {layer: deltas.detach().float().cpu() for layer, deltas in layer_deltas.items()}
    fast = _fast_rows(loaded, token_ids, row_prompts, [keys[p] for p in row_prompts], layer_deltas, settings, progress)
    if fast is not None:
        texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in fast]
        return RowsOutput(texts, time.perf_counter() - started, sum(len(ids) for ids in fast))
    new_tokens = 0
    pad_id = pad_token_id(tokenizer)
    with grouped_query_decoding(model):
        for batch in tqdm(batches, desc="generate", unit="batch", disable=not progress, leave=False):
            rows = [row for prompt in batch for row in rows_of[prompt]]
            batch_prompts = [row_prompts[row] for row in rows]
            inputs = left_pad([token_ids[p] for p in batch_prompts], pad_id, loaded.device)
            picked = torch.tensor(rows)
            deltas = {layer: all_rows[picked] for layer, all_rows in layer_deltas.items()}
            prompt_cache = _prompt_cache(loaded, token_ids, batch_prompts, deltas, settings)
            sampler = SharedStreamProcessor(
                settings.sampling, [keys[p] for p in batch_prompts], inputs["input_ids"].shape[1]
            )
            with add_to_layers(model, deltas, settings.positions):
                output = model.generate(
                    input_ids=inputs["input_ids"],
                    attention_mask=inputs["attention_mask"],
                    **prompt_cache,
                    max_new_tokens=settings.max_new_tokens,
                    min_new_tokens=settings.min_new_tokens or None,
                    cache_implementation=settings.cache_implementation,
                    pad_token_id=pad_id,
                    do_sample=False,  # the shared-stream processor turns greedy choice into sampling
                    logits_processor=LogitsProcessorList([sampler]),
                )
            generated = output[:, inputs["input_ids"].shape[1] :]
            new_tokens += int((generated != pad_id).sum())
            for position, row in enumerate(rows):
                texts[row] = tokenizer.decode(generated[position], skip_special_tokens=True).strip()
    return RowsOutput(texts, time.perf_counter() - started, new_tokens)


def _fast_rows(
    loaded: LoadedModel,
    token_ids: Sequence[Sequence[int]],
    row_prompts: Sequence[int],
    row_keys: Sequence[int],
    layer_deltas: Mapping[int, torch.Tensor],
    settings: GenerationSettings,
    progress: bool,
) -> list[list[int]] | None:
    """Every row's token ids from the captured GPU decode loop, or None (and why, in the log) to use `generate`."""
    from chunky_utils.fast_decode import fast_generate, fast_path_reason

    controls = _CONTROLS.get() or DecodeControls()
    reason = controls.no_fast_decode or fast_path_reason(loaded, settings)
    if reason is None:
        eos = loaded.model.generation_config.eos_token_id
        try:
            with observers_suspended(loaded.model):
                rows = fast_generate(
                    loaded,
                    token_ids,
                    row_prompts,
                    row_keys,
                    layer_deltas,
                    settings.positions,
                    settings.sampling,
                    settings.max_new_tokens,
                    settings.min_new_tokens,
                    eos if eos is not None else loaded.tokenizer.eos_token_id,
                    progress=progress,
                    stop_event=controls.stop,
                    on_step=controls.on_step,
                )
        except ValueError as exc:  # e.g. an answer longer than a sliding attention window
            reason = str(exc)
        else:
            if controls.stop is not None and controls.stop.is_set():
                raise StopRequested("stopped by the user")
            log.info("generation: fast decode path (captured one-token step on the GPU)")
            return rows
    log.info("generation: transformers generate (fast decode path not used: %s)", reason)
    return None


def _prompt_cache(
    loaded: LoadedModel,
    token_ids: Sequence[Sequence[int]],
    row_prompts: Sequence[int],
    deltas: Mapping[int, torch.Tensor],
    settings: GenerationSettings,
) -> dict[str, Any]:
    """`generate` keyword arguments carrying a packed prompt cache, or none (prefill inside `generate`)."""
    if not settings.packed_prefill or settings.cache_implementation is not None or len(deltas) != 1:
        return {}
    if len({parameter.device for parameter in loaded.model.parameters()}) > 1:
        # split over devices, packed prefill gave slightly different numbers than the same model on one GPU
        # (greedy texts 13 of 16 equal, benchmarks/README.md), so it stays with generate's own prefill
        return {}
    ((layer, layer_rows),) = deltas.items()
    prompt_deltas = None if settings.positions == "generated" else layer_rows
    cache = packed_prefill(loaded, token_ids, row_prompts, prompt_deltas, layer, settings.prefill_batch_tokens)
    if cache is None:
        log.debug("model cache is not plain full attention: prefilling inside generate")
        return {}
    return {cache_argument_name(loaded.model): cache}
