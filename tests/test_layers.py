"""Every way the code touches a model's layers: finding, adding deltas, reading (with stop), skipping."""

from __future__ import annotations

import pytest
import torch

from chunky_utils.chat import left_pad
from chunky_utils.errors import UsageError
from chunky_utils.layers import (
    StopForward,
    active_hook_count,
    add_deltas,
    check_layer,
    find_decoder_layers,
    read_layers,
    run_until_stop,
    skipped_layers,
    user_hooks,
)
from chunky_utils.models import LoadedModel


def forward(loaded: LoadedModel) -> torch.Tensor:
    inputs = left_pad([[5, 6, 7, 8], [9, 10]], 0, torch.device("cpu"))
    with torch.no_grad():
        return loaded.model(**inputs, use_cache=False).logits


def test_layers_are_found_once_and_checked(tiny: LoadedModel) -> None:
    assert find_decoder_layers(tiny.model) is find_decoder_layers(tiny.model)
    assert len(find_decoder_layers(tiny.model)) == 4 and check_layer(tiny.model, 3) == 3
    with pytest.raises(UsageError, match=r"layers 0\.\.3"):
        check_layer(tiny.model, 4)


def test_reading_stops_after_the_deepest_layer(tiny: LoadedModel) -> None:
    calls: list[int] = []
    last = find_decoder_layers(tiny.model)[3]
    handle = last.register_forward_hook(lambda *_: calls.append(3))
    try:
        with read_layers(tiny.model, [2, 0], stop_after=True) as captured:
            assert run_until_stop(lambda: forward(tiny)) is None
        assert sorted(captured) == [0, 2] and captured[2].shape[:2] == (2, 4) and not calls
        with read_layers(tiny.model, [1]) as captured:
            assert forward(tiny) is not None and 1 in captured
    finally:
        handle.remove()
    with pytest.raises(StopForward), read_layers(tiny.model, [0], stop_after=True):
        forward(tiny)
    assert not any(user_hooks(layer) for layer in find_decoder_layers(tiny.model))


def test_deltas_come_off_and_skipped_layers_come_back(tiny: LoadedModel) -> None:
    plain = forward(tiny)
    with add_deltas(tiny.model, {1: torch.ones(2, 64) * 3}):
        assert active_hook_count(tiny.model) == 1
        assert not torch.allclose(forward(tiny), plain)
    assert active_hook_count(tiny.model) == 0
    layers = find_decoder_layers(tiny.model)
    with read_layers(tiny.model, [1], keep=lambda output: output) as captured:
        forward(tiny)
    with skipped_layers(layers[:2], captured[1]):
        torch.testing.assert_close(forward(tiny), plain)  # layers 0..1 replayed from the trunk's output
    assert all("forward" not in layer.__dict__ for layer in layers)
    torch.testing.assert_close(forward(tiny), plain)
