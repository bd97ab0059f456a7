"""The fast path's prefill: prompts packed end to end, keys and values written straight into the decode cache."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from chunky_utils.decode_step import DecodeState, RowCache, cache_attention
from chunky_utils.models import find_decoder_layers
from chunky_utils.packed_extraction import (
    flash_works,
    layer_keys_values,
    pack_chunks,
    packed_positions,
    run_packed_layer,
    sequence_bounds,
    to_device_at_once,
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


def routed_attention_function(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The fast path's one attention function: packed prefill calls (they carry `cu_seq_lens_q`) go to
    `prefill_attention`, decoding steps to `cache_attention`, so one routing of the model serves a whole call."""
    if kwargs.get("cu_seq_lens_q") is not None:
        return prefill_attention(module, query, key, value, attention_mask, *args, **kwargs)
    return cache_attention(module, query, key, value, attention_mask, *args, **kwargs)


@dataclass
class _Chunk:
    """One packed chunk of the prefill, its index tensors on the device."""

    ids: torch.Tensor  # [1, prompt tokens]
    positions: torch.Tensor  # [1, prompt tokens]
    cu: torch.Tensor  # int32 prompt bounds
    lengths: list[int]
    rows: torch.Tensor  # per row token: its row, slot and packed prompt token
    slots: torch.Tensor
    source: torch.Tensor
    row_cu: torch.Tensor  # int32 bounds of the rows' tokens
    row_lengths: list[int]


def _plan(
    prompt_token_ids: Sequence[Sequence[int]],
    chunk_prompts: list[int],
    rows_of: dict[int, list[int]],
) -> tuple[list[torch.Tensor], list[int], list[int]]:
    """A chunk's index tensors on the CPU (ids, positions, cu, rows, slots, source, row cu), built without Python
    loops over tokens; with its prompt lengths and row lengths."""
    lengths = [len(prompt_token_ids[prompt]) - 1 for prompt in chunk_prompts]
    prompt_lengths = torch.tensor(lengths)
    ids = torch.tensor([token for prompt in chunk_prompts for token in prompt_token_ids[prompt][:-1]])
    prompt_bounds = sequence_bounds(prompt_lengths)
    fan_out = torch.tensor([len(rows_of[prompt]) for prompt in chunk_prompts])
    row_ids = torch.tensor([row for prompt in chunk_prompts for row in rows_of[prompt]])
    row_lengths = prompt_lengths.repeat_interleave(fan_out)
    slots = packed_positions(row_lengths)
    source = slots + prompt_bounds[:-1].repeat_interleave(fan_out).repeat_interleave(row_lengths)
    rows = row_ids.repeat_interleave(row_lengths)
    tensors = [ids, packed_positions(prompt_lengths), prompt_bounds, rows, slots, source, sequence_bounds(row_lengths)]
    return tensors, lengths, row_lengths.tolist()


def _chunks(
    prompt_token_ids: Sequence[Sequence[int]],
    prompts: list[int],
    rows_of: dict[int, list[int]],
    fan_out: list[int],
    max_batch_tokens: int,
    device: torch.device,
) -> list[_Chunk]:
    """Every chunk's index tensors, sent to the device together before any layer runs."""
    weights = [(len(prompt_token_ids[prompt]) - 1) * fan for prompt, fan in zip(prompts, fan_out, strict=True)]
    plans = [
        _plan(prompt_token_ids, [prompts[i] for i in chunk], rows_of)
        for chunk in pack_chunks(weights, max_batch_tokens)
    ]
    sent = to_device_at_once([tensor for tensors, _, _ in plans for tensor in tensors], device)
    result = []
    for index, (_, lengths, row_lengths) in enumerate(plans):
        ids, positions, cu, rows, slots, source, row_cu = sent[7 * index : 7 * index + 7]
        result.append(
            _Chunk(
                ids=ids[None],
                positions=positions[None],
                cu=cu.to(torch.int32),
                lengths=lengths,
                rows=rows,
                slots=slots,
                source=source,
                row_cu=row_cu.to(torch.int32),
                row_lengths=row_lengths,
            )
        )
    return result


def _run_packed(
    layers: Sequence[nn.Module],
    indices: range,
    hidden: torch.Tensor,
    position_ids: torch.Tensor,
    cu: torch.Tensor,
    longest: int,
    caches: list[RowCache],
    sink: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    deltas: Mapping[int, torch.Tensor],
    rotary: nn.Module,
) -> torch.Tensor:
    """Layers `indices` over one packed sequence (bounds `cu`), keys and values sunk to the caches."""
    cos, sin = rotary(hidden, position_ids)
    packing = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
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
    positions unsteered, one pass per prompt serves all its rows. Every index tensor reaches the device in
    one copy before the first layer runs, so the host never waits for the GPU between chunks.
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
    if not prompts:
        return
    fan_out = [len(rows_of[prompt]) if steered else 1 for prompt in prompts]
    device_deltas = {layer: layer_deltas[layer].to(device, dtype) for layer in steered}
    for chunk in _chunks(prompt_token_ids, prompts, rows_of, fan_out, max_batch_tokens, device):
        hidden = body.embed_tokens(chunk.ids)
        # the trunk: one pass per prompt, its keys and values copied to every row of the prompt
        trunk_sink = (chunk.rows, chunk.slots, chunk.source)
        trunk = range(split + 1)
        hidden = _run_packed(
            layers,
            trunk,
            hidden,
            chunk.positions,
            chunk.cu,
            max(chunk.lengths),
            state.caches,
            trunk_sink,
            {},
            body.rotary_emb,
        )
        if not steered:
            continue
        row_deltas = {layer: device_deltas[layer][chunk.rows][None] for layer in steered}
        hidden = hidden[:, chunk.source] + row_deltas[split]
        tail = range(split + 1, len(layers))
        sink = (chunk.rows, chunk.slots, torch.arange(chunk.rows.shape[0], device=device))
        _run_packed(
            layers,
            tail,
            hidden,
            chunk.positions[:, chunk.source],
            chunk.row_cu,
            max(chunk.row_lengths),
            state.caches,
            sink,
            row_deltas,
            body.rotary_emb,
        )
