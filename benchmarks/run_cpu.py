"""CPU benchmark on the embedded model: one table of ratios, each measured side by side in this run.

Run: `make bench` (or `.venv/bin/python benchmarks/run_cpu.py [--quick] [--only generation]`).
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
from chunky_utils.data import PromptSet, load_prompt_set  # noqa: E402
from chunky_utils.models import EMBEDDED_MODEL_ID, LoadedModel, load_model  # noqa: E402
from chunky_utils.steering import contrastive_vector  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def extraction_rows(loaded: LoadedModel, prompts: list[str], repeats: int, quick: bool) -> list[Row]:
    """Extraction against the plain body forward on the same batches; padding; batching gain."""
    times, stats = extraction_vs_plain(loaded, prompts, batch_size=16, layers=None, repeats=repeats)
    ratio = times["plain"] / times["extract"]
    rows = [
        Row(
            "extraction tok/s / plain body forward tok/s (all 30 layers)",
            ratio,
            ">= 0.9",
            ratio >= 0.9,
            f"{stats['tokens'] / times['extract']:.0f} vs {stats['tokens'] / times['plain']:.0f} tok/s",
        ),
        Row(
            "padding waste (length-sorted batches of 16)",
            stats["waste"],
            "< 0.10",
            stats["waste"] < 0.10,
            f"{int(stats['tokens'])} real of {int(stats['padded'])} padded tokens",
        ),
    ]
    to16, _ = extraction_vs_plain(loaded, prompts, batch_size=16, layers=[16], repeats=repeats)
    ratio16 = to16["plain"] / to16["extract"]
    rows.append(
        Row(
            "extraction to layer 16 / plain body to layer 16",
            ratio16,
            ">= 0.9",
            ratio16 >= 0.9,
            f"stopped pass: {to16['extract']:.2f} s vs all layers {times['extract']:.2f} s",
        )
    )
    few = prompts[: 12 if quick else 24]
    single = side_by_side(
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
    speedup = single["single"] / single["batched"]
    rows.append(
        Row(
            "batched extraction speed-up over one prompt at a time",
            speedup,
            ">= 2",
            speedup >= 2,
            f"{len(few)} prompts: {single['batched']:.2f} s vs {single['single']:.2f} s",
        )
    )
    return rows


def generation_rows(loaded: LoadedModel, new_tokens: int, repeats: int) -> list[Row]:
    """Baseline alone against baseline+steered and baseline+5 scales in one generate; the hook's cost."""
    prompts = load_prompt_set("5", 8, data_source="bundled", seed=1).prompts
    gen = generation_ratios(loaded, prompts, layer=16, max_new_tokens=new_tokens, prompts_per_batch=8, repeats=repeats)
    both = gen["baseline+steered"] / gen["baseline"]
    five = gen["baseline+5_scales"] / gen["baseline"]
    plain_both = gen["baseline+steered_plain_prefill"] / gen["baseline_plain_prefill"]
    plain_five = gen["baseline+5_scales_plain_prefill"] / gen["baseline_plain_prefill"]
    hook = gen["baseline_plain_prefill"] / gen["no_hook"] - 1.0
    detail = f"8 prompts x {new_tokens} tokens; baseline {gen['baseline']:.2f} s"
    return [
        Row(
            "baseline+steered in one generate / baseline alone",
            both,
            "<= 1.3",
            both <= 1.3,
            f"{detail}, both {gen['baseline+steered']:.2f} s",
        ),
        Row(
            "baseline+5 scales in one generate / baseline alone",
            five,
            "<= 2.5",
            five <= 2.5,
            f"{detail}, six rows {gen['baseline+5_scales']:.2f} s",
        ),
        Row(
            "same two ratios with the prompt prefilled inside generate",
            plain_both,
            "-",
            True,
            f"five scales {plain_five:.2f}; baseline {gen['baseline_plain_prefill']:.2f} s",
        ),
        Row(
            "steering hook overhead (hooked baseline / plain generate - 1, same prefill)",
            hook,
            "<= 0.03",
            hook <= 0.03,
            f"plain {gen['no_hook']:.2f} s",
        ),
    ]


def cache_hit_row(loaded: LoadedModel, target: PromptSet, baseline: PromptSet) -> Row:
    """Prompts to vector on a warm cache, for a layer not used before (every layer was cached at once)."""
    n_vector = len(target.rows)
    with tempfile.TemporaryDirectory() as cache_dir:
        for prompt_set in (target, baseline):
            subset_means(loaded, prompt_set, [16], cache_dir, progress=False)
        started = time.perf_counter()
        hits = [
            subset_means(loaded, load_prompt_set(key, n_vector, data_source="bundled"), [20], cache_dir, progress=False)
            for key in ("12", "0")
        ]
        contrastive_vector(*hits)
        seconds = time.perf_counter() - started
    return Row(
        "cache hit: prompts -> vector, model loaded (s)",
        seconds,
        "< 1.0",
        seconds < 1.0,
        f"hits: {all(h.cache_hit for h in hits)}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer prompts, tokens and repeats (a smoke run)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--new-tokens", type=int, default=100, help="tokens per answer (the CLI's default)")
    parser.add_argument("--only", choices=["all", "extraction", "generation"], default="all")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    n_vector = 16 if args.quick else 32
    repeats = 1 if args.quick else 3
    loaded = load_model(EMBEDDED_MODEL_ID, cache_dir=REPO / "cache", device="cpu")
    target = load_prompt_set("12", n_vector, data_source="bundled")
    baseline = load_prompt_set("0", n_vector, data_source="bundled")
    rows: list[Row] = []
    if args.only in ("all", "extraction"):
        rows += extraction_rows(loaded, target.prompts + baseline.prompts, repeats, args.quick)
    if args.only in ("all", "generation"):
        rows += generation_rows(loaded, 16 if args.quick else args.new_tokens, max(1, repeats - 1))
    if args.only == "all":
        rows.append(cache_hit_row(loaded, target, baseline))
    print(
        f"\nCPU benchmark, {date.today()}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, model {loaded.name}\n"
    )
    print_table("CPU, embedded SmolLM2-135M-Instruct", rows)
    print("\nmetric overhead: .venv/bin/python benchmarks/bench_metrics.py")


if __name__ == "__main__":
    main()
