"""Packed prompt prefill: the KV cache `generate` would build for a padded batch, with less work."""

from __future__ import annotations

import pytest
import torch

from chunky_utils.chat import left_pad
from chunky_utils.generation import GenerationSettings, generate_with_scales
from chunky_utils.models import LoadedModel
from chunky_utils.steering import active_hook_count, add_to_layers
from tests.test_steering_generation import PROMPTS


@pytest.mark.parametrize("positions", ["all", "generated"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_packed_prefill_gives_the_texts_of_a_plain_prefill(
    tiny: LoadedModel, positions: str, temperature: float
) -> None:
    prompts = [*PROMPTS, "x", "A much longer prompt " * 12]
    direction = torch.randn(64) * 4
    packed, plain = (
        GenerationSettings(max_new_tokens=10, temperature=temperature, positions=positions, packed_prefill=flag)
        for flag in (True, False)
    )
    scales = [0.0, 2.0, 2.0, -3.0]
    together = generate_with_scales(tiny, prompts, 1, direction, scales, packed, progress=False)
    assert together.texts == generate_with_scales(tiny, prompts, 1, direction, scales, plain, progress=False).texts
    assert together.for_scale(-3.0) != together.for_scale(0.0)


@pytest.mark.parametrize("steer_prompt", [True, False])
def test_packed_prefill_fills_the_cache_a_padded_batch_would(tiny: LoadedModel, steer_prompt: bool) -> None:
    from transformers import DynamicCache

    from chunky_utils.prefill import cache_argument_name, packed_prefill

    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23, 24]]
    row_prompts = [0, 1, 0, 2, 0]  # prompt 0 at three scales: its trunk runs once
    deltas = torch.randn(5, 64)
    prompt_deltas = deltas if steer_prompt else None
    cache = packed_prefill(tiny, prompts, row_prompts, prompt_deltas, 1, max_batch_tokens=12)  # several chunks
    assert cache is not None and cache.get_seq_length() == 5
    inputs = left_pad([prompts[p][:-1] for p in row_prompts], 0, torch.device("cpu"))
    reference = DynamicCache()
    body = tiny.model.model
    steering = add_to_layers(tiny.model, {1: deltas}) if steer_prompt else add_to_layers(tiny.model, {})
    with torch.no_grad(), steering:
        body(**inputs, use_cache=True, **{cache_argument_name(body): reference})
    mask = inputs["attention_mask"].bool()[:, None, :, None]
    for ours, theirs in zip(cache.layers, reference.layers, strict=True):
        torch.testing.assert_close(ours.keys * mask, theirs.keys * mask, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.values * mask, theirs.values * mask, atol=1e-5, rtol=1e-5)
    assert active_hook_count(tiny.model) == 0
    assert all("forward" not in layer.__dict__ for layer in tiny.model.model.layers)  # skipped layers restored


def test_packed_prefill_declines_sliding_window_caches() -> None:
    from chunky_utils.models import build_tiny_model
    from chunky_utils.prefill import packed_prefill

    model = build_tiny_model("mistral", n_layers=2, hidden_size=64)
    model.model.config.sliding_window = 2
    assert packed_prefill(model, [[5, 6, 7, 8, 9]], [0], None, 0) is None


@pytest.mark.parametrize("architecture", ["qwen2", "gemma", "gpt2", "gpt_neox"])
def test_packed_prefill_across_architectures(architecture: str) -> None:
    from chunky_utils.models import build_tiny_model
    from chunky_utils.prefill import packed_prefill

    model = build_tiny_model(architecture, n_layers=3, hidden_size=64)
    assert packed_prefill(model, [[5, 6, 7], [8, 9, 10, 11, 12]], [0, 1, 1], torch.randn(3, 64), 1) is not None
    direction = torch.randn(64) * 4
    settings = [GenerationSettings(max_new_tokens=6, temperature=0.0, packed_prefill=flag) for flag in (True, False)]
    packed, plain = (
        generate_with_scales(model, PROMPTS, 1, direction, [0.0, 2.0], s, progress=False) for s in settings
    )
    assert packed.texts == plain.texts
