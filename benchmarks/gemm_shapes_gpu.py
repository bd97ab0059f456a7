"""GPU diagnostic: how close each product of the 8B shape's one-token step comes to the copy bandwidth.

For 24, 112 and 320 rows and each weight of a fused Llama-3.1-8B layer (q|k|v, o, gate|up, down) and
the lm_head: milliseconds per product and weight bytes read per second, with `F.linear` as the step runs
it and with the reduction split into S chunks (a batched product and a sum), which gives a wide-and-short
product more thread blocks. Timed as 50 products captured in one CUDA graph.
`python benchmarks/gemm_shapes_gpu.py [--out DIR]`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as functional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_lib import write_result  # noqa: E402
from chunky_utils.decode_runner import captured_ms  # noqa: E402

SHAPES = {
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
}


def split_reduction(inputs: torch.Tensor, weight: torch.Tensor, splits: int) -> torch.Tensor:
    rows, width = inputs.shape
    chunk = width // splits
    parts = torch.bmm(inputs.view(rows, splits, chunk).transpose(0, 1), weight.t().reshape(splits, chunk, -1))
    return parts.sum(0, dtype=torch.float32).to(inputs.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "rows": {}}
    for rows in (24, 112, 320):
        report["rows"][rows] = {}
        for name, (out_features, in_features) in SHAPES.items():
            weight = torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16)
            inputs = torch.randn(rows, in_features, device=device, dtype=torch.bfloat16)
            gigabytes = weight.numel() * 2 / 1e9
            reference = functional.linear(inputs, weight).float()
            entry: dict[str, Any] = {}
            variants = {"linear": lambda x=inputs, w=weight: functional.linear(x, w)}
            for splits in (2, 4, 8):
                variants[f"split_{splits}"] = lambda x=inputs, w=weight, s=splits: split_reduction(x, w, s)
            for variant, call in variants.items():
                error = float((call().float() - reference).norm() / reference.norm())
                ms = captured_ms(call, repeats=50)
                entry[variant] = {"ms": ms, "tb_per_s": gigabytes / ms, "relative_error": error}
            report["rows"][rows][name] = entry
            line = "  ".join(f"{v} {e['ms']:.3f} ms {e['tb_per_s']:.2f} TB/s" for v, e in entry.items())
            print(f"{rows:4d} rows {name:8s} {line}", flush=True)
    write_result(args.out, "gemm_shapes.json", report)


if __name__ == "__main__":
    main()
