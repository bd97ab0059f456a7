"""The cost side of trustworthy comparisons, on the embedded model (CPU), ratios measured in one run.

- warm baselines: the CLI's run at another layer, with the baseline cache filled by a first run, against
  the first run; the ratio is of generation time (`timings.generate_s` in the results metadata). Target <= 0.55.
- shared random stream: `generate` sampling through the Gumbel-max processor against transformers' own
  sampling (softmax + multinomial) on the same rows. Target: at most 3% more generation time.
- step scaling (`--step-scaling`): the warm run's generation (steered rows only, CLI settings) for 10, 20,
  50 and 100 rows, 1 and `--max-tokens` new tokens each: prefill seconds and decode ms per step as a function
  of rows, and what halving the rows saves (N rows / 2N rows). No target: it tests the assumption behind 0.55.

`python benchmarks/bench_baselines.py [--prompts 16] [--max-tokens 64] [--skip-warm] [--skip-sampling]
[--step-scaling [--step-rows 10 20 50 100]] [--out DIR]`
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessorList

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_lib import Row, print_table, side_by_side  # noqa: E402
from chunky_utils.chat import format_prompts, left_pad, pad_token_id, tokenize_prompts  # noqa: E402
from chunky_utils.config import RunConfig  # noqa: E402
from chunky_utils.generation import generate_with_scales  # noqa: E402
from chunky_utils.models import EMBEDDED_MODEL_ID, LoadedModel, load_model  # noqa: E402
from chunky_utils.pipeline import run_experiment  # noqa: E402
from chunky_utils.preparation import prepare_prompts  # noqa: E402
from chunky_utils.sampling import SamplingSettings, SharedStreamProcessor, prompt_key  # noqa: E402

STEP_ROWS = (10, 20, 50, 100)


def cli_config(prompts: int, max_tokens: int, work: Path) -> RunConfig:
    """The first CLI run of the warm-baseline measurement (layer 16, scale 2, CLI decoding defaults, no metrics)."""
    return RunConfig(
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


def warm_baseline_ratio(loaded: LoadedModel, prompts: int, max_tokens: int, work: Path) -> dict[str, float]:
    """Generation seconds of a first CLI run (layer 16) and of the same run at layer 20 with baselines cached."""
    base = cli_config(prompts, max_tokens, work)
    first = run_experiment(base, loaded=loaded).payloads[2.0]["metadata"]
    warm = run_experiment(base.with_changes(layer=20), loaded=loaded).payloads[2.0]["metadata"]
    assert warm["baseline_cache"]["reused"] == prompts, warm["baseline_cache"]
    return {"first_generate_s": first["timings"]["generate_s"], "warm_generate_s": warm["timings"]["generate_s"]}


def bundled_prompts(config: RunConfig, n: int) -> list[str]:
    """The first `n` inference prompts `config` draws (the CLI's seeded order, so the first 10 or 50 are the
    warm-baseline run's prompts), repeated from the start when the subset holds fewer."""
    available = len(prepare_prompts(config.with_changes(inference_n_samples=-1)).inference.prompts)
    drawn = prepare_prompts(config.with_changes(inference_n_samples=min(n, available))).inference.prompts
    return [drawn[i % len(drawn)] for i in range(n)]


def step_scaling(
    loaded: LoadedModel, config: RunConfig, rows: Sequence[int] = STEP_ROWS, repeats: int = 3
) -> dict[str, Any]:
    """Seconds of the warm run's generation (only steered rows, one prompt a row, `config`'s layer, scale,
    temperature and batch size, through `generate_with_scales`) for each number of rows, with 1 and with
    `config.max_tokens` new tokens (min = max, so every run decodes the same steps); medians of `repeats`
    interleaved runs. The prompt cache is packed before `generate`, which then runs one forward per new
    token, so ms/step = (t_max - t_1) / (max - 1) and prefill = t_1 - one step."""
    prompts = bundled_prompts(config, max(rows))
    vector = torch.randn(loaded.hidden_size, generator=torch.Generator().manual_seed(0)) * 4.0
    lengths = (1, config.max_tokens)

    def generation(n: int, tokens: int) -> Any:
        settings = config.with_changes(max_tokens=tokens, min_tokens=tokens).generation_settings()
        return lambda: generate_with_scales(
            loaded, prompts[:n], config.layer, vector, [config.scale], settings, progress=False
        )

    seconds = side_by_side({f"{n}x{t}": generation(n, t) for n in rows for t in lengths}, repeats)
    per_rows: dict[str, dict[str, float]] = {}
    for n in rows:
        one, total = seconds[f"{n}x1"], seconds[f"{n}x{config.max_tokens}"]
        step = (total - one) / (config.max_tokens - 1)
        per_rows[str(n)] = {
            "batches": -(-n // config.batch_size),
            "one_token_s": one,
            "total_s": total,
            "prefill_s": one - step,
            "decode_ms_per_step": 1000.0 * step,
        }
    ratios = {}
    for n in rows:
        if 2 * n in rows:
            half, full = per_rows[str(n)], per_rows[str(2 * n)]
            ratios[f"step_{n}/{2 * n}"] = half["decode_ms_per_step"] / full["decode_ms_per_step"]
            ratios[f"prefill_{n}/{2 * n}"] = half["prefill_s"] / full["prefill_s"]
            ratios[f"total_{n}/{2 * n}"] = half["total_s"] / full["total_s"]
    return {
        "layer": config.layer,
        "max_tokens": config.max_tokens,
        "temperature": config.temperature,
        "batch_size": config.batch_size,
        "repeats": repeats,
        "rows": per_rows,
        "ratios": ratios,
    }


def step_scaling_table(scaling: dict[str, Any]) -> str:
    """The per-rows figures and the N / 2N ratios as markdown, printed."""
    tokens = scaling["max_tokens"]
    lines = [
        f"## Generation cost by rows (steered rows only, {tokens} new tokens, batch {scaling['batch_size']})",
        "",
        f"| rows | batches | prefill s | decode ms/step | total s ({tokens} tokens) |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for n, row in scaling["rows"].items():
        figures = f"{row['prefill_s']:.2f} | {row['decode_ms_per_step']:.1f} | {row['total_s']:.2f}"
        lines.append(f"| {n} | {row['batches']} | {figures} |")
    lines += ["", "| N rows / 2N rows | ratio |", "| --- | ---: |"]
    lines += [f"| {name} | {value:.3f} |" for name, value in scaling["ratios"].items()]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


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
    parser.add_argument("--skip-sampling", action="store_true", help="leave out the shared-stream sampling cost")
    parser.add_argument("--skip-warm", action="store_true", help="leave out the warm-baseline ratio")
    parser.add_argument("--step-scaling", action="store_true", help="generation cost by rows (--step-rows)")
    parser.add_argument("--step-rows", type=int, nargs="+", default=list(STEP_ROWS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    loaded = load_model(EMBEDDED_MODEL_ID, cache_dir=Path("cache"), device="cpu")
    results: dict[str, Any] = {
        "date": str(date.today()),
        "threads": args.threads,
        "prompts": args.prompts,
        "max_tokens": args.max_tokens,
    }
    rows = []
    tables = []
    with tempfile.TemporaryDirectory() as work:
        if not args.skip_warm:
            warm = warm_baseline_ratio(loaded, args.prompts, args.max_tokens, Path(work))
            ratio = warm["warm_generate_s"] / warm["first_generate_s"]
            results |= {"warm_baseline": warm, "warm_ratio": ratio}
            rows.append(
                Row(
                    "generation at another layer, baselines cached / first run",
                    ratio,
                    "<= 0.55",
                    ratio <= 0.55,
                    f"{warm['warm_generate_s']:.1f} s vs {warm['first_generate_s']:.1f} s",
                )
            )
        if args.step_scaling:
            config = cli_config(args.prompts, args.max_tokens, Path(work)).with_changes(layer=20)
            results["step_scaling"] = step_scaling(loaded, config, args.step_rows, args.repeats)
            tables.append(step_scaling_table(results["step_scaling"]))
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
    if rows:
        tables.insert(0, print_table(f"Baseline cache and shared random stream, CPU, {args.threads} threads", rows))
    table = "\n\n".join(tables)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_baselines.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        (args.out / "bench_baselines.md").write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
