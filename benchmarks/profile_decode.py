"""Diagnostic: where decoding time goes on the GPU.

`times` / `profile`: plain transformers generate at 50 vs 100 rows. `fast`: the fast decode path
(chunky_utils.fast_decode) at 20, 100 and 300 rows: ms per step and GPU time per step by kernel kind.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_lib import side_by_side  # noqa: E402
from benchmarks.run_gpu import (  # noqa: E402
    build_random_llama8b,
    fast_rows,
    make_prompts,
    plain_generate,
    profile_fast_step,
)
from chunky_utils import fast_decode  # noqa: E402


def main() -> None:
    loaded = build_random_llama8b("cuda:0")
    prompts = make_prompts(50, 50, 400, seed=1)

    def gen(rows: int, tokens: int = 100, **kwargs: object):
        chosen = (prompts * 2)[:rows]
        return lambda: plain_generate(loaded, chosen, tokens, **kwargs)

    mode = sys.argv[1] if len(sys.argv) > 1 else "times"
    if mode == "fast":
        vector = torch.randn(loaded.hidden_size) * 2.0
        for count, scales in ((10, [0.0, 2.0]), (50, [0.0, 2.0]), (50, [0.0, 0.5, 1.0, 2.0, 4.0, 8.0])):
            for _ in range(2):  # the first call compiles and captures
                fast_rows(loaded, prompts[:count], vector, scales, 100)
            info = fast_decode.last_run_info()
            kinds = profile_fast_step(loaded, info.rows, info.bucket_length)
            by_kind = ", ".join(f"{kind} {ms:.2f}" for kind, ms in sorted(kinds.items(), key=lambda item: -item[1]))
            print(f"{info.rows} rows: prefill {info.prefill_s:.3f} s, {info.step_ms:.2f} ms/step; GPU ms: {by_kind}")
    elif mode == "times":
        times = side_by_side(
            {
                "b50_t100": gen(50),
                "b100_t100": gen(100),
                "b50_t1": gen(50, 1),
                "b100_t1": gen(100, 1),
                "b50_static": gen(50, cache_implementation="static", disable_compile=True),
                "b100_static": gen(100, cache_implementation="static", disable_compile=True),
            },
            2,
        )
        for name, value in times.items():
            print(f"{name}: {value:.3f} s", flush=True)
        for b in (50, 100):
            decode = times[f"b{b}_t100"] - times[f"b{b}_t1"]
            prefill = times[f"b{b}_t1"]
            print(f"rows {b}: prefill {prefill:.3f} s, decode 99 steps {decode:.3f} s = {decode / 0.099:.1f} ms/step")
    else:
        from torch.profiler import ProfilerActivity, profile

        run = gen(100, 20)
        run()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
