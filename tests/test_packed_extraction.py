"""Packed extraction (prompts end to end, block-diagonal attention) reads what padded batches read."""

from __future__ import annotations

import pytest
import torch

from chunky_utils import packed_extraction
from chunky_utils.activations import extract_last_token_activations
from chunky_utils.models import LoadedModel, build_tiny_model, find_decoder_layers
from chunky_utils.packed_extraction import (
    pack_chunks,
    packed_positions,
    packing_reason,
    routed_attention,
    sequence_bounds,
    to_device_at_once,
    varlen_attention,
)

PROMPTS = [
    "Hi",
    "Name a colour.",
    "Tell me a story about a brave little toaster who lives in a shed by the sea.",
    "What is 2 + 2?",
    "Write a haiku about autumn leaves falling on a quiet pond at dusk.",
    "Why?",
]


def both(loaded: LoadedModel, layers: list[int] | None, max_batch_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations asked for packed, then padded; packed ones computed no padded position where supported."""
    common = {"layers": layers, "max_batch_tokens": max_batch_tokens, "progress": False}
    packed, packed_stats = extract_last_token_activations(
        loaded.model, loaded.tokenizer, PROMPTS, packing="packed", **common
    )
    padded, _ = extract_last_token_activations(loaded.model, loaded.tokenizer, PROMPTS, packing="padded", **common)
    assert (packed_stats.padding_waste == 0.0) == (packing_reason(loaded.model) is None)
    return packed, padded


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("layers", [None, [1], [0, 2]], ids=["all", "one", "two"])
def test_packed_equals_padded(architecture: str, layers: list[int] | None) -> None:
    loaded = build_tiny_model(architecture, n_layers=4, hidden_size=64, seed=2)
    for max_batch_tokens in (64, 16384):  # several chunks, and one
        packed, padded = both(loaded, layers, max_batch_tokens)
        assert packed.shape == padded.shape
        torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)


def test_unsupported_models_fall_back_to_padded_batches() -> None:
    gpt2 = build_tiny_model("gpt2", n_layers=2, hidden_size=32)
    assert "gpt2" in (packing_reason(gpt2.model) or "")
    packed, padded = both(gpt2, None, 16384)
    assert torch.equal(packed, padded)


def test_auto_packs_only_on_a_gpu(tiny: LoadedModel) -> None:
    _, stats = extract_last_token_activations(tiny.model, tiny.tokenizer, PROMPTS, [1], progress=False)
    assert stats.padded_tokens > stats.real_tokens  # CPU: padded batches
    with pytest.raises(ValueError, match="packing"):
        extract_last_token_activations(tiny.model, tiny.tokenizer, PROMPTS, [1], packing="tight")


def test_pack_chunks_keep_order_and_budget() -> None:
    assert pack_chunks([3, 4, 5, 9, 1], 8) == [[0, 1], [2], [3], [4]]
    assert pack_chunks([2, 2, 2], 100) == [[0, 1, 2]]
    assert pack_chunks([], 8) == []


def test_varlen_attention_is_block_diagonal_causal() -> None:
    torch.manual_seed(0)
    lengths = [3, 5, 2]
    heads, kv_heads, dim = 4, 2, 8
    query = torch.randn(1, heads, sum(lengths), dim)
    key = torch.randn(1, kv_heads, sum(lengths), dim)
    value = torch.randn(1, kv_heads, sum(lengths), dim)
    cu = torch.tensor([0, 3, 8, 10], dtype=torch.int32)
    output, _ = varlen_attention(
        None, query, key, value, None, scaling=0.3, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=5, max_length_k=5
    )
    start = 0
    for length in lengths:
        part = slice(start, start + length)
        expected = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, part],
            key[:, :, part].repeat_interleave(2, dim=1),
            value[:, :, part].repeat_interleave(2, dim=1),
            is_causal=True,
            scale=0.3,
        )
        torch.testing.assert_close(output[0, part], expected[0].transpose(0, 1))
        start += length
    with pytest.raises(ValueError, match="cu_seq_lens"):
        varlen_attention(None, query, key, value, None)


def test_packed_indices_and_one_copy() -> None:
    lengths = torch.tensor([3, 1, 2])
    assert packed_positions(lengths).tolist() == [0, 1, 2, 0, 0, 1]
    assert sequence_bounds(lengths).tolist() == [0, 3, 4, 6]
    parts = [torch.arange(4), torch.tensor([7]), torch.tensor([5, 6])]
    sent = to_device_at_once(parts, torch.device("cpu"))
    assert [part.tolist() for part in sent] == [[0, 1, 2, 3], [7], [5, 6]]


@pytest.mark.parametrize("on_config", [True, False], ids=["shared-config", "set_attn_implementation"])
def test_routed_attention_routes_and_restores(tiny: LoadedModel, on_config: bool) -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model = tiny.model
    packed_extraction._ONE_CONFIG[model] = on_config  # both ways of switching, whatever this model allows
    calls = []

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return sdpa_attention_forward(*args, **kwargs)  # type: ignore[arg-type]

    before = model.config._attn_implementation
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        expected = model(ids).logits
        with routed_attention(model, "chunky_test_route", counted):
            assert model.config._attn_implementation == "chunky_test_route"
            routed = model(ids).logits
    assert len(calls) == len(find_decoder_layers(model))
    assert model.config._attn_implementation == before
    torch.testing.assert_close(routed, expected)
    packed_extraction._ONE_CONFIG.pop(model)


@pytest.mark.parametrize("packing", ["packed", "padded"])
def test_prompt_sets_in_one_call_equal_one_call_each(packing: str) -> None:
    from chunky_utils.activations import extract_prompt_sets

    loaded = build_tiny_model("llama", n_layers=4, hidden_size=64, seed=2)
    sets = [PROMPTS[:4], PROMPTS[4:], []]
    together = extract_prompt_sets(loaded.model, loaded.tokenizer, sets, [1, 2], packing=packing, progress=False)
    assert len(together) == len(sets)
    for prompts, (activations, stats) in zip(sets, together, strict=True):
        assert activations.shape == (len(prompts), 2, 64) and stats.n_prompts == len(prompts)
        if prompts:
            alone, _ = extract_last_token_activations(
                loaded.model, loaded.tokenizer, prompts, [1, 2], packing=packing, progress=False
            )
            torch.testing.assert_close(activations, alone, rtol=1e-5, atol=1e-5)
