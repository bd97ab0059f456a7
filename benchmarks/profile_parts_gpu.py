"""Diagnostic: which kernels the GPU spends prefill, extraction and a decoding step on (random 8B shape).

Each part runs once to compile and capture, then once under torch.profiler; the table lists the top kernels
by GPU time and how much of the wall time the GPU was busy. `python benchmarks/profile_parts_gpu.py [--out DIR]`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_lib import write_result  # noqa: E402
from benchmarks.run_gpu import build_random_llama8b, fast_rows, make_prompts, profile_fast_step  # noqa: E402
from chunky_utils import decode_runner, fast_decode  # noqa: E402
from chunky_utils.activations import extract_last_token_activations, extract_prompt_sets  # noqa: E402
from chunky_utils.decode_prefill import routed_attention_function  # noqa: E402
from chunky_utils.packed_extraction import routed_attention  # noqa: E402


def kernel_table(run: Callable[[], Any], top: int = 14, trace: Path | None = None) -> dict[str, Any]:
    """Wall seconds of one run, GPU busy seconds, and the top kernels (ms, calls) under the profiler;
    `trace` (a .json.gz path) keeps the timeline with Python stacks, for finding where the GPU waits."""
    from torch.profiler import ProfilerActivity, profile

    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=trace is not None) as prof:
        started = time.perf_counter()
        run()
        torch.cuda.synchronize()
        wall = time.perf_counter() - started
    kernels: dict[str, list[float]] = {}
    for event in prof.events():
        if getattr(event, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        entry = kernels.setdefault(event.name[:90], [0.0, 0])
        entry[0] += event.device_time / 1000
        entry[1] += 1
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    busy = sum(ms for ms, _ in kernels.values()) / 1000
    ranked = sorted(kernels.items(), key=lambda item: -item[1][0])[:top]
    return {"wall_s": wall, "gpu_busy_s": busy, "kernels_ms_calls": [[name, ms, n] for name, (ms, n) in ranked]}


def show(title: str, table: dict[str, Any]) -> None:
    print(f"\n== {title}: wall {table['wall_s']:.3f} s, GPU busy {table['gpu_busy_s']:.3f} s", flush=True)
    for name, ms, calls in table["kernels_ms_calls"]:
        print(f"{ms:9.2f} ms {calls:6d}x  {name}", flush=True)


def step(rows: int, length: int) -> None:
    """Five decoding steps of the compiled step, uncaptured (so the profiler names each kernel)."""
    model = LOADED[0].model
    runner = decode_runner.runner_for(model)
    state = runner.state(fast_decode.bucket_rows(rows), length)
    with torch.inference_mode(), routed_attention(model, fast_decode.FAST_ATTENTION, routed_attention_function):
        for _ in range(5):
            state.buffers["positions"].fill_(300)
            runner.run_step(state, (True, 0, 1.0))


LOADED: list[Any] = []


def host_phases(loaded: Any, prompts: list[str]) -> dict[str, float]:
    """Milliseconds of each host-side phase of one extraction (median of 5), and of the whole call."""
    from chunky_utils.chat import format_prompts, tokenize_prompts
    from chunky_utils.packed_extraction import extract_packed, packing_reason

    phases: dict[str, list[float]] = {}

    def timed(name: str, call: Callable[[], Any]) -> Any:
        torch.cuda.synchronize()
        started = time.perf_counter()
        value = call()
        torch.cuda.synchronize()
        phases.setdefault(name, []).append(1000 * (time.perf_counter() - started))
        return value

    for _ in range(5):
        texts = timed("format_prompts", lambda: format_prompts(loaded.tokenizer, prompts))
        ids = timed("tokenize_prompts", lambda t=texts: tokenize_prompts(loaded.tokenizer, t))
        timed("packing_reason", lambda: packing_reason(loaded.model))
        timed("extract_packed", lambda i=ids: extract_packed(loaded.model, i, [16], 32768))
        timed(
            "whole call",
            lambda: extract_last_token_activations(
                loaded.model, loaded.tokenizer, prompts, [16], batch_size=64, max_batch_tokens=32768, progress=False
            ),
        )
    return {name: sorted(values)[2] for name, values in phases.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    loaded = build_random_llama8b("cuda:0")
    LOADED.append(loaded)
    prompts = make_prompts(50, 50, 400, seed=1)
    vector_prompts = make_prompts(200, 50, 400, seed=0)
    torch.manual_seed(0)
    vector = torch.randn(loaded.hidden_size) * 2.0
    five = [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]
    result: dict[str, Any] = {}

    def extraction() -> None:
        extract_prompt_sets(
            loaded.model,
            loaded.tokenizer,
            [vector_prompts[:100], vector_prompts[100:]],
            [16],
            batch_size=64,
            max_batch_tokens=32768,
            progress=False,
        )

    parts: dict[str, Callable[[], Any]] = {
        "extraction 2 x 100 prompts, layer 16": extraction,
        "prefill + 1 step, 50 prompts x 6 rows": lambda: fast_rows(loaded, prompts, vector, five, 1),
        "prefill + 1 step, 10 prompts x 2 rows": lambda: fast_rows(loaded, prompts[:10], vector, [0.0, 2.0], 1),
    }
    result["extraction host phases, ms"] = host_phases(loaded, vector_prompts[:100])
    print("extraction host phases, ms:", result["extraction host phases, ms"], flush=True)
    for index, (title, run) in enumerate(parts.items()):
        trace = None if args.out is None else args.out / f"trace_{index}.json.gz"
        result[title] = kernel_table(run, trace=trace)
        show(title, result[title])
    for count, scales in ((10, [0.0, 2.0]), (50, five)):
        fast_rows(loaded, prompts[:count], vector, scales, 100)
        info = fast_decode.last_run_info()
        title = f"decode step, {info.rows} rows (bucket {info.bucket_rows} x {info.bucket_length})"
        kinds = profile_fast_step(loaded, info.rows, info.bucket_length)
        result[title] = {"step_ms_captured": info.step_ms, "uncaptured_gpu_ms_by_kind": kinds}
        result[title]["five_uncaptured_steps"] = kernel_table(lambda i=info: step(i.rows, i.bucket_length), top=24)
        show(title + ", 5 uncaptured steps", result[title]["five_uncaptured_steps"])
        print(f"\n== {title}: captured {info.step_ms:.2f} ms/step; GPU ms by kind {kinds}", flush=True)
    write_result(args.out, "profile_parts.json", result)


if __name__ == "__main__":
    main()
