"""Split-key decoding attention (flash-decoding) for the fast path's [rows, length, kv heads, dim] cache.

One query token per row. Each program takes one (row, kv head, split of the row's filled slots, the splits
of equal size whatever the row's length): it reads
that stretch of keys and values once for all query heads sharing the kv head, and writes a partial
output with its log-sum-exp; a second kernel merges a row's splits (with one split the first kernel
writes the answer itself). Several programs per row keep every SM streaming the cache where one program
per (row, kv head) would walk all its keys alone. Written in Triton and loaded only when called: a GPU
with Triton runs it compiled, and with `TRITON_INTERPRET=1` set before triton is imported it runs on CPU
tensors (how the tests check it). The fast path uses it only where it agrees with SDPA and is the
fastest length-aware kernel (`chunky_utils.decode_runner`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

BLOCK_KEYS = 64
MIN_KEYS_PER_SPLIT = 128
PROGRAMS_PER_SM = 2  # measured on an H200: 1-2 splits per (row, kv head) beat more (merge cost)


def split_count(rows: int, kv_heads: int, length: int, processors: int) -> int:
    """Splits per (row, kv head): enough programs to fill the GPU, each at least MIN_KEYS_PER_SPLIT slots."""
    wanted = -(-PROGRAMS_PER_SM * processors // max(1, rows * kv_heads))
    most = max(1, length // MIN_KEYS_PER_SPLIT)
    return max(1, min(wanted, most))


@functools.cache
def _processors(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return 4


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """The two Triton kernels, defined on first use (so importing this module needs no Triton)."""
    import triton
    import triton.language as tl

    @triton.jit
    def split_attention_partial(
        query,
        keys,
        values,
        lengths,
        partial_out,
        partial_lse,
        output,
        scale,
        length,
        groups: tl.constexpr,
        splits: tl.constexpr,
        dim: tl.constexpr,
        block_groups: tl.constexpr,
        block_dim: tl.constexpr,
        block_keys: tl.constexpr,
        precision: tl.constexpr,
        single: tl.constexpr,
    ):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        kv_heads = tl.num_programs(1)
        slot_stride = kv_heads * dim  # contiguous [rows, length, kv heads, dim] keys and values
        row_stride = length * slot_stride
        filled = tl.load(lengths + row)
        keys_per_split = tl.cdiv(tl.cdiv(filled, splits), block_keys) * block_keys  # this row's slots, evenly
        start = split * keys_per_split
        end = tl.minimum(start + keys_per_split, filled)
        group = tl.arange(0, block_groups)
        feature = tl.arange(0, block_dim)
        head = kv_head * groups + group
        group_ok = group < groups
        feature_ok = feature < dim
        q = tl.load(
            query + (row * groups * kv_heads + head[:, None]) * dim + feature[None, :],
            mask=group_ok[:, None] & feature_ok[None, :],
            other=0.0,
        )
        best = tl.full([block_groups], float("-inf"), tl.float32)
        total = tl.zeros([block_groups], tl.float32)
        acc = tl.zeros([block_groups, block_dim], tl.float32)
        for first in range(start, end, block_keys):
            slot = first + tl.arange(0, block_keys)
            slot_ok = slot < end
            k = tl.load(
                keys + row * row_stride + slot[:, None] * slot_stride + kv_head * dim + feature[None, :],
                mask=slot_ok[:, None] & feature_ok[None, :],
                other=0.0,
            )
            scores = tl.dot(q, tl.trans(k), input_precision=precision).to(tl.float32) * scale
            scores = tl.where(slot_ok[None, :], scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, axis=1))
            correction = tl.exp(best - new_best)
            weights = tl.exp(scores - new_best[:, None])
            v = tl.load(
                values + row * row_stride + slot[:, None] * slot_stride + kv_head * dim + feature[None, :],
                mask=slot_ok[:, None] & feature_ok[None, :],
                other=0.0,
            )
            acc = acc * correction[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=precision).to(tl.float32)
            total = total * correction + tl.sum(weights, axis=1)
            best = new_best
        has_keys = total > 0
        out = acc / tl.where(has_keys, total, 1.0)[:, None]
        lse = tl.where(has_keys, best + tl.log(tl.where(has_keys, total, 1.0)), float("-inf"))
        written = group_ok[:, None] & feature_ok[None, :]
        if single:  # one split: this is the answer, no merge
            at = row * groups * kv_heads + head
            tl.store(output + at[:, None] * dim + feature[None, :], out.to(output.dtype.element_ty), mask=written)
        else:
            at = (row * groups * kv_heads + head) * splits + split
            tl.store(partial_lse + at, lse, mask=group_ok)
            tl.store(partial_out + at[:, None] * dim + feature[None, :], out, mask=written)

    @triton.jit
    def split_attention_merge(
        partial_out,
        partial_lse,
        output,
        splits: tl.constexpr,
        dim: tl.constexpr,
        block_splits: tl.constexpr,
        block_dim: tl.constexpr,
    ):
        row_head = tl.program_id(0)
        split = tl.arange(0, block_splits)
        feature = tl.arange(0, block_dim)
        split_ok = split < splits
        feature_ok = feature < dim
        lse = tl.load(partial_lse + row_head * splits + split, mask=split_ok, other=float("-inf"))
        best = tl.max(lse, axis=0)
        weights = tl.where(split_ok & (lse > float("-inf")), tl.exp(lse - best), 0.0)
        parts = tl.load(
            partial_out + (row_head * splits + split)[:, None] * dim + feature[None, :],
            mask=split_ok[:, None] & feature_ok[None, :],
            other=0.0,
        )
        merged = tl.sum(parts * weights[:, None], axis=0) / tl.sum(weights, axis=0)
        tl.store(output + row_head * dim + feature, merged.to(output.dtype.element_ty), mask=feature_ok)

    return split_attention_partial, split_attention_merge


@torch.compiler.disable  # a compiled step calls it as it is (the CUDA graph captures its launches)
def split_decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    splits: int | None = None,
    warps: int = 4,
    block_keys: int = BLOCK_KEYS,
    stages: int | None = None,
) -> torch.Tensor:
    """Attention of query [rows, heads, dim] over each row's first `lengths[r]` slots of keys/values
    [rows, length, kv heads, dim]; returns [rows, heads, dim] in the query's dtype. `splits`, `warps`,
    `block_keys` (slots per loop step) and `stages` (Triton's software pipelining) tune the launch."""
    import triton

    rows, heads, dim = query.shape
    length, kv_heads = keys.shape[1], keys.shape[2]
    groups = heads // kv_heads
    if splits is None:
        splits = split_count(rows, kv_heads, length, _processors(query.device))
    if not (keys.is_contiguous() and values.is_contiguous()):
        raise ValueError("split_decode_attention needs contiguous keys and values")
    query = query.contiguous()
    partial_kernel, merge_kernel = _kernels()
    output = torch.empty(rows, heads, dim, dtype=query.dtype, device=query.device)
    if splits == 1:
        partial_out, partial_lse = output, output  # not written
    else:
        partial_out = torch.empty(rows, heads, splits, dim, dtype=torch.float32, device=query.device)
        partial_lse = torch.empty(rows, heads, splits, dtype=torch.float32, device=query.device)
    block_dim = triton.next_power_of_2(dim)
    partial_kernel[(rows, kv_heads, splits)](
        query,
        keys,
        values,
        lengths,
        partial_out,
        partial_lse,
        output,
        float(scale),
        length,
        groups=groups,
        splits=splits,
        dim=dim,
        block_groups=max(16, triton.next_power_of_2(groups)),
        block_dim=block_dim,
        block_keys=block_keys,
        precision="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=warps,
        single=splits == 1,
        **({} if stages is None else {"num_stages": stages}),
    )
    if splits == 1:
        return output
    merge_kernel[(rows * heads,)](
        partial_out,
        partial_lse,
        output,
        splits=splits,
        dim=dim,
        block_splits=triton.next_power_of_2(splits),
        block_dim=block_dim,
    )
    return output
