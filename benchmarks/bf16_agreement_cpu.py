"""Does bf16 rounding flip greedy tokens on real weights as it does on random ones? A controlled check on the CPU.

The GPU fast path and transformers' `generate` agree in 100 of 100 rows in fp32 but in none in bf16 on a
random 8B-shaped model (benchmarks/README.md): different kernels round differently, and a random model's
logits are nearly flat, so near-ties flip. Real weights cannot be downloaded on the GPU machine; on this
CPU the embedded SmolLM2 has real weights. This script runs the same comparison (the fast decode loop,
stepping eagerly on the CPU, against `generate` with the steering hooks and the shared-stream processor)
in bf16 on two models of one shape: the embedded model, and the same architecture with random weights.

`python benchmarks/bf16_agreement_cpu.py [--prompts 20] [--max-tokens 48] [--out DIR]`
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LogitsProcessorList

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_lib import first_differences  # noqa: E402
from chunky_utils.chat import format_prompts, left_pad, pad_token_id, tokenize_prompts  # noqa: E402
from chunky_utils.data import load_prompt_set  # noqa: E402
from chunky_utils.fast_decode import fast_generate  # noqa: E402
from chunky_utils.models import EMBEDDED_MODEL_ID, LoadedModel, load_model  # noqa: E402
from chunky_utils.sampling import SamplingSettings, SharedStreamProcessor, prompt_key  # noqa: E402
from chunky_utils.steering import add_to_layers, extract  # noqa: E402

GREEDY = SamplingSettings(temperature=0.0)
LAYER = 15
SCALES = (0.0, 4.0)


def _first_differences(found: list[list[int]], reference: list[list[int]]) -> dict[str, Any]:
    differences = first_differences(found, reference)
    firsts = sorted(step for step in differences if step is not None)
    equal = len(differences) - len(firsts)
    return {"rows": len(differences), "equal": equal, "share": equal / len(differences), "first_differences": firsts}


@torch.inference_mode()
def greedy_ids(loaded: LoadedModel, prompts: list[str], direction: torch.Tensor, new_tokens: int, fast: bool):
    """Greedy token ids of baseline and steered rows, from `generate` or the fast loop (exactly `new_tokens`)."""
    tokenizer = loaded.tokenizer
    token_ids = tokenize_prompts(tokenizer, format_prompts(tokenizer, prompts, add_generation_prompt=True))
    rows = [p for p in range(len(prompts)) for _ in SCALES]
    deltas = torch.stack([direction * scale for _ in prompts for scale in SCALES]).to(loaded.model.dtype)
    keys = [prompt_key(prompts[p]) for p in rows]
    if fast:
        layer_deltas = {LAYER: deltas.float()}
        return fast_generate(loaded, token_ids, rows, keys, layer_deltas, "all", GREEDY, new_tokens, new_tokens, [])
    pad = pad_token_id(tokenizer)
    inputs = left_pad([token_ids[p] for p in rows], pad, loaded.device)
    processor = SharedStreamProcessor(GREEDY, keys, inputs["input_ids"].shape[1])
    with add_to_layers(loaded.model, {LAYER: deltas}):
        output = loaded.model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=pad,
            logits_processor=LogitsProcessorList([processor]),
        )
    return output[:, inputs["input_ids"].shape[1] :].tolist()


def compare(loaded: LoadedModel, prompts: list[str], direction: torch.Tensor, new_tokens: int) -> dict[str, Any]:
    """fast vs generate in bf16, and each against `generate` on the fp32 weights."""
    loaded.model.float()
    reference = greedy_ids(loaded, prompts, direction, new_tokens, fast=False)
    loaded.model.to(torch.bfloat16)
    generate_bf16 = greedy_ids(loaded, prompts, direction, new_tokens, fast=False)
    fast_bf16 = greedy_ids(loaded, prompts, direction, new_tokens, fast=True)
    return {
        "bf16 fast vs bf16 generate": _first_differences(fast_bf16, generate_bf16),
        "bf16 generate vs fp32 generate": _first_differences(generate_bf16, reference),
        "bf16 fast vs fp32 generate": _first_differences(fast_bf16, reference),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    trained = load_model(EMBEDDED_MODEL_ID, cache_dir=Path("cache"), device="cpu")
    prompts = [row.prompt for row in load_prompt_set("5", args.prompts, "bundled", seed=3).rows]
    target = [row.prompt for row in load_prompt_set("12", 16, "bundled", seed=0).rows]
    baseline = [row.prompt for row in load_prompt_set("0", 16, "bundled", seed=0).rows]
    direction = extract(trained, target, baseline, [LAYER], progress=False).at(LAYER).float()
    torch.manual_seed(0)
    random_model = AutoModelForCausalLM.from_config(trained.model.config).eval()
    models = {
        "trained (embedded SmolLM2)": trained,
        "random weights, same shape": LoadedModel(random_model, trained.tokenizer, "random-smollm2-shape", "random"),
    }
    results: dict[str, Any] = {"date": str(date.today()), "prompts": args.prompts, "new_tokens": args.max_tokens}
    for name, loaded in models.items():
        results[name] = compare(loaded, prompts, direction, args.max_tokens)  # the trained model's vector
        for pair, found in results[name].items():
            firsts = found["first_differences"]
            print(f"{name}, {pair}: {found['equal']}/{found['rows']} rows equal; first differences {firsts}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bf16_agreement_cpu.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
