"""The fast decode loop gives exactly transformers' `generate` tokens (eager, on the CPU); its buckets."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import pytest
import torch
from transformers import LogitsProcessorList

from chunky_utils import decode_runner, fast_decode
from chunky_utils.chat import format_prompts, left_pad, pad_token_id, tokenize_prompts
from chunky_utils.fast_decode import (
    ROW_BUCKETS,
    bucket_length,
    bucket_rows,
    fast_generate,
    fast_path_reason,
    last_run_info,
    structure_reason,
)
from chunky_utils.fused_projections import fuse_layers, fusion_reason
from chunky_utils.models import LoadedModel, build_tiny_model
from chunky_utils.sampling import SamplingSettings, SharedStreamProcessor, prompt_key
from chunky_utils.steering import add_to_layers

PROMPTS = ["Hi there", "Name a colour.", "Tell me a story about a brave little toaster who lives in a shed."]
GREEDY = SamplingSettings(temperature=0.0)
WARM = SamplingSettings(temperature=0.7, seed=3)


def prompt_ids(loaded: LoadedModel, prompts: Sequence[str] = PROMPTS) -> list[list[int]]:
    tokenizer = loaded.tokenizer
    return tokenize_prompts(tokenizer, format_prompts(tokenizer, prompts, add_generation_prompt=True))


def until(tokens: list[int], eos: Sequence[int]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in eos:
            return tokens[: index + 1]
    return tokens


@torch.inference_mode()
def reference(
    loaded: LoadedModel,
    token_ids: list[list[int]],
    row_prompts: list[int],
    layer_deltas: Mapping[int, torch.Tensor],
    positions: str,
    sampling: SamplingSettings,
    max_new: int,
    min_new: int,
    eos: list[int],
) -> list[list[int]]:
    """transformers' generate with the steering hooks and the shared-stream processor."""
    pad = pad_token_id(loaded.tokenizer)
    inputs = left_pad([token_ids[p] for p in row_prompts], pad, torch.device("cpu"))
    keys = [prompt_key(PROMPTS[p]) for p in row_prompts]
    processor = SharedStreamProcessor(sampling, keys, inputs["input_ids"].shape[1])
    with add_to_layers(loaded.model, layer_deltas, positions):
        output = loaded.model.generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            do_sample=False,
            max_new_tokens=max_new,
            min_new_tokens=min_new or None,
            pad_token_id=pad,
            eos_token_id=eos,
            logits_processor=LogitsProcessorList([processor]),
        )
    return [until(row, eos) for row in output[:, inputs["input_ids"].shape[1] :].tolist()]


def fast(loaded: LoadedModel, token_ids: list[list[int]], row_prompts: list[int], *rest: object, **kwargs: object):
    """fast_generate on the same arguments as `reference` (row keys from the prompts)."""
    keys = [prompt_key(PROMPTS[p]) for p in row_prompts]
    return fast_generate(loaded, token_ids, row_prompts, keys, *rest, **kwargs)  # type: ignore[arg-type]


def scaled_rows(loaded: LoadedModel, scales: Sequence[float], seed: int = 0) -> tuple[list[int], torch.Tensor]:
    """Rows: every prompt at every scale; deltas: scale x one random direction."""
    direction = torch.randn(loaded.hidden_size, generator=torch.Generator().manual_seed(seed)) * 2.0
    row_prompts = [p for p in range(len(PROMPTS)) for _ in scales]
    deltas = torch.stack([direction * s for _ in range(len(PROMPTS)) for s in scales])
    return row_prompts, deltas


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("positions", ["all", "generated"])
@pytest.mark.parametrize("sampling", [GREEDY, WARM], ids=["greedy", "t0.7"])
def test_fast_path_equals_generate(architecture: str, positions: str, sampling: SamplingSettings) -> None:
    loaded = build_tiny_model(architecture, n_layers=4, hidden_size=64, seed=1)
    token_ids = prompt_ids(loaded)
    row_prompts, deltas = scaled_rows(loaded, [0.0, 4.0, -3.0])
    args = (loaded, token_ids, row_prompts, {1: deltas}, positions, sampling, 16, 0, [loaded.tokenizer.eos_token_id])
    expected = reference(*args)
    assert fast(*args) == expected
    assert expected[0] != expected[1]  # the steering changes the text, so the check has teeth


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_prefill_in_chunks_with_rows_out_of_order_equals_generate(tiny: LoadedModel, positions: str) -> None:
    """A prefill of one chunk per prompt (8-token chunks), rows of a prompt scattered through the batch."""
    token_ids = prompt_ids(tiny)
    row_prompts = [2, 0, 1, 0, 2, 1, 2]
    direction = torch.randn(tiny.hidden_size, generator=torch.Generator().manual_seed(5)) * 2.0
    deltas = torch.stack([direction * scale for scale in (0.0, 3.0, -2.0, 0.0, 4.0, 1.0, -1.0)])
    args = (tiny, token_ids, row_prompts, {1: deltas}, positions, GREEDY, 8, 0, [])
    expected = reference(*args)
    assert fast(*args, max_batch_tokens=8) == expected
    assert fast(*args) == expected
    assert expected[0] != expected[4]  # rows of prompt 2 at different scales differ: the deltas reach them


def test_sampling_rows_of_a_prompt_share_noise_and_zero_deltas_match(tiny: LoadedModel) -> None:
    token_ids = prompt_ids(tiny)
    row_prompts, deltas = scaled_rows(tiny, [0.0, 0.0])
    tokens = fast(tiny, token_ids, row_prompts, {2: deltas}, "all", WARM, 12, 0, [])
    assert tokens[0] == tokens[1] and tokens[2] == tokens[3]
    assert all(len(row) == 12 for row in tokens)


# the tiny model's logits spread little (std about 0.15), so at temperature 0.7 the shared noise picks most
# tokens: greedy runs are the ones that catch a wrong activation
@pytest.mark.parametrize("sampling", [GREEDY, WARM], ids=["greedy", "t0.7"])
def test_several_steered_layers_equal_generate(tiny: LoadedModel, sampling: SamplingSettings) -> None:
    token_ids = prompt_ids(tiny)
    row_prompts, deltas = scaled_rows(tiny, [0.0, 3.0])
    layer_deltas = {0: deltas, 2: -deltas}
    args = (tiny, token_ids, row_prompts, layer_deltas, "all", sampling, 10, 0, [tiny.tokenizer.eos_token_id])
    assert fast(*args) == reference(*args)


def test_eos_and_min_new_tokens_equal_generate(tiny: LoadedModel) -> None:
    token_ids = prompt_ids(tiny)
    row_prompts, deltas = scaled_rows(tiny, [0.0, 2.0])
    free = reference(tiny, token_ids, row_prompts, {1: deltas}, "all", GREEDY, 12, 0, [])
    eos = [free[0][3], free[3][5]]  # tokens the rows do produce: some rows stop early
    for min_new in (0, 5):
        args = (tiny, token_ids, row_prompts, {1: deltas}, "all", GREEDY, 12, min_new, eos)
        expected = reference(*args)
        got = fast(*args)
        assert got == expected
        assert any(len(row) < 12 and row[-1] in eos for row in got)
        assert all(len(row) > min_new for row in got)


def test_top_k_and_top_p_equal_generate(tiny: LoadedModel) -> None:
    token_ids = prompt_ids(tiny)
    row_prompts, deltas = scaled_rows(tiny, [0.0, 2.0])
    for sampling in (SamplingSettings(1.3, top_k=5, seed=1), SamplingSettings(1.1, top_p=0.8, seed=2)):
        args = (tiny, token_ids, row_prompts, {1: deltas}, "generated", sampling, 10, 0, [])
        assert fast(*args) == reference(*args)


def test_single_token_prompt_and_unsteered_rows(tiny: LoadedModel) -> None:
    token_ids = [[5], *prompt_ids(tiny)[1:]]
    row_prompts = [0, 1, 2]
    args = (tiny, token_ids, row_prompts, {}, "all", GREEDY, 8, 0, [])
    assert fast(*args) == reference(*args)


def test_stop_event_and_bad_arguments(tiny: LoadedModel) -> None:
    token_ids = prompt_ids(tiny)
    stop = threading.Event()
    stop.set()
    assert fast(tiny, token_ids, [0, 1], {}, "all", GREEDY, 8, 0, [], stop_event=stop) == [[], []]
    with pytest.raises(ValueError, match="deltas have shape"):
        fast(tiny, token_ids, [0, 1], {1: torch.zeros(3, 64)}, "all", GREEDY, 8, 0, [])
    with pytest.raises(ValueError, match="out of range"):
        fast(tiny, token_ids, [0], {9: torch.zeros(1, 64)}, "all", GREEDY, 8, 0, [])
    with pytest.raises(ValueError, match="positions"):
        fast(tiny, token_ids, [0], {}, "prompt", GREEDY, 8, 0, [])


def test_run_info_reports_buckets(tiny: LoadedModel) -> None:
    token_ids = prompt_ids(tiny)
    fast(tiny, token_ids, [0, 1, 2], {}, "all", GREEDY, 5, 5, [])
    info = last_run_info()
    longest = max(len(ids) for ids in token_ids) - 1
    assert (info.rows, info.bucket_rows, info.steps, info.width) == (3, 4, 5, longest)
    assert info.bucket_length == bucket_length(longest + 5) and info.mode == "eager"


def test_buckets_are_few_and_cover_every_size() -> None:
    for rows in range(1, 1200):
        bucket = bucket_rows(rows)
        assert bucket >= rows and (bucket in ROW_BUCKETS or bucket % 128 == 0)
        assert bucket <= 2 * rows and (rows < 16 or bucket <= rows * 1.5)
    assert len({bucket_rows(rows) for rows in range(1, 513)}) == len(ROW_BUCKETS)
    assert [bucket_rows(n) for n in (1, 3, 20, 100, 300, 600)] == [1, 4, 24, 112, 320, 640]
    lengths = {bucket_length(n) for n in range(1, 1025)}
    assert lengths == {128 * k for k in range(1, 9)}
    assert bucket_length(1025) == 1536 and bucket_length(4000) == 4096
    for bad in (0, -1):
        with pytest.raises(ValueError):
            bucket_rows(bad)
        with pytest.raises(ValueError):
            bucket_length(bad)


def test_fast_path_reason_says_why_not(tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    class Settings:
        cache_implementation = None
        positions = "all"

    assert "cpu" in (fast_path_reason(tiny, Settings()) or "")
    assert structure_reason(tiny.model) is None
    gpt2 = build_tiny_model("gpt2", n_layers=2, hidden_size=32)
    assert "gpt2" in (structure_reason(gpt2.model) or "")
    Settings.cache_implementation = "static"
    assert "static" in (fast_path_reason(tiny, Settings()) or "")
    monkeypatch.setenv("CHUNKY_FAST_DECODE", "0")
    assert "CHUNKY_FAST_DECODE" in (fast_path_reason(tiny) or "")
    with add_to_layers(tiny.model, {1: torch.zeros(64)}):
        assert "hooks" in (structure_reason(tiny.model) or "")
        with pytest.raises(ValueError, match="hooks"):
            fast(tiny, prompt_ids(tiny), [0], {}, "all", GREEDY, 2, 0, [])


def test_in_graph_noise_is_the_shared_stream() -> None:
    """The table-driven noise of the captured step equals sampling.gumbel_noise."""
    from chunky_utils.sampling import _gumbel_from_bits, _mix32, _token_offsets, gumbel_noise, row_states

    keys = torch.tensor([prompt_key(p) for p in PROMPTS])
    table = row_states(7, keys, torch.arange(6)[:, None])
    offsets = _token_offsets(torch.arange(300))
    for step in (0, 5):
        noise = _gumbel_from_bits(_mix32(table[step][:, None] ^ offsets[None, :]))
        assert torch.equal(noise, gumbel_noise(7, keys, step, 300))
    fast_decode.release(build_tiny_model("llama", n_layers=1, hidden_size=32).model)  # no state: a no-op


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_generate_with_scales_takes_the_fast_path_when_it_applies(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, temperature: float
) -> None:
    """Wiring: with the fast path declared usable (here on the CPU, eagerly), the texts are the generate path's."""
    import logging

    from chunky_utils import fast_decode
    from chunky_utils.generation import GenerationSettings, generate_with_scales

    prompts = ["Hi there", "Name a colour.", "Tell me a story about a brave little toaster."]
    direction = torch.randn(tiny.hidden_size, generator=torch.Generator().manual_seed(3)) * 3
    settings = GenerationSettings(max_new_tokens=8, temperature=temperature, seed=1)
    plain = generate_with_scales(tiny, prompts, 1, direction, [0.0, 2.0], settings, progress=False)
    monkeypatch.setattr(fast_decode, "fast_path_reason", lambda loaded, settings=None: None)
    with caplog.at_level(logging.INFO, logger="chunky_utils.generation"):
        fast = generate_with_scales(tiny, prompts, 1, direction, [0.0, 2.0], settings, progress=False)
    assert "fast decode path" in caplog.text
    assert fast.texts == plain.texts


def tiny_with_head_norms() -> LoadedModel:
    """A tiny random Qwen3 (per-head query and key norms), with the tiny models' tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = build_tiny_model("qwen2")
    sizes = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2}
    sizes |= {"intermediate_size": 128, "head_dim": 16, "max_position_embeddings": 2048}
    config = AutoConfig.for_model("qwen3", **sizes, vocab_size=len(base.tokenizer))
    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms away from 1, so a skipped or misplaced norm changes the tokens
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    model.generation_config.pad_token_id = base.tokenizer.pad_token_id
    return LoadedModel(model=model, tokenizer=base.tokenizer, name="tiny-qwen3", fingerprint="tiny-qwen3")


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("sampling", [GREEDY, WARM], ids=["greedy", "t0.7"])
def test_fused_products_give_generate_tokens(architecture: str, sampling: SamplingSettings) -> None:
    loaded = tiny_with_head_norms() if architecture == "qwen3" else build_tiny_model(architecture, seed=2)
    parts = decode_runner.runner_for(loaded.model).parts
    parts.fused = fuse_layers(parts.layers, force=True)
    assert parts.fused is not None
    token_ids = prompt_ids(loaded)
    row_prompts, deltas = scaled_rows(loaded, [0.0, 3.0])
    args = (loaded, token_ids, row_prompts, {1: deltas}, "all", sampling, 12, 0, [loaded.tokenizer.eos_token_id])
    try:
        assert fast(*args) == reference(*args)
    finally:
        fast_decode.release(loaded.model)


def test_fusion_is_automatic_on_a_gpu_only_and_declines_odd_layers(tiny: LoadedModel) -> None:
    layers = list(tiny.model.model.layers)
    assert fuse_layers(layers) is None  # on the CPU: stepping through the modules
    assert fusion_reason(layers) is None
    layers[0].mlp.gate_proj.bias = torch.nn.Parameter(torch.zeros(layers[0].mlp.gate_proj.out_features))
    assert fusion_reason(layers) == "the MLP has biases"
