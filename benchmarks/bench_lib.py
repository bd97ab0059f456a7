"""Shared pieces of the benchmarks: side-by-side timing, prompt sets, the ratio table."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chunky_utils.activations import extract_last_token_activations, length_sorted_batches
from chunky_utils.chat import format_prompts, left_pad, pad_token_id, tokenize_prompts
from chunky_utils.generation import GenerationSettings, generate_with_scales
from chunky_utils.models import LoadedModel


def write_result(out: Path | None, name: str, result: dict[str, Any]) -> None:
    """`result` as indented JSON to `out/name` (nothing without `out`)."""
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_it(fn: Callable[[], object]) -> float:
    synchronize()
    started = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - started


def side_by_side(candidates: dict[str, Callable[[], object]], repeats: int = 3) -> dict[str, float]:
    """Median seconds of each candidate, run interleaved (a, b, a, b, ...) so drift hits all alike."""
    for fn in candidates.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            samples[name].append(time_it(fn))
    return {name: statistics.median(values) for name, values in samples.items()}


@dataclass
class Row:
    """One line of the ratio table."""

    name: str
    value: float
    target: str
    passed: bool
    detail: str = ""


def print_table(title: str, rows: Sequence[Row]) -> str:
    lines = [f"## {title}", "", "| measure | value | target | ok | detail |", "| --- | ---: | --- | --- | --- |"]
    for row in rows:
        lines.append(
            f"| {row.name} | {row.value:.3f} | {row.target} | {'yes' if row.passed else 'NO'} | {row.detail} |"
        )
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def exact_length_settings(new_tokens: int, rows: int, **options: Any) -> GenerationSettings:
    """Greedy settings where every row decodes exactly `new_tokens`, all `rows` in one batch."""
    return GenerationSettings(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=0.0, batch_size=rows, **options
    )


@torch.inference_mode()
def plain_body_forward(
    loaded: LoadedModel, prompts: Sequence[str], batch_size: int, max_layer: int | None = None
) -> None:
    """The reference: the model body (no lm_head) on the same length-sorted batches, no hooks."""
    tokenizer = loaded.tokenizer
    token_ids = tokenize_prompts(tokenizer, format_prompts(tokenizer, prompts))
    body = loaded.model.get_decoder() if hasattr(loaded.model, "get_decoder") else loaded.model.base_model
    layers = body.layers
    kept = layers if max_layer is None else layers[: max_layer + 1]
    body.layers = kept
    original = body.config.num_hidden_layers
    body.config.num_hidden_layers = len(kept)
    try:
        for batch in length_sorted_batches([len(t) for t in token_ids], batch_size, 16384):
            inputs = left_pad([token_ids[i] for i in batch], pad_token_id(tokenizer), loaded.device)
            body(**inputs, use_cache=False)
    finally:
        body.layers = layers
        body.config.num_hidden_layers = original


def extraction_vs_plain(
    loaded: LoadedModel, prompts: Sequence[str], batch_size: int, layers: list[int] | None, repeats: int = 3
) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds for extraction and for the plain body forward up to the same layer; and the extraction stats."""
    max_layer = None if layers is None else max(layers)
    stats_box: dict[str, float] = {}

    def extraction() -> None:
        _, stats = extract_last_token_activations(
            loaded.model, loaded.tokenizer, prompts, layers, batch_size=batch_size, progress=False
        )
        stats_box.update(tokens=stats.real_tokens, padded=stats.padded_tokens, waste=stats.padding_waste)

    times = side_by_side(
        {"extract": extraction, "plain": lambda: plain_body_forward(loaded, prompts, batch_size, max_layer)}, repeats
    )
    return times, stats_box


def generation_ratios(
    loaded: LoadedModel,
    prompts: Sequence[str],
    layer: int,
    max_new_tokens: int,
    prompts_per_batch: int,
    repeats: int = 2,
) -> dict[str, float]:
    """Seconds for: plain generate (no hook), baseline through the hook, baseline+steered, baseline+5 scales,
    and the first three again with the prompt prefilled inside `generate` (no packed prefill).

    Every row decodes exactly `max_new_tokens` (min_new_tokens), so the runs do the same number of steps.
    """
    vector = torch.randn(loaded.hidden_size) * 4.0

    def steered(scales: list[float], packed: bool = True) -> Callable[[], object]:
        settings = exact_length_settings(max_new_tokens, prompts_per_batch * len(scales), packed_prefill=packed)
        return lambda: generate_with_scales(loaded, prompts, layer, vector, scales, settings, progress=False)

    @torch.inference_mode()
    def plain_generate() -> None:
        tokenizer = loaded.tokenizer
        token_ids = tokenize_prompts(tokenizer, format_prompts(tokenizer, prompts))
        for batch in length_sorted_batches([len(t) for t in token_ids], prompts_per_batch, max_padding=1.0):
            inputs = left_pad([token_ids[i] for i in batch], pad_token_id(tokenizer), loaded.device)
            loaded.model.generate(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                do_sample=False,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                pad_token_id=pad_token_id(tokenizer),
            )

    return side_by_side(
        {
            "no_hook": plain_generate,
            "baseline": steered([0.0]),
            "baseline+steered": steered([0.0, 2.0]),
            "baseline+5_scales": steered([0.0, 0.5, 1.0, 2.0, 4.0, 8.0]),
            "baseline_plain_prefill": steered([0.0], packed=False),
            "baseline+steered_plain_prefill": steered([0.0, 2.0], packed=False),
            "baseline+5_scales_plain_prefill": steered([0.0, 0.5, 1.0, 2.0, 4.0, 8.0], packed=False),
        },
        repeats,
    )


def first_differences(found: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]) -> list[int | None]:
    """Per row, the first step at which the token ids differ from the reference row (None: identical rows)."""
    return [
        None
        if list(a) == list(b)
        else next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        for a, b in zip(found, reference, strict=True)
    ]
