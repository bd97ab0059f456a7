"""CPU benchmark on the embedded model: one table of ratios, each measured side by side in this run.

Run: `make bench` (or `.venv/bin/python benchmarks/run_cpu.py [--quick]`).
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_lib import Row, extraction_vs_plain, generation_ratios, print_table, side_by_side  # noqa: E402
from chunky_utils.activations import extract_last_token_activations, subset_means  # noqa: E402
from chunky_utils.data import load_prompt_set  # noqa: E402
from chunky_utils.models import EMBEDDED_MODEL_ID, load_model  # noqa: E402
from chunky_utils.steering import contrastive_vector  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer prompts and repeats (a smoke run)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    n_vector = 16 if args.quick else 32
    repeats = 1 if args.quick else 3
    loaded = load_model(EMBEDDED_MODEL_ID, cache_dir=REPO / "cache", device="cpu")
    target = load_prompt_set("12", n_vector, data_source="bundled")
    baseline = load_prompt_set("0", n_vector, data_source="bundled")
    prompts = target.prompts + baseline.prompts
    rows: list[Row] = []

    times, stats = extraction_vs_plain(loaded, prompts, batch_size=16, layers=None, repeats=repeats)
    ratio = times["plain"] / times["extract"]
    rows.append(
        Row(
            "extraction tok/s / plain body forward tok/s (all 30 layers)",
            ratio,
            ">= 0.9",
            ratio >= 0.9,
            f"{stats['tokens'] / times['extract']:.0f} vs {stats['tokens'] / times['plain']:.0f} tok/s",
        )
    )
    rows.append(
        Row(
            "padding waste (length-sorted batches of 16)",
            stats["waste"],
            "< 0.10",
            stats["waste"] < 0.10,
            f"{int(stats['tokens'])} real of {int(stats['padded'])} padded tokens",
        )
    )
    times16, _ = extraction_vs_plain(loaded, prompts, batch_size=16, layers=[16], repeats=repeats)
    rows.append(
        Row(
            "extraction to layer 16 / plain body to layer 16",
            times16["plain"] / times16["extract"],
            ">= 0.9",
            times16["plain"] / times16["extract"] >= 0.9,
            f"stopped pass: {times16['extract']:.2f} s vs all layers {times['extract']:.2f} s",
        )
    )

    few = prompts[: 12 if args.quick else 24]
    one_at_a_time = side_by_side(
        {
            "batched": lambda: extract_last_token_activations(
                loaded.model, loaded.tokenizer, few, None, 16, progress=False
            ),
            "single": lambda: extract_last_token_activations(
                loaded.model, loaded.tokenizer, few, None, 1, progress=False
            ),
        },
        repeats,
    )
    speedup = one_at_a_time["single"] / one_at_a_time["batched"]
    rows.append(
        Row(
            "batched extraction speed-up over one prompt at a time",
            speedup,
            ">= 2",
            speedup >= 2,
            f"{len(few)} prompts: {one_at_a_time['batched']:.2f} s vs {one_at_a_time['single']:.2f} s",
        )
    )

    gen_prompts = load_prompt_set("5", 8, data_source="bundled", seed=1).prompts
    new_tokens = 16 if args.quick else 32
    gen = generation_ratios(
        loaded, gen_prompts, layer=16, max_new_tokens=new_tokens, prompts_per_batch=8, repeats=max(1, repeats - 1)
    )
    both = gen["baseline+steered"] / gen["baseline"]
    five = gen["baseline+5_scales"] / gen["baseline"]
    hook = gen["baseline"] / gen["no_hook"] - 1.0
    detail = f"8 prompts x {new_tokens} tokens; baseline {gen['baseline']:.2f} s"
    rows.append(Row("baseline+steered in one generate / baseline alone", both, "<= 1.3", both <= 1.3, detail))
    rows.append(Row("baseline+5 scales in one generate / baseline alone", five, "<= 2.5", five <= 2.5, detail))
    rows.append(
        Row(
            "steering hook overhead (hooked baseline / plain generate - 1)",
            hook,
            "<= 0.03",
            hook <= 0.03,
            f"plain {gen['no_hook']:.2f} s",
        )
    )

    with tempfile.TemporaryDirectory() as cache_dir:
        for prompt_set in (target, baseline):
            subset_means(loaded, prompt_set, [16], cache_dir, progress=False)
        started = time.perf_counter()
        hit_target = subset_means(
            loaded, load_prompt_set("12", n_vector, data_source="bundled"), [20], cache_dir, progress=False
        )
        hit_baseline = subset_means(
            loaded, load_prompt_set("0", n_vector, data_source="bundled"), [20], cache_dir, progress=False
        )
        contrastive_vector(hit_target, hit_baseline)
        seconds = time.perf_counter() - started
    rows.append(
        Row(
            "cache hit: prompts -> vector, model loaded (s)",
            seconds,
            "< 1.0",
            seconds < 1.0,
            f"hits: {hit_target.cache_hit and hit_baseline.cache_hit}",
        )
    )

    print(
        f"\nCPU benchmark, {date.today()}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, model {loaded.name}\n"
    )
    print_table("CPU, embedded SmolLM2-135M-Instruct", rows)
    metrics_bench = REPO / "benchmarks" / "bench_metrics.py"
    if metrics_bench.is_file():
        print(f"\n(metric overhead: run {metrics_bench.relative_to(REPO)})")


if __name__ == "__main__":
    main()
