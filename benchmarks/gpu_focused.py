"""Two short GPU checks of the fast decode path, each well inside one device call (random Llama-3.1-8B shape).

- `times`: plain `generate` and the fast path's three target rows (50 prompts x 100 tokens baseline +
  steered, the same with 5 scales, 10 prompts baseline + steered), medians of 3 interleaved repeats after
  a warm-up that compiles and captures.
- `agreement`: greedy token ids of the fast path against transformers' `generate` (steering hooks,
  shared-stream processor), 50 prompts x 2 rows x 100 tokens; `--dtype float32` runs both on an fp32
  model with TF32 off, which separates the path's own differences from bf16 rounding.

- `chunks`: the fast path's two 50-prompt runs with the prefill packed in chunks of 16k, 32k and 64k row
  tokens, side by side.
- `watch`: the playground's watched run (`instrument.RunWatch`) on the GPU decode loop: the loop is taken,
  every step reaches the progress callback, and a stop set after step 10 ends the loop there; and a zero
  vector at temperature 0.7 gives baseline texts identical to the steered ones.

`python benchmarks/gpu_focused.py times|agreement|watch|chunks [--dtype float32] [--out DIR]`; `run_gpu.py` has the
full table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_lib import side_by_side, write_result  # noqa: E402
from benchmarks.run_gpu import (  # noqa: E402
    GREEDY,
    agreement,
    build_random_llama8b,
    eager_rows,
    fast_rows,
    make_prompts,
    plain_generate,
)
from chunky_utils import fast_decode  # noqa: E402

NEW_TOKENS = 100


def timings(loaded: Any, prompts: list[str], vector: torch.Tensor) -> dict[str, Any]:
    """Median seconds of plain generate and of the fast path's three target rows, side by side."""
    runs: dict[str, list[dict[str, Any]]] = {}

    def fast(name: str, chosen: list[str], scales: list[float]) -> Any:
        def run() -> None:
            fast_rows(loaded, chosen, vector, scales, NEW_TOKENS)
            runs.setdefault(name, []).append(asdict(fast_decode.last_run_info()))

        return run

    candidates = {
        "plain_generate": lambda: plain_generate(loaded, prompts, NEW_TOKENS),
        "fast_baseline+steered": fast("fast_baseline+steered", prompts, [0.0, 2.0]),
        "fast_baseline+5_scales": fast("fast_baseline+5_scales", prompts, [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]),
        "fast_baseline+steered_10_prompts": fast("fast_baseline+steered_10_prompts", prompts[:10], [0.0, 2.0]),
    }
    for name in list(candidates)[1:]:  # compile and capture outside the timed runs
        candidates[name]()
    times = side_by_side(candidates, 3)
    ratio = times["fast_baseline+steered"] / times["plain_generate"]
    return {"times_s": times, "ratio_steered_to_plain": ratio, "runs": runs}


def prefill_chunks(loaded: Any, prompts: list[str], vector: torch.Tensor) -> dict[str, Any]:
    """The fast path's runs with the prefill packed in chunks of 16k (the default), 32k and 64k row tokens."""
    runs: dict[str, list[dict[str, Any]]] = {}

    def fast(name: str, scales: list[float], chunk: int) -> Any:
        def run() -> None:
            fast_rows(loaded, prompts, vector, scales, NEW_TOKENS, max_batch_tokens=chunk)
            runs.setdefault(name, []).append(asdict(fast_decode.last_run_info()))

        return run

    candidates = {
        f"{label}_chunk_{chunk}": fast(f"{label}_chunk_{chunk}", scales, chunk)
        for label, scales in (("baseline+steered", [0.0, 2.0]), ("baseline+5_scales", [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]))
        for chunk in (16384, 32768, 65536)
    }
    for run in candidates.values():  # compile and capture outside the timed runs
        run()
    return {"times_s": side_by_side(candidates, 3), "runs": runs}


def greedy_agreement(loaded: Any, prompts: list[str], vector: torch.Tensor) -> dict[str, Any]:
    """Share of rows whose greedy token ids are the same from both paths, and where the others part."""
    reference = eager_rows(loaded, prompts, vector, [0.0, 2.0], NEW_TOKENS, GREEDY)
    fast = fast_rows(loaded, prompts, vector, [0.0, 2.0], NEW_TOKENS)
    share, detail = agreement(fast, reference)
    return {"fast_vs_generate": [share, detail], "fast_run": asdict(fast_decode.last_run_info())}


def watched_runs(loaded: Any, prompts: list[str], vector: torch.Tensor) -> dict[str, Any]:
    """A watched run to the end and one stopped after 10 steps, as the playground runs them (4 prompts x 2 rows)."""
    from chunky_utils.errors import StopRequested
    from chunky_utils.generation import GenerationSettings, generate_with_scales
    from chunky_utils.instrument.watch import RunWatch

    settings = GenerationSettings(max_new_tokens=50, min_new_tokens=50, temperature=0.7)
    chosen = prompts[:4]
    expected = {"generating": 8, "max_new_tokens": 50}

    def run(watch: RunWatch) -> float:
        started = time.perf_counter()
        with watch.attached():
            watch.phase("generating")
            generate_with_scales(loaded, chosen, 16, vector, [0.0, 2.0], settings, progress=False)
        return time.perf_counter() - started

    whole = RunWatch(loaded, expected=expected, every_s=0.0)
    seconds = run(whole)
    mode = fast_decode.last_run_info().mode
    stopped = RunWatch(loaded, expected=expected, every_s=0.0)
    stopped.on_progress = lambda _progress: stopped.stop.set() if stopped.decode_steps >= 10 else None
    try:
        run(stopped)
        raised = False
    except StopRequested:
        raised = True
    zero = generate_with_scales(loaded, chosen, 16, torch.zeros_like(vector), [0.0, 2.0], settings, progress=False)
    checks = {
        "zero_vector_texts_identical_at_t0.7": zero.texts[0] == zero.texts[1],
        "fast_path_taken": mode.startswith("graph"),
        "all_50_steps_reported": whole.decode_steps == 50 and whole.rows_decoded == 8,
        "stop_raised": raised,
        "stopped_after_step_10": stopped.decode_steps == 10,
    }
    print(f"watched run: {seconds:.2f} s ({mode}); checks {checks}", flush=True)
    return {"mode": mode, "seconds": seconds, "decode_steps": whole.decode_steps, "checks": checks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["times", "agreement", "watch", "chunks"])
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started = time.perf_counter()
    loaded = build_random_llama8b("cuda:0")
    if args.dtype == "float32":
        loaded.model.float()
        torch.set_float32_matmul_precision("highest")
    prompts = make_prompts(50, 50, 400, seed=1)
    torch.manual_seed(0)
    vector = torch.randn(loaded.hidden_size) * 2.0
    measure = {"times": timings, "agreement": greedy_agreement, "watch": watched_runs, "chunks": prefill_chunks}[
        args.mode
    ]
    result = {"mode": args.mode, "dtype": args.dtype, **measure(loaded, prompts, vector)}
    result["wall_s"] = time.perf_counter() - started
    print(json.dumps({key: value for key, value in result.items() if key not in ("runs", "fast_run")}, indent=1))
    write_result(args.out, f"gpu_focused_{args.mode}_{args.dtype}.json", result)


if __name__ == "__main__":
    main()
