"""Steering vectors as values, the per-row hook, and batched multi-scale generation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chunky_utils.chat import left_pad
from chunky_utils.generation import GenerationSettings, generate_with_scales
from chunky_utils.models import LoadedModel
from chunky_utils.steering import SteeringVector, active_hook_count, add_to_layers

PROMPTS = ["Hi there", "Name a colour.", "Tell me a story about a brave little toaster."]


def logits(loaded: LoadedModel, ids: list[list[int]]) -> torch.Tensor:
    inputs = left_pad(ids, 0, torch.device("cpu"))
    with torch.no_grad():
        return loaded.model(**inputs).logits


def test_vector_arithmetic() -> None:
    a = SteeringVector({3: torch.tensor([1.0, 2.0])})
    b = SteeringVector({3: torch.tensor([0.5, 0.5])})
    assert torch.equal((a - b).at(3), torch.tensor([0.5, 1.5]))
    assert torch.equal((2 * a).at(3), torch.tensor([2.0, 4.0]))
    assert torch.equal((a * 2).at(3), (a + a).at(3))
    assert torch.equal((-a).at(3), torch.tensor([-1.0, -2.0]))
    assert a.norm() == pytest.approx(5**0.5)
    with pytest.raises(ValueError, match="layers differ"):
        _ = a - SteeringVector({4: torch.zeros(2)})


def test_vector_save_load(tmp_path: Path) -> None:
    vector = SteeringVector({1: torch.randn(8), 5: torch.randn(8)}, {"target_subset": "12"})
    vector.save(tmp_path / "v.safetensors")
    loaded = SteeringVector.load(tmp_path / "v.safetensors")
    assert loaded.layers == [1, 5] and loaded.metadata == {"target_subset": "12"}
    torch.testing.assert_close(loaded.at(5), vector.at(5))


def test_apply_changes_logits_and_always_unhooks(tiny: LoadedModel) -> None:
    ids = [[10, 20, 30, 40]]
    plain = logits(tiny, ids)
    vector = SteeringVector({1: torch.ones(64)})
    with vector.apply(tiny.model, scale=5.0):
        steered = logits(tiny, ids)
        assert active_hook_count(tiny.model) == 1
    assert not torch.allclose(plain, steered)
    with pytest.raises(RuntimeError), vector.apply(tiny.model, scale=5.0):
        raise RuntimeError("boom")
    assert active_hook_count(tiny.model) == 0
    torch.testing.assert_close(logits(tiny, ids), plain)


def test_zero_scale_gives_exact_unsteered_logits(tiny: LoadedModel) -> None:
    ids = [[1, 2, 3], [4, 5, 6]]
    plain = logits(tiny, ids)
    with SteeringVector({2: torch.randn(64)}).apply(tiny.model, scale=0.0):
        assert torch.equal(logits(tiny, ids), plain)


def test_per_row_deltas_equal_separate_batches(tiny: LoadedModel) -> None:
    ids = [[7, 8, 9, 10]]
    direction = torch.randn(64)
    expected = []
    for scale in (0.0, 3.0, -3.0):
        with add_to_layers(tiny.model, {1: direction * scale}):
            expected.append(logits(tiny, ids)[0])
    with add_to_layers(tiny.model, {1: torch.stack([direction * s for s in (0.0, 3.0, -3.0)])}):
        together = logits(tiny, ids * 3)
    for row in range(3):
        torch.testing.assert_close(together[row], expected[row], atol=1e-5, rtol=1e-5)


def test_row_count_mismatch_is_reported(tiny: LoadedModel) -> None:
    with (
        pytest.raises(ValueError, match="2 rows but the batch has 1"),
        add_to_layers(tiny.model, {0: torch.zeros(2, 64)}),
    ):
        logits(tiny, [[1, 2]])


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_batched_scales_equal_separate_generate_calls(tiny: LoadedModel, positions: str) -> None:
    direction = torch.randn(64) * 4
    settings = GenerationSettings(max_new_tokens=12, temperature=0.0, batch_size=64, positions=positions)
    together = generate_with_scales(tiny, PROMPTS, 1, direction, [0.0, 1.0, 3.0], settings, progress=False)
    for scale in (0.0, 1.0, 3.0):
        alone = generate_with_scales(tiny, PROMPTS, 1, direction, [scale], settings, progress=False)
        assert alone.for_scale(scale) == together.for_scale(scale)
    assert together.for_scale(3.0) != together.for_scale(0.0)


def test_sampling_is_reproducible_with_a_seed(tiny: LoadedModel) -> None:
    settings = GenerationSettings(max_new_tokens=10, temperature=1.0, seed=5)
    first = generate_with_scales(tiny, PROMPTS, 0, torch.zeros(64), [0.0], settings, progress=False)
    second = generate_with_scales(tiny, PROMPTS, 0, torch.zeros(64), [0.0], settings, progress=False)
    assert first.texts == second.texts


def test_small_batches_cover_every_prompt(tiny: LoadedModel) -> None:
    settings = GenerationSettings(max_new_tokens=4, temperature=0.0, batch_size=2)
    output = generate_with_scales(tiny, PROMPTS, 0, torch.ones(64), [0.0, 2.0], settings, progress=False)
    big = generate_with_scales(
        tiny,
        PROMPTS,
        0,
        torch.ones(64),
        [0.0, 2.0],
        GenerationSettings(max_new_tokens=4, temperature=0.0),
        progress=False,
    )
    assert output.texts == big.texts and all(len(t) == 3 for t in output.texts)


def test_cache_free_extract_equals_the_cached_path(tiny: LoadedModel, tmp_path: Path) -> None:
    from chunky_utils import contrastive_vector, extract, load_prompt_set, subset_means

    target, baseline = load_prompt_set("12", 6, "bundled"), load_prompt_set("0", 6, "bundled")
    direct = extract(tiny, target.prompts, baseline.prompts, layers=[1, 3], progress=False)
    cached = contrastive_vector(
        subset_means(tiny, target, [1, 3], tmp_path, progress=False),
        subset_means(tiny, baseline, [1, 3], tmp_path, progress=False),
    )
    assert direct.layers == [1, 3]
    for layer in (1, 3):
        torch.testing.assert_close(direct.at(layer), cached.at(layer), rtol=1e-4, atol=1e-5)
    settings = GenerationSettings(max_new_tokens=4, temperature=0.0)
    by_vector = generate_with_scales(tiny, PROMPTS, 1, direct, [0.0, 3.0], settings, progress=False)
    by_tensor = generate_with_scales(tiny, PROMPTS, 1, direct.at(1), [0.0, 3.0], settings, progress=False)
    assert by_vector.texts == by_tensor.texts
