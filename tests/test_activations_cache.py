"""Extraction matches plain forwards; the cache keeps the seed's names and never trusts a foreign file."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from chunky_utils.activations import (
    cache_key_for,
    extract_last_token_activations,
    length_sorted_batches,
    subset_means,
)
from chunky_utils.cache import MEAN_FILE_KEYS, ActivationCache, atomic_write_text
from chunky_utils.chat import format_prompts, tokenize_prompts
from chunky_utils.data import load_prompt_set
from chunky_utils.models import LoadedModel, build_tiny_model

PROMPTS = ["Hi", "What is two plus two?", "Write a long sentence about the sea and the sky at dusk."]


def reference_last_token(loaded: LoadedModel, prompt: str, layer: int, with_header: bool = True) -> torch.Tensor:
    """Unbatched forward with output_hidden_states: hidden_states[layer + 1] is decoder layer `layer`'s output."""
    text = format_prompts(loaded.tokenizer, [prompt], add_generation_prompt=with_header)[0]
    ids = torch.tensor([tokenize_prompts(loaded.tokenizer, [text])[0]])
    with torch.no_grad():
        out = loaded.model(input_ids=ids, output_hidden_states=True)
    return out.hidden_states[layer + 1][0, -1]


@pytest.mark.parametrize("read_position", ["generation_prompt", "user_end"])
def test_batched_extraction_equals_single_prompt_forward(tiny: LoadedModel, read_position: str) -> None:
    acts, stats = extract_last_token_activations(
        tiny.model, tiny.tokenizer, PROMPTS, layers=[0, 2], batch_size=2, read_position=read_position, progress=False
    )
    assert acts.shape == (3, 2, 64)
    for i, prompt in enumerate(PROMPTS):
        for column, layer in enumerate([0, 2]):
            expected = reference_last_token(tiny, prompt, layer, with_header=read_position == "generation_prompt")
            torch.testing.assert_close(acts[i, column], expected, atol=1e-4, rtol=1e-4)
    assert stats.real_tokens <= stats.padded_tokens and 0 <= stats.padding_waste <= 0.1


def test_forward_stops_after_deepest_layer(tiny: LoadedModel) -> None:
    calls: list[int] = []
    layers = tiny.model.model.layers
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, layer in enumerate(layers)]
    head = tiny.model.lm_head.register_forward_hook(lambda m, a, o: calls.append(-1))
    try:
        extract_last_token_activations(tiny.model, tiny.tokenizer, PROMPTS[:1], layers=[1], progress=False)
    finally:
        for handle in [*handles, head]:
            handle.remove()
    assert calls == [0, 1]


def test_length_sorted_batches_group_similar_lengths() -> None:
    batches = length_sorted_batches([5, 100, 6, 99, 7], batch_size=2)
    assert batches == [[1, 3], [4, 2], [0]]
    assert length_sorted_batches([10] * 4, batch_size=8, max_batch_tokens=25) == [[0, 1], [2, 3]]
    assert length_sorted_batches([100, 50], batch_size=8) == [[0], [1]], "a 25% padded batch is split"
    assert length_sorted_batches([100, 50], batch_size=8, max_padding=1.0) == [[0, 1]]


def test_cache_files_have_seed_names_and_keys(tiny: LoadedModel, tmp_path: Path, caplog) -> None:
    prompt_set = load_prompt_set("12", 6, data_source="bundled")
    with caplog.at_level(logging.INFO):
        first = subset_means(tiny, prompt_set, [1], tmp_path, progress=False)
        second = subset_means(tiny, prompt_set, [3], tmp_path, progress=False)
    assert not first.cache_hit and second.cache_hit
    assert "cache hit" in caplog.text
    folder = ActivationCache(tmp_path, cache_key_for(tiny, "generation_prompt", "bundled")).folder
    names = sorted(p.name for p in folder.glob("*.pt"))
    assert names == [f"12_6_layer_{layer}.pt" for layer in range(4)]
    payload = torch.load(folder / "12_6_layer_1.pt", weights_only=True)
    assert set(MEAN_FILE_KEYS) <= set(payload)
    assert payload["subset"] == "12" and payload["n_samples"] == 6 and payload["layer"] == 1
    assert payload["model_name"] == tiny.name
    assert payload["norm"] == pytest.approx(float(payload["mean_vector"].norm()))
    acts = extract_last_token_activations(tiny.model, tiny.tokenizer, prompt_set.prompts, [1], progress=False)[0]
    torch.testing.assert_close(payload["mean_vector"], acts[:, 0].mean(0), atol=1e-5, rtol=1e-5)


def test_capture_needed_stops_at_layer(tiny: LoadedModel, tmp_path: Path) -> None:
    prompt_set = load_prompt_set("0", 4, data_source="bundled")
    subset_means(tiny, prompt_set, [1], tmp_path, capture="needed", progress=False)
    folder = ActivationCache(tmp_path, cache_key_for(tiny, "generation_prompt", "bundled")).folder
    assert sorted(p.name for p in folder.glob("*.pt")) == ["0_4_layer_0.pt", "0_4_layer_1.pt"]


def test_other_model_gets_its_own_folder(tiny: LoadedModel, tmp_path: Path) -> None:
    other = build_tiny_model("llama", seed=7)
    prompt_set = load_prompt_set("5", 4, data_source="bundled")
    subset_means(tiny, prompt_set, [0], tmp_path, progress=False)
    result = subset_means(other, prompt_set, [0], tmp_path, progress=False)
    assert not result.cache_hit
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


@pytest.mark.parametrize("damage", ["garbage", "other_data", "wrong_shape"])
def test_bad_cache_file_is_recomputed(tiny: LoadedModel, tmp_path: Path, damage: str, caplog) -> None:
    prompt_set = load_prompt_set("7", 4, data_source="bundled")
    first = subset_means(tiny, prompt_set, [2], tmp_path, progress=False)
    path = first.means[2].path
    if damage == "garbage":
        atomic_write_text(path, "not a torch file")
    else:
        payload = torch.load(path, weights_only=True)
        if damage == "other_data":
            payload["data_hash"] = "0" * 16
        else:
            payload["mean_vector"] = torch.zeros(3)
        torch.save(payload, path)
    with caplog.at_level(logging.WARNING):
        again = subset_means(tiny, prompt_set, [2], tmp_path, progress=False)
    assert not again.cache_hit and "recomputing" in caplog.text
    torch.testing.assert_close(again.means[2].mean_vector, first.means[2].mean_vector)


def test_changed_read_position_or_template_changes_the_key(tiny: LoadedModel) -> None:
    base = cache_key_for(tiny, "generation_prompt", "bundled")
    assert base.folder_name != cache_key_for(tiny, "user_end", "bundled").folder_name
    assert base.folder_name != cache_key_for(tiny, "generation_prompt", "hub").folder_name


def test_cache_names_cannot_escape(tmp_path: Path, tiny: LoadedModel) -> None:
    cache = ActivationCache(tmp_path, cache_key_for(tiny, "generation_prompt", "file"))
    path = cache.mean_path("../../etc/passwd", 5, 1)
    assert path.parent == cache.folder.resolve()


def test_cached_activations_round_trip(tiny: LoadedModel, tmp_path: Path) -> None:
    prompt_set = load_prompt_set("2", 5, data_source="bundled")
    subset_means(tiny, prompt_set, [0], tmp_path, progress=False)
    cache = ActivationCache(tmp_path, cache_key_for(tiny, "generation_prompt", "bundled"))
    loaded = cache.load_activations("2", 5, prompt_set.content_hash)
    assert loaded is not None
    acts, layers = loaded
    assert acts.shape == (5, 4, 64) and layers == [0, 1, 2, 3]
    assert cache.load_activations("2", 5, "other") is None


def test_prompt_sets_means_extract_the_misses_in_one_call(
    tiny: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chunky_utils import activations

    target = load_prompt_set("2", 5, data_source="bundled")
    baseline = load_prompt_set("3", 4, data_source="bundled")
    alone = {s.subset: subset_means(tiny, s, [1, 2], tmp_path / "alone", progress=False) for s in (target, baseline)}
    calls: list[int] = []
    original = activations.extract_prompt_sets

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(len(args[2]))  # the prompt sets of this call
        return original(*args, **kwargs)

    monkeypatch.setattr(activations, "extract_prompt_sets", counted)
    both = activations.prompt_sets_means(tiny, [target, baseline, target], [1, 2], tmp_path / "both", progress=False)
    assert calls == [2], "both misses in one call, the repeated set extracted once"
    assert [m.cache_hit for m in both] == [False, False, False]
    for means in both:
        for layer in (1, 2):
            torch.testing.assert_close(
                means.means[layer].mean_vector, alone[means.prompt_set.subset].means[layer].mean_vector
            )
    assert both[0].means[1].path == both[2].means[1].path
    again = activations.prompt_sets_means(tiny, [target, baseline], [1], tmp_path / "both", progress=False)
    assert [m.cache_hit for m in again] == [True, True] and calls == [2]
    again[1].means[1].path.unlink()  # the baseline's mean at layer 1 is gone: only it is extracted again
    mixed = activations.prompt_sets_means(tiny, [target, baseline], [1], tmp_path / "both", progress=False)
    assert [m.cache_hit for m in mixed] == [True, False] and calls == [2, 1]
