"""Packed prompt prefill: the KV cache `generate` would build for a left-padded batch, built with less work.

Three savings over letting `generate` prefill the batch itself:
- prompts run in length-sorted chunks with at most 10% padding instead of all padded to the longest;
- a prompt shared by several rows (baseline and steered, or several scales) runs once up to the steered
  layer, since every layer up to it sees the same input; only the layers after it run once per row;
- when prompt positions are not steered, a prompt runs once for all its rows.

The result is right-aligned into one left-padded cache, so `generate` only feeds each row's last prompt
token and decodes as usual. Models whose cache is not plain full-attention layers get None (the caller
then prefills inside `generate`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from chunky_utils.activations import length_sorted_batches
from chunky_utils.chat import left_pad, pad_token_id
from chunky_utils.layers import (
    add_deltas,
    output_hidden,
    read_layers,
    run_until_stop,
    same_structure,
    skipped_layers,
)
from chunky_utils.models import LoadedModel, find_decoder_layers

KeysValues = list[tuple[torch.Tensor, torch.Tensor]]


def cache_argument_name(model: nn.Module) -> str:
    """The keyword a model's forward takes its KV cache under (`cache` in newer transformers)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _empty_cache(config: Any) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:  # older transformers take no config
        return DynamicCache()


def _plain_layers(cache: Any, layers: range) -> KeysValues | None:
    """(keys, values) of the given layers when each is a filled plain full-attention layer, else None."""
    cached = getattr(cache, "layers", None)
    if cached is None or len(cached) < layers.stop:
        return None
    picked = [cached[index] for index in layers]
    if any(type(layer).__name__ != "DynamicLayer" or getattr(layer, "keys", None) is None for layer in picked):
        return None
    if any(layer.keys.dim() != 4 for layer in picked):
        return None
    return [(layer.keys, layer.values) for layer in picked]


def _run_body(loaded: LoadedModel, inputs: dict[str, torch.Tensor], hooks: Any = None) -> Any:
    """One body forward (no lm_head) filling a fresh cache; returns the cache."""
    model = loaded.model
    body = getattr(model, model.base_model_prefix, model)
    cache = _empty_cache(model.config)
    with hooks if hooks is not None else nullcontext():
        run_until_stop(lambda: body(**inputs, use_cache=True, **{cache_argument_name(body): cache}))
    return cache


@torch.inference_mode()
def packed_prefill(
    loaded: LoadedModel,
    prompt_token_ids: Sequence[Sequence[int]],
    row_prompts: Sequence[int],
    row_deltas: torch.Tensor | None,
    layer: int,
    max_batch_tokens: int = 16384,
) -> Any | None:
    """A KV cache of every row's prompt but its last token, as `generate` would fill it for the padded batch.

    Row r continues prompt `row_prompts[r]`; `row_deltas` ([rows, hidden]) is added to `layer`'s output at
    prompt positions, None leaves prompt positions unsteered.
    """
    model = loaded.model
    decoder_layers = find_decoder_layers(model)
    n_layers = len(decoder_layers)
    rows_of: dict[int, list[int]] = {}
    for row, prompt in enumerate(row_prompts):
        rows_of.setdefault(prompt, []).append(row)
    prompts = list(rows_of)
    prefixes = [list(prompt_token_ids[p][:-1]) for p in prompts]
    if min(len(prefix) for prefix in prefixes) < 1:
        return None
    width = max(len(prefix) for prefix in prefixes)
    share_trunk = row_deltas is not None and len(row_prompts) > len(prompts)
    rows_per_prompt = max(len(rows) for rows in rows_of.values()) if share_trunk else 1
    merged: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers
    pad_id = pad_token_id(loaded.tokenizer)
    lengths = [len(prefix) for prefix in prefixes]
    for chunk in length_sorted_batches(lengths, len(prompts), max(1, max_batch_tokens // rows_per_prompt)):
        inputs = left_pad([prefixes[i] for i in chunk], pad_id, loaded.device)
        chunk_rows = [row for i in chunk for row in rows_of[prompts[i]]]
        row_source = [position for position, i in enumerate(chunk) for _ in rows_of[prompts[i]]]
        if row_deltas is None:  # prompt positions unsteered: one pass per prompt serves all its rows
            pieces = [(range(n_layers), _run_body(loaded, inputs), row_source)]
        elif not share_trunk:  # one row per prompt: steer the prompt's own pass
            deltas = row_deltas[torch.tensor(chunk_rows)]
            pieces = [(range(n_layers), _run_body(loaded, inputs, add_deltas(model, {layer: deltas})), row_source)]
        else:
            deltas = row_deltas[torch.tensor(chunk_rows)]
            pieces = _trunk_and_tail(loaded, decoder_layers, inputs, row_source, deltas, layer)
        for layers, cache, source in pieces:
            kv = _plain_layers(cache, layers)
            if kv is None:
                return None
            _place(merged, kv, layers, chunk_rows, source, len(row_prompts), width)
    return _as_cache([entry for entry in merged if entry is not None])


def _trunk_and_tail(
    loaded: LoadedModel,
    decoder_layers: Sequence[nn.Module],
    inputs: dict[str, torch.Tensor],
    row_source: list[int],
    deltas: torch.Tensor,
    layer: int,
) -> list[tuple[range, Any, list[int]]]:
    """Layers 0..layer once per prompt; the rest once per row, starting from the trunk's output plus the delta."""
    model = loaded.model
    trunk_reader = read_layers(model, [layer], stop_after=True, keep=lambda output: output)
    with trunk_reader as box:
        trunk = _run_body(loaded, inputs)
    source = torch.tensor(row_source, device=inputs["input_ids"].device)
    row_inputs = {name: tensor[source] for name, tensor in inputs.items()}
    hidden = output_hidden(box[layer])
    last_output = same_structure(box[layer], hidden[source.to(hidden.device)])
    identity = list(range(len(row_source)))
    if last_output is None:  # an unusual layer output: run every row through every layer
        full = _run_body(loaded, row_inputs, add_deltas(model, {layer: deltas}))
        return [(range(len(decoder_layers)), full, identity)]
    with skipped_layers(decoder_layers[: layer + 1], last_output):
        tail = _run_body(loaded, row_inputs, add_deltas(model, {layer: deltas}))
    return [(range(layer + 1), trunk, row_source), (range(layer + 1, len(decoder_layers)), tail, identity)]


def _place(
    merged: list[tuple[torch.Tensor, torch.Tensor] | None],
    kv: KeysValues,
    layers: range,
    rows: list[int],
    source: list[int],
    n_rows: int,
    width: int,
) -> None:
    """Copy a chunk's keys and values (picked by `source`) right-aligned into rows `rows` of the batch cache."""
    indices: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
    for index, (keys, values) in zip(layers, kv, strict=True):
        if keys.device not in indices:
            indices[keys.device] = (torch.tensor(rows, device=keys.device), torch.tensor(source, device=keys.device))
        target, picked = indices[keys.device]
        entry = merged[index]
        if entry is None:
            entry = merged[index] = (
                keys.new_zeros(n_rows, keys.shape[1], width, keys.shape[3]),
                values.new_zeros(n_rows, values.shape[1], width, values.shape[3]),
            )
        chunk_width = keys.shape[2]
        for whole, part in zip(entry, (keys, values), strict=True):
            whole[target, :, width - chunk_width :] = part[picked]


def _as_cache(merged: KeysValues) -> Any:
    from transformers import DynamicCache

    cache = DynamicCache()
    for index, (keys, values) in enumerate(merged):
        cache.update(keys, values, index)
    return cache
