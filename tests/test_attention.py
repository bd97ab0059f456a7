"""Grouped-query decoding attention gives the numbers of transformers' own SDPA path."""

from __future__ import annotations

import pytest
import torch

from chunky_utils.attention import PACKED_SDPA, grouped_query_decoding
from chunky_utils.chat import left_pad
from chunky_utils.models import LoadedModel
from chunky_utils.prefill import cache_argument_name


def decode_step_logits(loaded: LoadedModel) -> torch.Tensor:
    """Prefill two padded prompts, then one decoding step: the step is where queries are packed."""
    from transformers import DynamicCache

    model = loaded.model
    inputs = left_pad([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]], 0, torch.device("cpu"))
    cache = DynamicCache()
    with torch.no_grad():
        model(**inputs, **{cache_argument_name(model): cache}, use_cache=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
        step = model(
            input_ids=torch.tensor([[20], [21]]),
            attention_mask=mask,
            position_ids=inputs["position_ids"][:, -1:] + 1,
            **{cache_argument_name(model): cache},
            use_cache=True,
        )
    return step.logits


def test_packed_decoding_equals_sdpa(tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.nn.functional as functional

    packed_shapes = []
    real_sdpa = functional.scaled_dot_product_attention

    def spy(query: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        packed_shapes.append(tuple(query.shape))
        return real_sdpa(query, *args, **kwargs)

    assert tiny.model.config.num_key_value_heads < tiny.model.config.num_attention_heads
    tiny.model.set_attn_implementation("sdpa")
    expected = decode_step_logits(tiny)
    with grouped_query_decoding(tiny.model, force=True):
        assert tiny.model.config._attn_implementation == PACKED_SDPA
        monkeypatch.setattr(functional, "scaled_dot_product_attention", spy)
        packed = decode_step_logits(tiny)
    assert (2, 2, 2, 16) in packed_shapes  # the step ran on 2 KV heads with 2 grouped queries each
    assert tiny.model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=1e-5)


def test_models_without_grouped_queries_are_left_alone() -> None:
    from chunky_utils.models import build_tiny_model

    model = build_tiny_model("gpt2", n_layers=2, hidden_size=64).model
    before = model.config._attn_implementation
    with grouped_query_decoding(model, force=True):
        assert model.config._attn_implementation == before
