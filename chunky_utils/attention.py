"""Decoding attention without copying the KV cache for grouped-query models.

With a padding mask, transformers' SDPA path (before it learned to pack queries) repeats every key and
value head to the query head count at every layer and step: for Llama-3.1-8B that copies four times the
whole KV cache per token, and decoding time then grows with the number of rows. For a single query token
the query heads sharing a key/value head can instead stand in for query positions, so attention runs on
the cache as it is. Same arithmetic, no copy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

PACKED_SDPA = "chunky_packed_gqa_sdpa"


def packed_gqa_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, with query heads grouped per key/value head for one-token queries."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    simple_mask = attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1:3] == (1, 1))
    if query.shape[2] != 1 or groups == 1 or not simple_mask or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    batch, heads, _, dim = query.shape
    grouped = query.reshape(batch, heads // groups, groups, dim)  # the group's query heads as query positions
    output = torch.nn.functional.scaled_dot_product_attention(
        grouped, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling
    )
    return output.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


def transformers_packs_queries() -> bool:
    """Whether the installed transformers already groups one-token queries in its SDPA path."""
    from transformers.integrations import sdpa_attention

    return hasattr(sdpa_attention, "pack_gqa")


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_gqa_sdpa)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)


@contextmanager
def grouped_query_decoding(model: nn.Module, force: bool = False) -> Iterator[None]:
    """Use `packed_gqa_sdpa` while the block runs, when the model uses SDPA and transformers lacks the packing."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    wanted = current == "sdpa" and heads != kv_heads and (force or not transformers_packs_queries())
    if not wanted:
        yield
        return
    try:
        _register()
        model.set_attn_implementation(PACKED_SDPA)  # type: ignore[operator]
    except Exception as exc:  # an older transformers without these interfaces: decode the usual way
        log.debug("packed grouped-query attention unavailable (%s): using %s", exc, current)
        yield
        return
    switched = config._attn_implementation == PACKED_SDPA
    log.debug("decoding with %s (was %s): %s", PACKED_SDPA, current, "on" if switched else "refused")
    try:
        yield
    finally:
        if switched:
            model.set_attn_implementation(current)  # type: ignore[operator]
