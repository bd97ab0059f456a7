"""The cost side of trustworthy comparisons, on the embedded model (CPU), ratios measured in one run.

- warm baselines: the CLI's run at another layer, with the baseline cache filled by a first run, against
  the first run; the ratio is of generation time (`timings.generate_s` in the results metadata). Target <= 0.55.
- shared random stream: `generate` sampling through the Gumbel-max processor against transformers' own
  sampling (softmax + multinomial) on the same rows. Target: at most 3% more generation time.

`python benchmarks/bench_baselines.py [--prompts 16] [--max-tokens 64] [--skip-sampling] [--out DIR]`
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessorList

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_lib import Row, print_table, side_by_side  # noqa: E402
from chunky_utils.chat import format_prompts, left_pad, pad_token_id, tokenize_prompts  # noqa: E402
from chunky_utils.config import RunConfig  # noqa: E402
from chunky_utils.models import EMBEDDED_MODEL_ID, LoadedModel, load_model  # noqa: E402
from chunky_utils.pipeline import run_experiment  # noqa: E402
from chunky_utils.sampling import SamplingSettings, SharedStreamProcessor, prompt_key  # noqa: E402


def warm_baseline_ratio(loaded: LoadedModel, prompts: int, max_tokens: int, work: Path) -> dict[str, float]:
    """Generation seconds of a first CLI run (layer 16) and of the same run at layer 20 with baselines cached."""
    base = RunConfig(
        target_subset="12",
        baseline_subset="0",
        layer=16,
        scale=2.0,
        n_samples=32,
        inference_dataset="5",
        inference_n_samples=prompts,
        max_tokens=max_tokens,
        data_source="bundled",
        output_dir=str(work / "results"),
        cache_dir=str(work / "cache"),
        metrics=False,
        progress=False,
    )
    first = run_experiment(base, loaded=loaded).payloads[2.0]["metadata"]
    warm = run_experiment(base.with_changes(layer=20), loaded=loaded).payloads[2.0]["metadata"]
    assert warm["baseline_cache"]["reused"] == prompts, warm["baseline_cache"]
    return {"first_generate_s": first["timings"]["generate_s"], "warm_generate_s": warm["timings"]["generate_s"]}


@torch.inference_mode()
def sampling_overhead(loaded: LoadedModel, prompts: list[str], max_tokens: int, repeats: int) -> dict[str, float]:
    """Median seconds of one sampled `generate` over baseline + steered rows: transformers' sampler vs ours."""
    token_ids = tokenize_prompts(loaded.tokenizer, format_prompts(loaded.tokenizer, prompts))
    rows = [ids for ids in token_ids for _ in range(2)]
    inputs = left_pad(rows, pad_token_id(loaded.tokenizer), loaded.device)
    keys = [prompt_key(prompt) for prompt in prompts for _ in range(2)]
    common = {
        "input_ids": inputs["input_ids"],
        "attention_mask": inputs["attention_mask"],
        "max_new_tokens": max_tokens,
        "min_new_tokens": max_tokens,
        "pad_token_id": pad_token_id(loaded.tokenizer),
    }
    shared = SharedStreamProcessor(SamplingSettings(0.7, seed=0), keys, inputs["input_ids"].shape[1])
    return side_by_side(
        {
            "transformers_sampling": lambda: loaded.model.generate(
                **common, do_sample=True, temperature=0.7, top_k=0, top_p=1.0
            ),
            "shared_stream": lambda: loaded.model.generate(
                **common, do_sample=False, logits_processor=LogitsProcessorList([shared])
            ),
        },
        repeats,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--skip-sampling", action="store_true", help="only the warm-baseline ratio")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    loaded = load_model(EMBEDDED_MODEL_ID, cache_dir=Path("cache"), device="cpu")
    results: dict[str, Any] = {"date": str(date.today()), "prompts": args.prompts, "max_tokens": args.max_tokens}
    with tempfile.TemporaryDirectory() as work:
        warm = warm_baseline_ratio(loaded, args.prompts, args.max_tokens, Path(work))
    ratio = warm["warm_generate_s"] / warm["first_generate_s"]
    results |= {"warm_baseline": warm, "warm_ratio": ratio}
    rows = [
        Row(
            "generation at another layer, baselines cached / first run",
            ratio,
            "<= 0.55",
            ratio <= 0.55,
            f"{warm['warm_generate_s']:.1f} s vs {warm['first_generate_s']:.1f} s",
        )
    ]
    if not args.skip_sampling:
        from chunky_utils.data import load_prompt_set

        sample_prompts = [row.prompt for row in load_prompt_set("5", 8, "bundled", seed=7).rows]
        sampling = sampling_overhead(loaded, sample_prompts, args.max_tokens, args.repeats)
        overhead = sampling["shared_stream"] / sampling["transformers_sampling"] - 1.0
        results |= {"sampling_s": sampling, "sampling_overhead": overhead}
        rows.append(
            Row(
                "shared-stream sampling / transformers sampling - 1",
                overhead,
                "<= 0.03",
                overhead <= 0.03,
                f"{sampling['shared_stream']:.2f} s vs {sampling['transformers_sampling']:.2f} s, 16 rows",
            )
        )
    table = print_table(f"Baseline cache and shared random stream, CPU, {args.threads} threads", rows)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_baselines.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        (args.out / "bench_baselines.md").write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
