"""How often a prompt's baseline answer is the same whatever shares its batch.

The random stream is batch-independent by construction (tests/test_sampling.py checks it exactly); what
can still differ is floating-point reduction order, which changes with batch shape and padding and can
flip a near-tie. This script generates each prompt's baseline in four compositions and counts rows whose
text equals the prompt generated alone:
- alone: one prompt, one row;
- paired: every prompt, baseline + scale 2 (the CLI's default run);
- five scales: baseline + 0.5, 1, 2, 4, 8 (a playground or sweep group);
- sweep: a sweep group's shape (scales 0, 1, 3) with the prompts in another order and batch size 16.

CPU: `python benchmarks/batch_invariance.py` (embedded SmolLM2, fp32).
GPU: `python benchmarks/batch_invariance.py --device cuda` (Llama-3.1-8B shape, random bf16).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from datetime import date
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_lib import write_result  # noqa: E402
from chunky_utils.data import load_prompt_set  # noqa: E402
from chunky_utils.generation import GenerationSettings, generate_with_scales  # noqa: E402
from chunky_utils.models import LoadedModel  # noqa: E402

COMPOSITIONS: dict[str, tuple[tuple[float, ...], int, bool]] = {
    # name: (scales, batch rows, shuffled prompt order)
    "paired": ((0.0, 2.0), 64, False),
    "five_scales": ((0.0, 0.5, 1.0, 2.0, 4.0, 8.0), 64, False),
    "sweep": ((0.0, 1.0, 3.0), 16, True),
}


def baselines_by_composition(
    loaded: LoadedModel, prompts: list[str], layer: int, vector: torch.Tensor, settings: GenerationSettings
) -> dict[str, list[str]]:
    """Each prompt's baseline text under every composition, in prompt order."""

    def baseline(batch_prompts: list[str], scales: tuple[float, ...], batch_rows: int) -> list[str]:
        run = GenerationSettings(**{**settings.__dict__, "batch_size": batch_rows})
        texts = generate_with_scales(loaded, batch_prompts, layer, vector, scales, run, progress=False).for_scale(0.0)
        return [text or "" for text in texts]

    found = {"alone": [baseline([prompt], (0.0,), 1)[0] for prompt in prompts]}
    for name, (scales, batch_rows, shuffled) in COMPOSITIONS.items():
        order = list(range(len(prompts)))
        if shuffled:
            random.Random(1).shuffle(order)
        texts = baseline([prompts[i] for i in order], scales, batch_rows)
        found[name] = [texts[order.index(i)] for i in range(len(prompts))]
    return found


def agreement(found: dict[str, list[str]]) -> dict[str, Any]:
    """Share of rows equal to 'alone', per composition and over all of them."""
    alone = found["alone"]
    per = {name: sum(a == b for a, b in zip(alone, texts, strict=True)) for name, texts in found.items()}
    compared = [name for name in found if name != "alone"]
    total = sum(per[name] for name in compared)
    return {
        "rows_per_composition": len(alone),
        "equal_to_alone": {name: per[name] for name in compared},
        "all_four_equal": sum(all(found[name][i] == alone[i] for name in compared) for i in range(len(alone))),
        "share_equal": round(total / (len(compared) * len(alone)), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.7])
    parser.add_argument("--out", type=Path, default=None, help="folder for batch_invariance.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.device == "cuda":
        from benchmarks.run_gpu import build_random_llama8b

        loaded = build_random_llama8b("cuda:0")
        layer, model_label = 16, "random Llama-3.1-8B shape, bf16, " + torch.cuda.get_device_name(0)
    else:
        from chunky_utils.models import EMBEDDED_MODEL_ID, load_model

        torch.set_num_threads(2)
        loaded = load_model(EMBEDDED_MODEL_ID, cache_dir=Path("cache"), device="cpu")
        layer, model_label = 16, "embedded SmolLM2-135M-Instruct, fp32, CPU"
    prompts = [row.prompt for row in load_prompt_set("5", args.prompts, "bundled", seed=3).rows]
    vector = torch.randn(loaded.hidden_size) * 4.0
    results: dict[str, Any] = {"date": str(date.today()), "model": model_label, "max_tokens": args.max_tokens}
    for temperature in args.temperatures:
        settings = GenerationSettings(max_new_tokens=args.max_tokens, temperature=temperature, seed=0)
        found = baselines_by_composition(loaded, prompts, layer, vector, settings)
        results[f"temperature_{temperature:g}"] = agreement(found)
        print(f"temperature {temperature:g}: {json.dumps(results[f'temperature_{temperature:g}'])}", flush=True)
    write_result(args.out, "batch_invariance.json", results)


if __name__ == "__main__":
    main()
