"""Benchmark: wall time of the metric scoring against the batched generation it scores (CPU, embedded model).

Both run interleaved in one process (generate, score, generate, score, ...) after a warm-up, so load on a
shared machine hits them alike; the table gives the median and the minimum of each and their ratio.
Target: metrics add at most 50% of the generation time (ratio <= 0.50).

Run: `.venv/bin/python benchmarks/bench_metrics.py [--n-prompts 8 --scales 2,4,8 --max-tokens 32 --repeats 3]`.
Prompts: CoCoNot vs GSM8K for the vector and held-out IFEval prompts when ../shared/realdata exists,
else the bundled Tulu samples (12 vs 0, inference 7).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chunky_utils.config import RunConfig  # noqa: E402
from chunky_utils.generation import GenerationOutput, generate_with_scales  # noqa: E402
from chunky_utils.metric_summary import score_run  # noqa: E402
from chunky_utils.models import EMBEDDED_MODEL_ID, load_model  # noqa: E402
from chunky_utils.pipeline import prepare_prompts, steering_vector_for  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REALDATA = REPO.parent / "shared" / "realdata"
TARGET_RATIO = 0.5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-prompts", type=int, default=8, help="held-out inference prompts")
    parser.add_argument("--scales", default="2,4,8", help="steered scales, generated with the baseline in one batch")
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per answer (greedy)")
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--n-samples", type=int, default=24, help="prompts per side for the vector and the probe")
    parser.add_argument("--repeats", type=int, default=3, help="timed (generation, metrics) pairs after a warm-up")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    return parser.parse_args()


def subsets() -> tuple[str, str, str, str]:
    """(target, baseline, inference, data source): real prompt files when present, else bundled samples."""
    if REALDATA.is_dir():
        files = (REALDATA / "coconot_eval.jsonl", REALDATA / "gsm8k_test.jsonl", REALDATA / "ifeval.jsonl")
        return (*(str(f) for f in files), "realdata")
    return "12", "0", "7", "bundled"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    target, baseline, inference, source = subsets()
    scales = [0.0] + [float(s) for s in args.scales.split(",") if float(s) != 0.0]
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as scratch:
        config = RunConfig(
            target_subset=target,
            baseline_subset=baseline,
            layer=args.layer,
            n_samples=args.n_samples,
            inference_dataset=inference,
            inference_n_samples=args.n_prompts,
            max_tokens=args.max_tokens,
            temperature=0.0,
            data_source="bundled",
            capture="needed",
            batch_size=args.batch_size,
            output_dir=str(Path(scratch) / "results"),
            cache_dir=str(Path(scratch) / "cache"),
            progress=False,
        )
        loaded = load_model(EMBEDDED_MODEL_ID, cache_dir=REPO / "cache", device="cpu")
        prompts = prepare_prompts(config)
        vector, _ = steering_vector_for(config, loaded, prompts)
        settings = config.generation_settings()

        def generate(prompt_texts: list[str]) -> GenerationOutput:
            return generate_with_scales(
                loaded, prompt_texts, config.layer, vector.at(config.layer), scales, settings, progress=False
            )

        warm = generate(prompts.inference.prompts[:1])
        score_run(config, loaded, prompts, vector, _first_prompt_only(warm, len(prompts.inference.prompts)))
        load_before = load_average()
        generation_s: list[float] = []
        metrics_s: list[float] = []
        probe_s: list[float] = []
        generated = warm
        for _ in range(args.repeats):
            started = time.perf_counter()
            generated = generate(prompts.inference.prompts)
            generation_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            run_metrics = score_run(config, loaded, prompts, vector, generated)
            metrics_s.append(time.perf_counter() - started)
            probe_s.append(run_metrics.probe_seconds)
        load_after = load_average()

    ratios = [m / g for m, g in zip(metrics_s, generation_s, strict=True)]
    figures: dict[str, Any] = {
        "prompts": source,
        "n_prompts": args.n_prompts,
        "scales_with_baseline": scales,
        "rows_generated": len(scales) * args.n_prompts,
        "max_tokens": args.max_tokens,
        "new_tokens": generated.new_tokens,
        "layer": args.layer,
        "threads": args.threads,
        "generation_s": [round(s, 3) for s in generation_s],
        "metrics_s": [round(s, 3) for s in metrics_s],
        "of_which_probe_fit_s": [round(s, 3) for s in probe_s],
        "ratio_per_repeat": [round(r, 3) for r in ratios],
        "ratio_median": round(statistics.median(ratios), 3),
        "ratio_of_minimums": round(min(metrics_s) / min(generation_s), 3),
        "probe_auroc": run_metrics.probe.heldout_auroc if run_metrics.probe is not None else None,
        "load_average_before_after": [load_before, load_after],
    }
    print(f"## metrics vs generation (CPU, {EMBEDDED_MODEL_ID}, {source} prompts)\n")
    print("| measure | generation | metrics | metrics / generation |")
    print("| --- | ---: | ---: | ---: |")
    for index, (gen, met) in enumerate(zip(generation_s, metrics_s, strict=True), start=1):
        print(f"| repeat {index} | {gen:.2f} s | {met:.2f} s | {met / gen:.3f} |")
    print(
        f"| median | {statistics.median(generation_s):.2f} s | {statistics.median(metrics_s):.2f} s | "
        f"{figures['ratio_median']:.3f} |"
    )
    print(f"| minimum | {min(generation_s):.2f} s | {min(metrics_s):.2f} s | {figures['ratio_of_minimums']:.3f} |")
    print(
        f"\n{figures['rows_generated']} rows ({args.n_prompts} prompts x {len(scales)} scales incl. baseline), "
        f"{args.max_tokens} new tokens each; load average before/after: {load_before} / {load_after}"
    )
    print(f"metrics include the probe fit: {', '.join(f'{s:.2f} s' for s in probe_s)}; threads: {args.threads}")
    verdict = "meets" if figures["ratio_median"] <= TARGET_RATIO else "MISSES"
    print(f"ratio (metrics / generation, median): {figures['ratio_median']:.3f} -> {verdict} target <= {TARGET_RATIO}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0


def _first_prompt_only(generated: GenerationOutput, n_prompts: int) -> GenerationOutput:
    """A warm-up output shaped for `n_prompts` prompts: the first prompt's texts, the others empty."""
    texts = [[scale_texts[0]] + [""] * (n_prompts - 1) for scale_texts in generated.texts]
    return GenerationOutput(generated.scales, texts, generated.seconds, generated.new_tokens)


if __name__ == "__main__":
    raise SystemExit(main())
