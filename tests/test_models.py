"""Layer discovery across architectures, range checks, chat templates, padding."""

from __future__ import annotations

import pytest
import torch

from chunky_utils.errors import UsageError
from chunky_utils.models import (
    TINY_ARCHITECTURES,
    LoadedModel,
    build_tiny_model,
    check_layer,
    check_tensor_parallel,
    find_decoder_layers,
    format_prompts,
    left_pad,
    load_model,
    parse_tiny_id,
)


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_decoder_layers_found_for_each_architecture(architecture: str) -> None:
    loaded = build_tiny_model(architecture, n_layers=3, hidden_size=32)
    layers = find_decoder_layers(loaded.model)
    assert len(layers) == 3
    assert loaded.hidden_size == 32


def test_layer_out_of_range_names_the_range(tiny: LoadedModel) -> None:
    assert check_layer(tiny.model, 3) == 3
    with pytest.raises(UsageError, match=r"layer 4 is out of range: this model has layers 0\.\.3"):
        check_layer(tiny.model, 4)
    with pytest.raises(UsageError, match="out of range"):
        check_layer(tiny.model, -1)


def test_chat_template_wraps_prompt(tiny: LoadedModel) -> None:
    with_header, without = (format_prompts(tiny.tokenizer, ["Hello"], flag)[0] for flag in (True, False))
    assert "<|im_start|>user\nHello<|im_end|>" in with_header
    assert with_header.endswith("<|im_start|>assistant\n")
    assert not without.endswith("assistant\n")


def test_left_pad_aligns_last_tokens() -> None:
    batch = left_pad([[5, 6, 7], [8]], pad_id=0, device=torch.device("cpu"))
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]


def test_fingerprint_tracks_weights() -> None:
    first = build_tiny_model("llama", seed=0)
    same = build_tiny_model("llama", seed=0)
    other = build_tiny_model("llama", seed=1)
    assert first.fingerprint == same.fingerprint != other.fingerprint


def test_tiny_ids_and_load() -> None:
    assert parse_tiny_id("tiny-random:gpt2") == ("gpt2", 4, 64)
    assert parse_tiny_id("tiny-random:qwen2:2x32") == ("qwen2", 2, 32)
    assert load_model("tiny-random:llama:2x32").n_layers == 2
    with pytest.raises(UsageError, match="bad tiny model id"):
        parse_tiny_id("tiny-random:llama:big")


def test_tensor_parallel_refuses_without_gpus() -> None:
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has two GPUs")
    with pytest.raises(UsageError, match="needs 2 GPUs"):
        check_tensor_parallel(2)
    with pytest.raises(UsageError, match="at least 1"):
        check_tensor_parallel(0)


def test_missing_model_is_one_line_error(tmp_path) -> None:
    with pytest.raises(UsageError, match="cannot load model"):
        load_model(str(tmp_path / "no-such-model"), device="cpu")
