"""The shared random stream: a prompt's draws depend only on (seed, prompt, step), never on its batch."""

from __future__ import annotations

import pytest
import torch

from chunky_utils import sampling
from chunky_utils.generation import GenerationSettings, generate_with_scales
from chunky_utils.models import LoadedModel
from chunky_utils.sampling import (
    SamplingSettings,
    add_gumbel_noise,
    filter_logits,
    prompt_key,
    sample_tokens,
    uniform_noise,
)

PROMPTS = ["Hi there", "Name a colour.", "Tell me a story about a brave little toaster.", "Why?", "Count to five."]


def test_noise_of_a_key_ignores_the_other_rows() -> None:
    keys = torch.tensor([prompt_key(p) for p in PROMPTS])
    together = uniform_noise(3, keys, 7, 1000)
    for i in range(len(PROMPTS)):
        assert torch.equal(uniform_noise(3, keys[i : i + 1], 7, 1000)[0], together[i])
    assert torch.equal(uniform_noise(3, keys, torch.tensor(7), 1000), together)
    assert not torch.equal(uniform_noise(3, keys, 8, 1000), together)
    assert not torch.equal(uniform_noise(4, keys, 7, 1000), together)
    assert float(together.min()) > 0.0 and float(together.max()) < 1.0
    assert abs(float(together.mean()) - 0.5) < 0.01


def test_prompt_key_is_stable() -> None:
    assert prompt_key("Hi there") == prompt_key("Hi there") != prompt_key("Hi there!")
    assert 0 <= prompt_key("x") < 2**31


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sparse_noise_picks_the_same_token_as_dense(temperature: float) -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 5000) * 4 / temperature
    keys = torch.tensor([prompt_key(str(i % 3)) for i in range(6)])
    for step in range(30):
        dense = add_gumbel_noise(logits, 0, keys, step, dense=True).argmax(-1)
        assert torch.equal(add_gumbel_noise(logits, 0, keys, step).argmax(-1), dense)


@pytest.mark.parametrize(
    ("top_k", "top_p", "expected"),
    [
        (0, 1.0, [0.0321, 0.0871, 0.2369, 0.6439]),
        (2, 1.0, [0.0, 0.0, 0.2689, 0.7311]),
        (0, 0.7, [0.0, 0.0, 0.2689, 0.7311]),
    ],
)
def test_draws_follow_the_filtered_softmax(top_k: int, top_p: float, expected: list[float]) -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    settings = SamplingSettings(temperature=1.0, top_k=top_k, top_p=top_p, seed=1)
    counts = torch.zeros(4)
    draws = 6000
    for step in range(draws):
        counts[sample_tokens(logits, settings, torch.tensor([11]), step)] += 1
    torch.testing.assert_close(counts / draws, torch.tensor(expected), atol=0.02, rtol=0)


def test_filter_keeps_the_best_token_and_greedy_ignores_noise() -> None:
    logits = torch.tensor([[5.0, 1.0, 0.0]])
    assert torch.isfinite(filter_logits(logits, top_p=0.01)).tolist() == [[True, False, False]]
    greedy = SamplingSettings(temperature=0.0)
    assert int(sample_tokens(logits, greedy, torch.tensor([1]), 0)) == 0
    with pytest.raises(ValueError, match="top_p"):
        SamplingSettings(top_p=0.0)


def test_zero_vector_gives_identical_texts_when_sampling(tiny: LoadedModel) -> None:
    settings = GenerationSettings(max_new_tokens=16, temperature=0.7, seed=5)
    out = generate_with_scales(tiny, PROMPTS, 1, torch.zeros(64), [0.0, 2.0, -3.0], settings, progress=False)
    assert out.for_scale(0.0) == out.for_scale(2.0) == out.for_scale(-3.0)
    assert len(set(out.for_scale(0.0))) == len(PROMPTS)  # sampled texts, not one repeated answer


def _spy_noise(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[int], int, torch.Tensor]]:
    """Record (row keys, step, noise added per row) of every sampling step."""
    seen: list[tuple[list[int], int, torch.Tensor]] = []
    original = sampling.add_gumbel_noise

    def spy(scores: torch.Tensor, seed: int, keys: torch.Tensor, step: int | torch.Tensor, dense: bool = False):
        seen.append((keys.tolist(), int(step), sampling.gumbel_noise(seed, keys, step, scores.shape[-1])))
        return original(scores, seed, keys, step, dense)

    monkeypatch.setattr(sampling, "add_gumbel_noise", spy)
    return seen


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_baseline_is_the_same_in_four_compositions(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch, temperature: float
) -> None:
    """Alone, paired, with five scales, and in a sweep-shaped batch: the same noise and the same text."""
    seen = _spy_noise(monkeypatch)
    direction = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 3
    target = PROMPTS[2]
    compositions = {
        "alone": ([target], [0.0], 64),
        "paired": (PROMPTS, [0.0, 2.0], 64),
        "five scales": (PROMPTS, [0.0, 0.5, 1.0, 2.0, 4.0, 8.0], 64),
        "sweep": (PROMPTS[::-1], [0.0, 1.0, 3.0], 4),
    }
    texts, noise = {}, {}
    for name, (prompts, scales, batch_rows) in compositions.items():
        seen.clear()
        settings = GenerationSettings(max_new_tokens=10, temperature=temperature, seed=2, batch_size=batch_rows)
        out = generate_with_scales(tiny, prompts, 1, direction, scales, settings, progress=False)
        texts[name] = out.for_scale(0.0)[prompts.index(target)]
        key = prompt_key(target)
        noise[name] = {step: rows[keys.index(key)] for keys, step, rows in seen if key in keys}
    assert len(set(texts.values())) == 1, texts
    if temperature > 0:
        reference = noise["alone"]
        assert reference  # the stream was really drawn
        for name in compositions:
            common = set(reference) & set(noise[name])
            assert common
            for step in common:
                assert torch.equal(noise[name][step], reference[step])


def test_top_k_and_top_p_reach_generation(tiny: LoadedModel) -> None:
    base = dict(max_new_tokens=12, temperature=1.5, seed=0)
    wide = generate_with_scales(tiny, PROMPTS, 1, torch.zeros(64), [0.0], GenerationSettings(**base), False)
    narrow = generate_with_scales(tiny, PROMPTS, 1, torch.zeros(64), [0.0], GenerationSettings(**base, top_k=1), False)
    greedy = generate_with_scales(
        tiny, PROMPTS, 1, torch.zeros(64), [0.0], GenerationSettings(**{**base, "temperature": 0.0}), False
    )
    assert narrow.texts == greedy.texts  # top-1 sampling is greedy decoding
    assert wide.texts != greedy.texts
