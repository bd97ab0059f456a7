"""GPU check of the decoding attention kernels on the 8B shape's cache (32 query heads, 8 kv heads, dim 128).

For the fast path's three buckets (112 x 640, 320 x 640, 24 x 512 slots, rows filled to random lengths
like 50-prompt runs' 300 to 514 slots), milliseconds per call and the key/value bytes read per second of:
the memory-efficient and flash kernels with per-row key lengths, and the split-key Triton kernel
(`chunky_utils.split_attention`) at its automatic split count and at fixed ones; each checked against
masked SDPA first, then timed as 50 calls captured in one CUDA graph (no Python launch cost, as in the
decode step). `python benchmarks/split_attention_gpu.py [--out DIR]`.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_lib import write_result  # noqa: E402
from chunky_utils.decode_runner import captured_ms  # noqa: E402
from chunky_utils.decode_step import cache_attention  # noqa: E402
from chunky_utils.split_attention import split_count, split_decode_attention  # noqa: E402

HEADS, KV_HEADS, DIM = 32, 8, 128


def bucket(rows: int, length: int, shortest: int, longest: int) -> dict[str, Any]:
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(rows)
    query = torch.randn(rows, HEADS, 1, DIM, device=device, dtype=torch.bfloat16, generator=generator)
    keys = torch.randn(rows, length, KV_HEADS, DIM, device=device, dtype=torch.bfloat16, generator=generator)
    values = torch.randn(rows, length, KV_HEADS, DIM, device=device, dtype=torch.bfloat16, generator=generator)
    lengths = torch.randint(shortest, longest + 1, (rows,), device=device, generator=generator)
    mask = (torch.arange(length, device=device)[None, :] < lengths[:, None])[:, None, None, :]
    reference = cache_attention(nn.Module(), query, keys, values, mask, scaling=DIM**-0.5)[0].float()
    read_gb = float(lengths.sum()) * KV_HEADS * DIM * 2 * 2 / 1e9
    starts = torch.arange(rows + 1, dtype=torch.int32, device=device)
    reads = {"kv_lengths": lengths.to(torch.int32), "cu_keys": starts * length}
    candidates: dict[str, Any] = {
        "sdpa_masked": lambda: cache_attention(nn.Module(), query, keys, values, mask, scaling=DIM**-0.5)[0],
        "efficient": lambda: cache_attention(
            nn.Module(),
            query,
            keys,
            values,
            None,
            scaling=DIM**-0.5,
            kernel="efficient",
            cu_queries=starts * (HEADS // KV_HEADS),
            **reads,
        )[0],
        "flash": lambda: cache_attention(
            nn.Module(), query, keys, values, None, scaling=DIM**-0.5, kernel="flash", cu_queries=starts, **reads
        )[0],
    }
    flat_query = query.reshape(rows, HEADS, DIM)
    lengths32 = lengths.to(torch.int32)
    auto = split_count(rows, KV_HEADS, length, torch.cuda.get_device_properties(device).multi_processor_count)
    for splits in sorted({1, 2, 3, 4, 6, 8, auto}):
        for warps in (4, 8):
            candidates[f"split_{splits}_w{warps}"] = lambda s=splits, w=warps: split_decode_attention(
                flat_query, keys, values, lengths32, DIM**-0.5, s, w
            )
    for splits in sorted({1, 2, auto}):  # slots per loop step and software-pipelining depth
        for block_keys, stages in itertools.product((32, 64, 128), (1, 2, 3, 4)):
            candidates[f"split_{splits}_w4_b{block_keys}_s{stages}"] = lambda s=splits, b=block_keys, g=stages: (
                split_decode_attention(flat_query, keys, values, lengths32, DIM**-0.5, s, 4, b, g)
            )
    results: dict[str, Any] = {"rows": rows, "length": length, "kv_gb": read_gb, "auto_splits": auto, "kernels": {}}
    for name, call in candidates.items():
        try:
            output = call().float().reshape(reference.shape)
        except Exception as exc:  # a kernel this torch lacks
            results["kernels"][name] = {"error": str(exc).splitlines()[0][:200]}
            continue
        error = float((output - reference).norm() / reference.norm())
        ms = captured_ms(call, repeats=50)
        results["kernels"][name] = {"ms": ms, "tb_per_s": read_gb / ms, "relative_error": error}
        print(f"{rows} x {length}: {name:16s} {ms:7.3f} ms  {read_gb / ms:5.2f} TB/s  error {error:.1e}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    report = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "buckets": [bucket(112, 640, 300, 514), bucket(320, 640, 300, 514), bucket(24, 512, 300, 501)],
    }
    write_result(args.out, "split_attention.json", report)


if __name__ == "__main__":
    main()
