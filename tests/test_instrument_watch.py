"""A watched run (the playground's) on the GPU decode loop: the loop runs no hooks, so the watch hands it the stop
flag and gets its steps through `generation.decode_controls`. On the CPU the loop is forced on (it steps eagerly
there and gives `generate`'s tokens), which exercises the same wiring."""

from __future__ import annotations

import logging

import pytest
import torch

from chunky_utils import fast_decode
from chunky_utils.errors import StopRequested
from chunky_utils.generation import GenerationSettings, generate_with_scales
from chunky_utils.instrument.watch import READINGS_NEED_HOOKS, RunProgress, RunWatch
from chunky_utils.layers import user_hooks
from chunky_utils.models import LoadedModel

PROMPTS = ["Hi there", "Name a colour.", "Tell me a story about a brave little toaster."]
SETTINGS = GenerationSettings(max_new_tokens=8, min_new_tokens=8, temperature=0.0)


@pytest.fixture
def fast_path_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast_decode, "fast_path_reason", lambda *_args, **_kwargs: None)


def watched_run(tiny: LoadedModel, watch: RunWatch) -> list[list[str | None]]:
    direction = torch.randn(tiny.hidden_size, generator=torch.Generator().manual_seed(0)) * 2.0
    with watch.attached():
        watch.phase("generating")
        return generate_with_scales(tiny, PROMPTS, 1, direction, [0.0, 2.0], SETTINGS, progress=False).texts


@pytest.mark.usefixtures("fast_path_forced")
def test_watched_run_takes_the_decode_loop_and_reports_its_steps(
    tiny: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[RunProgress] = []
    watch = RunWatch(tiny, on_progress=seen.append, expected={"generating": 6, "max_new_tokens": 8}, every_s=0.0)
    with caplog.at_level(logging.INFO, logger="chunky_utils.generation"):
        texts = watched_run(tiny, watch)
    assert "generation: fast decode path" in caplog.text
    assert watch.decode_steps == 8 and watch.rows_decoded == 6
    assert [p.done for p in seen if p.stage == "generating"][-1] == 8
    layers = list(tiny.model.model.layers)
    assert not any(layer._forward_pre_hooks for layer in layers), "the watch's hooks are gone after the run"
    reading = RunWatch(tiny, read_layer=1)  # readings keep generation on transformers' generate
    assert watched_run(tiny, reading) == texts


@pytest.mark.usefixtures("fast_path_forced")
def test_stop_ends_the_decode_loop_within_a_step(tiny: LoadedModel) -> None:
    watch = RunWatch(tiny, expected={"generating": 6, "max_new_tokens": 8}, every_s=0.0)
    watch.on_progress = lambda progress: watch.stop.set() if watch.decode_steps >= 3 else None
    with pytest.raises(StopRequested):
        watched_run(tiny, watch)
    assert watch.decode_steps == 3


def test_readings_keep_generation_on_generate(tiny: LoadedModel, caplog: pytest.LogCaptureFixture) -> None:
    watch = RunWatch(tiny, read_layer=1, unit=torch.ones(tiny.hidden_size) / tiny.hidden_size**0.5)
    with caplog.at_level(logging.INFO, logger="chunky_utils.generation"):
        watched_run(tiny, watch)
    assert READINGS_NEED_HOOKS in caplog.text
    assert watch.row_readings(), "the steps were read through the hooks"


def test_observer_hooks_do_not_count_as_user_hooks(tiny: LoadedModel) -> None:
    layer = tiny.model.model.layers[0]
    watch = RunWatch(tiny)
    with watch.attached():
        assert layer._forward_pre_hooks and not user_hooks(layer)
        assert fast_decode.structure_reason(tiny.model) is None
