"""The fast path's prefill: prompts packed end to end, keys and values written straight into the decode cache."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from chunky_utils.decode_step import DecodeState, RowCache
from chunky_utils.models import find_decoder_layers
from chunky_utils.packed_extraction import (
    flash_works,
    layer_keys_values,
    pack_chunks,
    run_packed_layer,
    varlen_attention,
)


def _sink(cache: RowCache, sink: tuple[torch.Tensor, ...], key: torch.Tensor, value: torch.Tensor) -> None:
    """Packed token `source[i]`'s key and value ([1, kv heads, tokens, dim]) to slot `slots[i]` of row `rows[i]`."""
    rows, slots, source = sink
    cache.keys.index_put_((rows, slots), key[0].transpose(0, 1).index_select(0, source))
    cache.values.index_put_((rows, slots), value[0].transpose(0, 1).index_select(0, source))


def prefill_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *args: Any,
    kv_sink: tuple[RowCache, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """`varlen_attention` (same arguments) that first writes the keys and values to the decode cache.

    `kv_sink` = (cache, rows, slots, source): packed token `source[i]` goes to slot `slots[i]` of row `rows[i]`.
    """
    if kv_sink is not None:
        _sink(kv_sink[0], kv_sink[1:], key, value)
    return varlen_attention(module, query, key, value, *args, **kwargs)


def _run_packed(
    layers: Sequence[nn.Module],
    indices: range,
    hidden: torch.Tensor,
    position_ids: torch.Tensor,
    lengths: list[int],
    caches: list[RowCache],
    sink: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    deltas: Mapping[int, torch.Tensor],
    rotary: nn.Module,
) -> torch.Tensor:
    """Layers `indices` over one packed sequence of `lengths`, keys and values sunk to the caches."""
    cos, sin = rotary(hidden, position_ids)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=hidden.device)
    packing = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lengths), "max_length_k": max(lengths)}
    for index in indices:
        if index == len(layers) - 1:  # the last layer's output is never read: only its keys and values
            _, keys, values = layer_keys_values(layers[index], hidden, cos, sin)
            _sink(caches[index], sink, keys, values)
            break
        hidden = run_packed_layer(
            layers[index], hidden, position_ids, cos, sin, {**packing, "kv_sink": (caches[index], *sink)}
        )
        if index in deltas:
            hidden = hidden + deltas[index]
    return hidden


def prefill_rows(
    model: nn.Module,
    state: DecodeState,
    prompt_token_ids: Sequence[Sequence[int]],
    row_prompts: Sequence[int],
    layer_deltas: Mapping[int, torch.Tensor],
    positions: str,
    max_batch_tokens: int,
) -> None:
    """Every row's prompt but its last token into the cache (slots 0..), prompts packed, no padding.

    Layers up to the first steered one see the same input in every row of a prompt, so they run once per
    prompt; the later layers run once per row, from the shared output plus the row's delta. With prompt
    positions unsteered, one pass per prompt serves all its rows.
    """
    body = model.model
    layers = find_decoder_layers(model)
    device, dtype = state.deltas.device, state.deltas.dtype
    flash_works(device, dtype)
    steered = sorted(layer for layer, deltas in layer_deltas.items() if positions == "all" and bool(deltas.any()))
    split = steered[0] if steered else len(layers) - 1
    rows_of: dict[int, list[int]] = {}
    for row, prompt in enumerate(row_prompts):
        rows_of.setdefault(prompt, []).append(row)
    prompts = [prompt for prompt in rows_of if len(prompt_token_ids[prompt]) > 1]
    fan_out = [len(rows_of[prompt]) if steered else 1 for prompt in prompts]
    weights = [(len(prompt_token_ids[prompt]) - 1) * fan for prompt, fan in zip(prompts, fan_out, strict=True)]
    for chunk in pack_chunks(weights, max_batch_tokens):
        chunk_prompts = [prompts[i] for i in chunk]
        lengths = [len(prompt_token_ids[prompt]) - 1 for prompt in chunk_prompts]
        starts = [0, *itertools.accumulate(lengths)]
        flat = [token for prompt in chunk_prompts for token in prompt_token_ids[prompt][:-1]]
        ids = torch.tensor(flat, device=device)[None]
        position_ids = torch.cat([torch.arange(length) for length in lengths]).to(device)[None]
        rows, slots, source = [], [], []  # every prompt token, once for each row of its prompt
        row_lengths = []
        for prompt, start, length in zip(chunk_prompts, starts[:-1], lengths, strict=True):
            for row in rows_of[prompt]:
                rows.extend([row] * length)
                slots.extend(range(length))
                source.extend(range(start, start + length))
                row_lengths.append(length)
        rows_t, slots_t, source_t = (torch.tensor(values, device=device) for values in (rows, slots, source))
        hidden = body.embed_tokens(ids)
        trunk = range(split + 1)
        hidden = _run_packed(
            layers, trunk, hidden, position_ids, lengths, state.caches, (rows_t, slots_t, source_t), {}, body.rotary_emb
        )
        if not steered:
            continue
        row_deltas = {layer: layer_deltas[layer].to(device, dtype)[rows_t][None] for layer in steered}
        hidden = hidden[:, source_t] + row_deltas[split]
        tail = range(split + 1, len(layers))
        sink = (rows_t, slots_t, torch.arange(len(rows), device=device))
        _run_packed(
            layers,
            tail,
            hidden,
            position_ids[:, source_t],
            row_lengths,
            state.caches,
            sink,
            row_deltas,
            body.rotary_emb,
        )
