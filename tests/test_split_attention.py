"""The split-key decoding attention (Triton, run by its interpreter on the CPU) equals masked attention,
and the fast path stepping with it gives transformers' `generate` tokens."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from chunky_utils import decode_runner, decode_step, fast_decode
from chunky_utils.decode_step import cache_attention
from chunky_utils.fused_projections import fuse_layers
from chunky_utils.models import build_tiny_model
from chunky_utils.split_attention import MIN_KEYS_PER_SPLIT, split_count, split_decode_attention
from tests.test_fast_decode import GREEDY, WARM, fast, prompt_ids, reference, scaled_rows

pytest.importorskip("triton")  # tests/conftest.py chose its interpreter, so the kernels run on the CPU


def masked_reference(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """Softmax attention of query [rows, heads, dim] over each row's first `lengths[r]` slots, in fp64."""
    rows, heads, dim = query.shape
    groups = heads // keys.shape[2]
    expanded_keys = keys.double().repeat_interleave(groups, dim=2).permute(0, 2, 3, 1)
    expanded_values = values.double().repeat_interleave(groups, dim=2).permute(0, 2, 1, 3)
    scores = (query.double()[:, :, None, :] @ expanded_keys)[:, :, 0] * dim**-0.5
    filled = torch.arange(keys.shape[1])[None, :] < lengths[:, None]
    weights = scores.masked_fill(~filled[:, None, :], float("-inf")).softmax(-1)
    return (weights[:, :, None, :] @ expanded_values)[:, :, 0]


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(8, 2, 64), (4, 4, 32), (6, 2, 48)])
@pytest.mark.parametrize("splits", [1, 3, None])
def test_split_attention_equals_masked_softmax(heads: int, kv_heads: int, dim: int, splits: int | None) -> None:
    generator = torch.Generator().manual_seed(heads * dim)
    rows, length = 5, 300
    query = torch.randn(rows, heads, dim, generator=generator)
    keys = torch.randn(rows, length, kv_heads, dim, generator=generator)
    values = torch.randn(rows, length, kv_heads, dim, generator=generator)
    lengths = torch.tensor([1, length, 129, 64, 200], dtype=torch.int32)
    keys[0, 1:] = 1e4  # slots past a row's length must not be read
    output = split_decode_attention(query, keys, values, lengths, dim**-0.5, splits)
    assert output.shape == (rows, heads, dim) and output.dtype == query.dtype
    torch.testing.assert_close(output.double(), masked_reference(query, keys, values, lengths), rtol=1e-5, atol=1e-5)


def test_cache_attention_split_kernel_equals_its_sdpa_branch() -> None:
    generator = torch.Generator().manual_seed(0)
    rows, heads, kv_heads, dim, length = 4, 8, 2, 32, 256
    query = torch.randn(rows, heads, 1, dim, generator=generator)
    keys = torch.randn(rows, length, kv_heads, dim, generator=generator)
    values = torch.randn(rows, length, kv_heads, dim, generator=generator)
    lengths = torch.tensor([3, 256, 100, 17])
    mask = (torch.arange(length)[None, :] < lengths[:, None])[:, None, None, :]
    expected, _ = cache_attention(nn.Module(), query, keys, values, mask, scaling=0.2)
    reads = {"kv_lengths": lengths.to(torch.int32), "kernel": "split"}
    output, _ = cache_attention(nn.Module(), query, keys, values, None, scaling=0.2, **reads)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)


def test_split_count_fills_the_gpu_without_tiny_splits() -> None:
    assert split_count(rows=112, kv_heads=8, length=640, processors=132) == 1  # 896 programs already
    assert split_count(rows=24, kv_heads=8, length=512, processors=132) == 2
    assert split_count(rows=1, kv_heads=8, length=4096, processors=132) == 32
    assert split_count(rows=512, kv_heads=8, length=4096, processors=132) == 1
    assert split_count(rows=1, kv_heads=1, length=100, processors=132) == 1
    for rows in (1, 7, 64, 300):
        splits = split_count(rows, 8, 2048, 132)
        assert splits == 1 or 2048 // splits >= MIN_KEYS_PER_SPLIT


@pytest.mark.parametrize(("fused", "sampling"), [(False, GREEDY), (True, WARM)], ids=["modules-greedy", "fused-t0.7"])
def test_fast_path_with_split_attention_gives_generate_tokens(
    fused: bool, sampling: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return split_decode_attention(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(decode_step, "split_decode_attention", counted)
    loaded = build_tiny_model("llama", n_layers=2, hidden_size=64, seed=4)
    runner = decode_runner.runner_for(loaded.model)
    runner.kernel = "split"
    runner.parts.fused = fuse_layers(runner.parts.layers, force=True) if fused else None
    token_ids = prompt_ids(loaded)
    row_prompts, deltas = scaled_rows(loaded, [0.0, 3.0])
    args = (loaded, token_ids, row_prompts, {1: deltas}, "all", sampling, 10, 0, [loaded.tokenizer.eos_token_id])
    try:
        assert fast(*args) == reference(*args)
        assert runner.kernel == "split" and len(calls) >= 2 * 9  # both layers, every step after the first token
    finally:
        fast_decode.release(loaded.model)
