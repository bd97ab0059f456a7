"""GPU benchmark: a Llama-3.1-8B-shaped model with random bf16 weights, built from its config.

Run on a machine with one or two NVIDIA GPUs: `python benchmarks/run_gpu.py [--out DIR]`.
Nothing is downloaded: the tokenizer is the package's byte-level ChatML tokenizer, prompts are
bundled prompts cut to 50-400 tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import random
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transformers  # noqa: E402
from transformers import LogitsProcessorList  # noqa: E402

from benchmarks.bench_lib import (  # noqa: E402
    Row,
    exact_length_settings,
    first_differences,
    side_by_side,
    synchronize,
    time_it,
)
from chunky_utils import decode_runner, fast_decode, packed_extraction  # noqa: E402
from chunky_utils.activations import extract_last_token_activations, extract_prompt_sets  # noqa: E402
from chunky_utils.attention import grouped_query_decoding  # noqa: E402
from chunky_utils.chat import format_prompts, left_pad, pad_token_id, tokenize_prompts  # noqa: E402
from chunky_utils.data import bundled_rows  # noqa: E402
from chunky_utils.decode_prefill import routed_attention_function  # noqa: E402
from chunky_utils.generation import (  # noqa: E402
    GenerationSettings,
    generate_with_scales,
)
from chunky_utils.models import (  # noqa: E402
    LoadedModel,
    build_byte_tokenizer,
    find_decoder_layers,
    load_model,
    model_fingerprint,
)
from chunky_utils.packed_extraction import routed_attention  # noqa: E402
from chunky_utils.sampling import SamplingSettings, SharedStreamProcessor, prompt_key  # noqa: E402
from chunky_utils.steering import add_to_layers  # noqa: E402

GREEDY = SamplingSettings(temperature=0.0)
FIVE_SCALES = [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]  # baseline + 5 scales

LLAMA_31_8B = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


SMOKE_SHAPE = {
    **LLAMA_31_8B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 18,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
}


def build_random_llama8b(device: str, shape: dict[str, object] = LLAMA_31_8B) -> LoadedModel:
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = build_byte_tokenizer()
    config = LlamaConfig(**shape, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    name = "random-llama-3.1-8b-shape"
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, fingerprint=model_fingerprint(model, name))


def make_prompts(count: int, low: int, high: int, seed: int) -> list[str]:
    """Bundled prompt text cut to lengths drawn uniformly from [low, high] bytes (= tokens here)."""
    rng = random.Random(seed)
    corpus = " ".join(row.prompt for key in ("12", "0", "5", "8") for row in bundled_rows(key))
    prompts = []
    for _ in range(count):
        length = rng.randint(low, high)
        start = rng.randint(0, len(corpus.encode()) - high - 1)
        prompts.append(corpus.encode()[start : start + length].decode("utf-8", errors="ignore"))
    return prompts


@torch.inference_mode()
def plain_full_forward(loaded: LoadedModel, prompts: list[str], batch_size: int) -> None:
    """Reference: plain transformers forward (lm_head included), prompts in given order, batch 32."""
    token_ids = tokenize_prompts(loaded.tokenizer, format_prompts(loaded.tokenizer, prompts))
    for start in range(0, len(token_ids), batch_size):
        inputs = left_pad(token_ids[start : start + batch_size], pad_token_id(loaded.tokenizer), loaded.device)
        loaded.model(**inputs, use_cache=False)


@torch.inference_mode()
def plain_generate(loaded: LoadedModel, prompts: list[str], new_tokens: int, **generate_kwargs: object) -> list[str]:
    token_ids = tokenize_prompts(loaded.tokenizer, format_prompts(loaded.tokenizer, prompts))
    inputs = left_pad(token_ids, pad_token_id(loaded.tokenizer), loaded.device)
    return loaded.tokenizer.batch_decode(generate_exactly(loaded, inputs, new_tokens, **generate_kwargs))


def generate_exactly(
    loaded: LoadedModel, inputs: dict[str, torch.Tensor], new_tokens: int, **generate_kwargs: object
) -> torch.Tensor:
    """transformers' generate without sampling (logits processors aside), exactly `new_tokens` new tokens per
    left-padded row; the new token ids only."""
    out = loaded.model.generate(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=pad_token_id(loaded.tokenizer),
        **generate_kwargs,
    )
    return out[:, inputs["input_ids"].shape[1] :]


def print_targets(title: str, rows: list[Row]) -> str:
    """The results table, every row with its target and `ok` or `MISSED`."""
    lines = [f"## {title}", "", "| measure | value | target | ok | detail |", "| --- | ---: | --- | --- | --- |"]
    for row in rows:
        verdict = "ok" if row.passed else "MISSED"
        lines.append(f"| {row.name} | {row.value:.3f} | {row.target} | {verdict} | {row.detail} |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def copy_bandwidth(device: str) -> float:
    """Device memory bandwidth in bytes/s from a 2 GiB device-to-device copy (bytes read plus written)."""
    source = torch.empty(2**31, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    times = []
    for _ in range(5):
        times.append(time_it(lambda: target.copy_(source)))
    return 2 * source.numel() / statistics.median(times[1:])


def prompt_token_ids(loaded: LoadedModel, prompts: list[str]) -> list[list[int]]:
    return tokenize_prompts(loaded.tokenizer, format_prompts(loaded.tokenizer, prompts, add_generation_prompt=True))


@torch.inference_mode()
def eager_rows(
    loaded: LoadedModel,
    prompts: list[str],
    vector: torch.Tensor,
    scales: list[float],
    new_tokens: int,
    sampling: SamplingSettings,
) -> list[list[int]]:
    """Token ids from transformers' generate with the steering hooks and the shared-stream processor."""
    token_ids = prompt_token_ids(loaded, prompts)
    rows = [p for p in range(len(prompts)) for _ in scales]
    deltas = torch.stack([vector * s for _ in prompts for s in scales])
    inputs = left_pad([token_ids[p] for p in rows], pad_token_id(loaded.tokenizer), loaded.device)
    processor = SharedStreamProcessor(sampling, [prompt_key(prompts[p]) for p in rows], inputs["input_ids"].shape[1])
    with grouped_query_decoding(loaded.model), add_to_layers(loaded.model, {16: deltas}):
        output = generate_exactly(loaded, inputs, new_tokens, logits_processor=LogitsProcessorList([processor]))
    return output.tolist()


def fast_rows(
    loaded: LoadedModel,
    prompts: list[str],
    vector: torch.Tensor,
    scales: list[float],
    new_tokens: int,
    sampling: SamplingSettings = GREEDY,
    positions: str = "all",
    max_batch_tokens: int = 16384,
) -> list[list[int]]:
    """The same rows through fast_decode.fast_generate (every row decodes exactly `new_tokens`)."""
    token_ids = prompt_token_ids(loaded, prompts)
    rows = [p for p in range(len(prompts)) for _ in scales]
    deltas = torch.stack([vector * s for _ in prompts for s in scales])
    keys = [prompt_key(prompts[p]) for p in rows]
    return fast_decode.fast_generate(
        loaded,
        token_ids,
        rows,
        keys,
        {16: deltas},
        positions,
        sampling,
        new_tokens,
        new_tokens,
        [],
        max_batch_tokens=max_batch_tokens,
    )


def agreement(fast: list[list[int]], eager: list[list[int]]) -> tuple[float, str]:
    """Share of rows with identical token ids, and where the others first differ."""
    differences = first_differences(fast, eager)
    firsts = sorted(step for step in differences if step is not None)
    equal = len(differences) - len(firsts)
    detail = f"{equal}/{len(differences)} rows equal"
    if firsts:
        detail += f"; the others first differ at steps {firsts}"
    return equal / len(differences), detail


def tokens_kept(found: list[list[int]], reference: list[list[int]]) -> float:
    """Mean number of leading tokens a row keeps of its reference row (a row equal throughout keeps all)."""
    steps = first_differences(found, reference)
    kept = [len(row) if step is None else step for row, step in zip(found, steps, strict=True)]
    return sum(kept) / len(kept)


def decode_floor(loaded: LoadedModel, prompts: list[str], rows_per_prompt: int, new_tokens: int) -> dict[str, float]:
    """Bytes one decoding step must read on average: the weights once, each row's keys and values so far."""
    model = loaded.model
    config = model.config
    embedding = model.get_input_embeddings().weight
    weights = (
        sum(p.numel() * p.element_size() for p in model.parameters()) - embedding.numel() * embedding.element_size()
    )
    head_dim = config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2
    lengths = [len(ids) for ids in prompt_token_ids(loaded, prompts)]
    mean_context = sum(lengths) / len(lengths) + (new_tokens - 1) / 2
    kv = rows_per_prompt * len(lengths) * mean_context * per_token
    return {"weight_bytes": float(weights), "kv_bytes": float(kv), "mean_context": mean_context}


def run_floor(
    loaded: LoadedModel,
    prompts: list[str],
    rows_per_prompt: int,
    new_tokens: int,
    bandwidth: float,
    steered_layer: int = 16,
    steer_prompt: bool = True,
) -> dict[str, float]:
    """The least time one fast-path run can take. The prefill's products at 790 TFLOP/s (the best this H200
    measured); it runs the layers up to the steered one once per prompt and the rest once per row (once per
    prompt when prompt positions are unsteered), and its last layer computes only keys and values. Each
    decoding step: its products at 790 TFLOP/s or its weights read at copy bandwidth, whichever is slower,
    then the keys and values its attention reads at copy bandwidth."""
    layers = find_decoder_layers(loaded.model)
    layer_params = sum(p.numel() for p in layers[0].parameters() if p.dim() == 2)
    last_kv = sum(p.numel() for name in ("k_proj", "v_proj") for p in getattr(layers[-1].self_attn, name).parameters())
    head = loaded.model.get_output_embeddings().weight.numel()
    lengths = [len(ids) - 1 for ids in prompt_token_ids(loaded, prompts)]  # the last prompt token is step 1
    prompt_tokens = sum(lengths)
    trunk = steered_layer + 1 if steer_prompt else len(layers) - 1
    fan_out = rows_per_prompt if steer_prompt else 1
    tail = len(layers) - 1 - trunk
    prefill = 2 * prompt_tokens * (trunk * layer_params + fan_out * (tail * layer_params + last_kv))
    rows = rows_per_prompt * len(prompts)
    decode = 2 * new_tokens * rows * (len(layers) * layer_params + head)
    config = loaded.model.config
    per_token = 2 * len(layers) * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 2
    kv = rows_per_prompt * new_tokens * sum(length + 1 + (new_tokens - 1) / 2 for length in lengths) * per_token
    weights = decode_floor(loaded, prompts[:1], 1, 1)["weight_bytes"]
    products = prefill / 790e12 + new_tokens * max(decode / new_tokens / 790e12, weights / bandwidth)
    return {
        "prefill_flop": prefill,
        "decode_flop": decode,
        "weight_bytes": weights,
        "kv_bytes": kv,
        "floor_s": products + kv / bandwidth,
    }


def floor_detail(floor: dict[str, float], target: float | None = None) -> str:
    text = (
        f"floor {floor['floor_s']:.2f} s (prefill {floor['prefill_flop'] / 1e12:.0f} TFLOP and decoding"
        f" {floor['decode_flop'] / 1e12:.0f} TFLOP at 790 TFLOP/s or {floor['weight_bytes'] / 1e9:.0f} GB of weights"
        f" a step, keys and values {floor['kv_bytes'] / 1e9:.0f} GB, at copy bandwidth)"
    )
    return text + (f"; the target is {target / floor['floor_s']:.2f}x the floor" if target else "")


@torch.inference_mode()
def profile_fast_step(loaded: LoadedModel, rows: int, length: int, steps: int = 5) -> dict[str, float]:
    """GPU milliseconds per decoding step by kernel kind, from the profiled (uncaptured) compiled step."""
    from torch.profiler import ProfilerActivity, profile

    runner = decode_runner.runner_for(loaded.model)
    state = runner.state(fast_decode.bucket_rows(rows), length)
    kind = (True, 0, 1.0)
    with routed_attention(loaded.model, fast_decode.FAST_ATTENTION, routed_attention_function):
        state.buffers["positions"].fill_(300)
        runner.run_step(state, kind)
        synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                state.buffers["positions"].fill_(300)
                runner.run_step(state, kind)
            synchronize()
    kinds: dict[str, float] = {}
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        if total <= 0 or event.key.startswith(("ProfilerStep", "aten::", "cuda", "Torch-Compiled", "CompiledFunction")):
            continue
        name = event.key.lower()
        if "fmha" in name or "attention" in name or "flash" in name:
            group = "attention"
        elif name.startswith("triton"):
            group = "triton (fused elementwise, norms)"
        elif any(key in name for key in ("gemm", "gemv", "nvjet", "cutlass", "xmma", "sm90", "splitk", "matmul")):
            group = "matmul"
        else:
            group = "other"
        kinds[group] = kinds.get(group, 0.0) + total / 1000 / steps
    return kinds


@dataclass(frozen=True)
class Inputs:
    """What every benchmark section is given: the model, the options, the steering vector, the vector prompts,
    how many prompts to generate for and how many tokens, and the results dict the sections fill in."""

    loaded: LoadedModel
    args: argparse.Namespace
    vector: torch.Tensor
    vector_prompts: list[str]
    n_gen: int
    new_tokens: int
    results: dict[str, object]


Section = Callable[[Inputs], list[Row]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="folder for benchmark.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-multi-gpu", action="store_true")
    parser.add_argument("--only-multi-gpu", action="store_true", help="just the --tensor-parallel-size 2 check")
    parser.add_argument("--only-generation", action="store_true", help="skip the extraction measurements")
    parser.add_argument("--smoke", action="store_true", help="tiny shape on the CPU: checks the script, no figures")
    parser.add_argument("--with-static", action="store_true", help="also time transformers' static KV cache")
    parser.add_argument("--with-eager-extras", action="store_true", help="also the older eager generation rows")
    parser.add_argument(
        "--skip-eager-generation", action="store_true", help="skip generate_with_scales rows (fast path rows stay)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("chunky_utils.fast_decode").setLevel(logging.INFO)
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("no CUDA GPU: this benchmark needs one (or pass --smoke)")
    loaded = build_random_llama8b("cpu", SMOKE_SHAPE) if args.smoke else build_random_llama8b("cuda:0")
    n_vector, n_gen, new_tokens = (20, 4, 8) if args.smoke else (200, 50, 100)
    vector_prompts = make_prompts(n_vector, 50, 400, seed=0)
    n_tokens = sum(len(t) for t in prompt_token_ids(loaded, vector_prompts))
    rows: list[Row] = []
    errors: dict[str, str] = {}
    results: dict[str, object] = {
        "date": str(date.today()),
        "gpu": "cpu smoke run" if args.smoke else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "prompt_tokens": n_tokens,
        "errors": errors,
    }
    if not args.smoke:
        results["copy_bandwidth_bytes_per_s"] = copy_bandwidth("cuda:0")
    vector = torch.randn(loaded.hidden_size, generator=torch.Generator().manual_seed(0)) * 2.0
    if args.only_multi_gpu:
        rows.extend(multi_gpu(loaded, make_prompts(8, 50, 400, seed=1), vector, results))
        report(args.out, results, rows)
        return
    inputs = Inputs(loaded, args, vector, vector_prompts, n_gen, new_tokens, results)
    sections: list[tuple[str, Section]] = [] if args.only_generation else [("extraction", extraction)]
    sections += [] if args.skip_eager_generation else [("generation", generation)]
    sections += [("fast_decode", fast_generation)]
    for name, section in sections:
        try:
            rows.extend(section(inputs))
        except Exception as exc:  # report the failure and measure the rest
            traceback.print_exc()
            errors[name] = traceback.format_exc()[-3000:]
            rows.append(Row(f"{name} section", float("nan"), "runs", False, f"{type(exc).__name__}: {exc}"[:200]))
        report(args.out, results, rows, quiet=True)  # what is measured so far survives a later crash
    if torch.cuda.device_count() >= 2 and not args.skip_multi_gpu:
        rows.extend(multi_gpu(loaded, make_prompts(8, 50, 400, seed=1), vector, results))
    report(args.out, results, rows)


def extraction(inputs: Inputs) -> list[Row]:
    """Extraction at layer 16 (packed on the GPU) and every layer, against the padded path and a plain forward."""
    loaded, args, vector_prompts, results = inputs.loaded, inputs.args, inputs.vector_prompts, inputs.results
    half = len(vector_prompts) // 2
    target, baseline = vector_prompts[:half], vector_prompts[half:]

    def extract_both(layers: list[int] | None, packing: str = "auto") -> list[torch.Tensor]:
        """Both sets in one call, as a run's cache misses are (`activations.prompt_sets_means`)."""
        extracted = extract_prompt_sets(
            loaded.model,
            loaded.tokenizer,
            [target, baseline],
            layers,
            batch_size=64,
            max_batch_tokens=32768,
            progress=False,
            packing=packing,
        )
        return [activations for activations, _ in extracted]

    started = time.perf_counter()
    packed = torch.cat(extract_both([16], "packed"))
    first_packed_s = time.perf_counter() - started
    padded = torch.cat(extract_both([16], "padded"))
    relative = float(((packed - padded).norm(dim=-1) / padded.norm(dim=-1)).max())
    checked = min(40, len(target))  # the first prompts of the target set: rows 0.. of `packed` and `padded`
    packed_error, padded_error = fp32_errors(loaded, target[:checked], packed[:checked], padded[:checked])
    times = side_by_side(
        {
            "plain_forward_b32": lambda: plain_full_forward(loaded, vector_prompts, 32),
            "extract_to_16": lambda: extract_both([16]),
            "extract_to_16_padded": lambda: extract_both([16], "padded"),
            "extract_all_layers": lambda: extract_both(None),
            "extract_all_layers_padded": lambda: extract_both(None, "padded"),
        },
        args.repeats,
    )
    results["extraction_s"] = times
    results["extraction_packed_vs_padded_max_relative_difference"] = relative
    results["extraction_fp32_max_relative_error"] = {"packed": packed_error, "padded": padded_error}
    results["packed_layer_compile_s"] = dict(packed_extraction.COMPILE_SECONDS)
    compiled = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in packed_extraction.COMPILE_SECONDS.items())
    n_tokens = int(results["prompt_tokens"])  # type: ignore[call-overload]
    layer_params = sum(p.numel() for p in find_decoder_layers(loaded.model)[0].parameters())
    floor = 2 * n_tokens * layer_params * 17 / 790e12
    packed_s = times["extract_to_16"]
    return [
        Row("plain full forward, 200 prompts, batch 32 (s)", times["plain_forward_b32"], "reference 2.4 s", True),
        at_most(
            "extraction, 2 x 100 prompts, layer 16 (s)",
            packed_s,
            0.6,
            f"{n_tokens} tokens, {n_tokens / packed_s:.0f} tok/s; matmul FLOP floor {floor:.2f} s at 790 TFLOP/s "
            f"({packed_s / floor:.2f}x the floor)",
        ),
        Row(
            "extraction, layer 16, padded batches (the fallback path) (s)",
            times["extract_to_16_padded"],
            "-",
            True,
            f"packed is {times['extract_to_16_padded'] / packed_s:.2f}x faster",
        ),
        Row(
            "extraction, every layer (s)",
            times["extract_all_layers"],
            "-",
            True,
            f"padded {times['extract_all_layers_padded']:.2f} s",
        ),
        Row(
            "layer-16 activations vs an fp32 reference (40 prompts): max relative error, packed",
            packed_error,
            "<= 1.5x padded's",
            packed_error <= 1.5 * padded_error,
            f"padded {padded_error:.4f}; packed vs padded {relative:.4f} (bf16 rounding of different kernels)",
        ),
        Row(
            "first packed extraction call, compile included (s; not in the timed rows)",
            first_packed_s,
            "reported",
            True,
            f"first call of each compiled packed-layer variant: {compiled or 'none (eager)'}",
        ),
    ]


def fp32_errors(
    loaded: LoadedModel, prompts: list[str], packed: torch.Tensor, padded: torch.Tensor
) -> tuple[float, float]:
    """Max relative error of the packed and the padded layer-16 activations against an fp32 copy of the model."""
    reference_model = copy.deepcopy(loaded.model).float()
    reference, _ = extract_last_token_activations(
        reference_model, loaded.tokenizer, prompts, [16], batch_size=8, progress=False, packing="padded"
    )
    del reference_model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    def error(found: torch.Tensor) -> float:
        return float(((found - reference).norm(dim=-1) / reference.norm(dim=-1)).max())

    return error(packed), error(padded)


def generation(inputs: Inputs) -> list[Row]:
    """transformers-generate rows: plain generate (the reference) and generate_with_scales as it is wired."""
    loaded, args, vector, results = inputs.loaded, inputs.args, inputs.vector, inputs.results
    n_gen, new_tokens = inputs.n_gen, inputs.new_tokens
    gen_prompts = make_prompts(n_gen, 50, 400, seed=1)

    def ours(scales: list[float], cache: str | None = None, packed: bool = True, positions: str = "all"):
        settings = exact_length_settings(
            new_tokens, n_gen * len(scales), cache_implementation=cache, packed_prefill=packed, positions=positions
        )
        return lambda: generate_with_scales(loaded, gen_prompts, 16, vector, scales, settings, progress=False)

    def plain_grouped() -> None:
        with grouped_query_decoding(loaded.model):
            plain_generate(loaded, gen_prompts, new_tokens)

    candidates = {
        "plain_generate": lambda: plain_generate(loaded, gen_prompts, new_tokens),
        "plain_generate_grouped_queries": plain_grouped,
        "baseline": ours([0.0]),
        "baseline+steered": ours([0.0, 2.0]),
    }
    if args.with_eager_extras:
        candidates["baseline+5_scales"] = ours([0.0, 0.5, 1.0, 2.0, 4.0, 8.0])
        candidates["baseline+steered_generated_positions"] = ours([0.0, 2.0], positions="generated")
        candidates["baseline+steered_plain_prefill"] = ours([0.0, 2.0], packed=False)
    if args.with_static:
        candidates["baseline+steered_static"] = ours([0.0, 2.0], "static")
    gen = side_by_side(candidates, args.repeats)
    results["generation_s"] = gen
    plain = gen["plain_generate"]
    rows = [Row("plain generate, 50 prompts x 100 tokens (s)", plain, "reference 3.2 s", True)]
    labels = [
        ("baseline+steered", "baseline+steered in one generate (packed prefill)"),
        ("baseline", "baseline alone (packed prefill)"),
        ("baseline+5_scales", "baseline+5 scales (packed prefill)"),
        ("baseline+steered_generated_positions", "baseline+steered, steering generated positions only"),
        ("baseline+steered_plain_prefill", "baseline+steered, prompt prefilled inside generate"),
        ("baseline+steered_static", "baseline+steered, static KV cache"),
    ]
    for name, label in labels:
        if name in gen:
            rows.append(Row(f"{label} / plain generate", gen[name] / plain, "-", True, f"{gen[name]:.2f} s"))
    rows.append(Row("plain generate with grouped-query decoding (s)", gen["plain_generate_grouped_queries"], "-", True))
    return rows


def fast_generation(inputs: Inputs) -> list[Row]:
    """The fast decode path against plain generate in the same run, its decode step against the floor, agreement."""
    loaded, args, vector, results = inputs.loaded, inputs.args, inputs.vector, inputs.results
    n_gen, new_tokens = inputs.n_gen, inputs.new_tokens
    gen_prompts = make_prompts(n_gen, 50, 400, seed=1)
    few = gen_prompts[: max(1, n_gen // 5)]
    infos: dict[str, list[fast_decode.RunInfo]] = {}

    def fast(name: str, prompts: list[str], scales: list[float], positions: str = "all") -> Callable[[], None]:
        def run() -> None:
            fast_rows(loaded, prompts, vector, scales, new_tokens, positions=positions)
            infos.setdefault(name, []).append(fast_decode.last_run_info())

        return run

    candidates = {
        "plain_generate": lambda: plain_generate(loaded, gen_prompts, new_tokens),
        "fast_baseline+steered": fast("fast_baseline+steered", gen_prompts, [0.0, 2.0]),
        "fast_baseline+5_scales": fast("fast_baseline+5_scales", gen_prompts, FIVE_SCALES),
        "fast_baseline+steered_10_prompts": fast("fast_baseline+steered_10_prompts", few, [0.0, 2.0]),
        "fast_baseline+5_scales_generated_positions": fast(
            "fast_baseline+5_scales_generated_positions", gen_prompts, FIVE_SCALES, positions="generated"
        ),
    }
    started = time.perf_counter()
    for name in list(candidates)[1:]:  # first calls compile and capture: kept out of the timed runs
        candidates[name]()
    first_calls = {name: infos.pop(name)[0] for name in list(infos)}
    first_calls_s = time.perf_counter() - started
    compile_s = sum(info.compile_s for info in first_calls.values())
    capture_s = sum(info.capture_s for info in first_calls.values())
    times = side_by_side(candidates, args.repeats)
    runs = {name: found[1:] for name, found in infos.items()}  # without side_by_side's warm-up run
    results["fast_decode_s"] = times
    results["fast_decode_first_calls"] = {name: asdict(info) for name, info in first_calls.items()}
    results["fast_decode_runs"] = {name: [asdict(info) for info in found] for name, found in runs.items()}
    results["fast_decode_compile"] = {"compile_s": compile_s, "capture_s": capture_s, "first_calls_s": first_calls_s}
    plain = times["plain_generate"]
    steered = times["fast_baseline+steered"]
    step_ms = statistics.median(info.step_ms for info in runs["fast_baseline+steered"])
    bandwidth = float(results.get("copy_bandwidth_bytes_per_s") or 4.17e12)  # type: ignore[arg-type]
    floors = {
        "fast_baseline+steered": run_floor(loaded, gen_prompts, 2, new_tokens, bandwidth),
        "fast_baseline+5_scales": run_floor(loaded, gen_prompts, 6, new_tokens, bandwidth),
        "fast_baseline+steered_10_prompts": run_floor(loaded, few, 2, new_tokens, bandwidth),
        "fast_baseline+5_scales_generated_positions": run_floor(
            loaded, gen_prompts, 6, new_tokens, bandwidth, steer_prompt=False
        ),
    }
    results["run_floors"] = floors
    rows = [
        at_most(
            "fast: baseline+steered, 50 prompts x 100 tokens (s)",
            steered,
            1.2,
            f"{run_detail(runs['fast_baseline+steered'])}; {floor_detail(floors['fast_baseline+steered'], 1.2)}",
        ),
        at_most(
            "fast baseline+steered / plain generate, same run", steered / plain, 0.3, f"plain generate {plain:.2f} s"
        ),
    ]
    for name, label, limit in (
        ("fast_baseline+5_scales", "fast: baseline + 5 scales, 50 prompts x 100 tokens (s)", 1.8),
        ("fast_baseline+steered_10_prompts", "fast: baseline+steered, 10 prompts x 100 tokens (s)", 0.6),
    ):
        detail = f"{run_detail(runs[name])}; {floor_detail(floors[name], limit)}"
        rows.append(at_most(label, times[name], limit, detail))
    rows.append(
        Row(
            "fast: baseline + 5 scales, prompt positions unsteered (`--steer-positions generated`) (s)",
            times["fast_baseline+5_scales_generated_positions"],
            "-",
            True,
            "one prefill per prompt serves its six rows; "
            + run_detail(runs["fast_baseline+5_scales_generated_positions"])
            + "; "
            + floor_detail(floors["fast_baseline+5_scales_generated_positions"]),
        )
    )
    rows += [
        Row(
            "compile and capture of the runs' buckets (s; not in the timed rows)",
            compile_s + capture_s,
            "reported",
            True,
            f"decode step compile/warm-up {compile_s:.1f} s, capture {capture_s:.2f} s; first calls in all "
            f"{first_calls_s:.1f} s (packed prefill layers compiled at their first call: "
            f"{packed_extraction.COMPILE_SECONDS})",
        ),
    ]
    if not args.smoke:
        length = runs["fast_baseline+steered"][-1].bucket_length
        rows.append(decode_step_row(loaded, gen_prompts, new_tokens, step_ms, length, results))
    eager = eager_rows(loaded, gen_prompts, vector, [0.0, 2.0], new_tokens, GREEDY)
    greedy = fast_rows(loaded, gen_prompts, vector, [0.0, 2.0], new_tokens)
    share, detail = agreement(greedy, eager)
    rows.append(
        Row(
            "greedy token ids, fast path = transformers generate (share of rows)",
            share,
            ">= 0.95",
            share >= 0.95,
            detail,
        )
    )
    warm = SamplingSettings(0.7, seed=0)
    eager_warm = eager_rows(loaded, gen_prompts, vector, [0.0, 2.0], new_tokens, warm)
    share_warm, detail_warm = agreement(
        fast_rows(loaded, gen_prompts, vector, [0.0, 2.0], new_tokens, warm), eager_warm
    )
    rows.append(Row("temperature 0.7 token ids, fast = generate (share of rows)", share_warm, "-", True, detail_warm))
    results["agreement"] = {"greedy": [share, detail], "t0.7": [share_warm, detail_warm]}
    results["decode_attention_kernel_ms"] = decode_runner.runner_for(loaded.model).kernel_ms
    if not args.smoke:
        (eager_share, eager_detail), (fast_share, fast_detail), (fp32_share, fp32_detail), kept = fp32_agreement(
            loaded, gen_prompts, vector, new_tokens, eager, greedy
        )
        results["agreement"]["tokens_kept_of_fp32"] = kept
        rows.append(
            Row(
                "bf16: mean tokens kept of the fp32 answers, fast path / transformers generate",
                kept["fast"] / max(kept["generate"], 1e-9),
                ">= 0.75",
                kept["fast"] >= 0.75 * kept["generate"],
                f"fast {kept['fast']:.1f}, generate {kept['generate']:.1f} of {new_tokens} tokens",
            )
        )
        results["agreement"]["fp32_reference"] = {
            "eager": [eager_share, eager_detail],
            "fast": [fast_share, fast_detail],
            "fast_fp32_vs_generate_fp32": [fp32_share, fp32_detail],
        }
        rows.append(
            Row(
                "greedy token ids, fast path = transformers generate, both on an fp32 copy (share of rows)",
                fp32_share,
                ">= 0.95",
                fp32_share >= 0.95,
                fp32_detail,
            )
        )
        rows.append(
            Row(
                "greedy token ids equal to an fp32 reference: fast path (share of rows)",
                fast_share,
                "-",
                True,
                f"fast: {fast_detail}. transformers generate (bf16): {eager_detail}",
            )
        )
    return rows


def fp32_agreement(
    loaded: LoadedModel,
    prompts: list[str],
    vector: torch.Tensor,
    new_tokens: int,
    eager: list[list[int]],
    fast: list[list[int]],
) -> tuple[tuple[float, str], tuple[float, str], tuple[float, str], dict[str, float]]:
    """How far each bf16 path's greedy tokens get before leaving those of an fp32 copy of the model, and
    whether the fast path and `generate` agree when both run that fp32 copy (TF32 off): the path's own
    differences without bf16 rounding."""
    reference_model = copy.deepcopy(loaded.model).float()
    reference = LoadedModel(reference_model, loaded.tokenizer, loaded.name, loaded.fingerprint)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        tokens = eager_rows(reference, prompts, vector, [0.0, 2.0], new_tokens, GREEDY)
        fast_fp32 = fast_rows(reference, prompts, vector, [0.0, 2.0], new_tokens)
    finally:
        torch.set_float32_matmul_precision(precision)
        fast_decode.release(reference_model)
    del reference, reference_model
    torch.cuda.empty_cache()
    kept = {"generate": tokens_kept(eager, tokens), "fast": tokens_kept(fast, tokens)}
    return agreement(eager, tokens), agreement(fast, tokens), agreement(fast_fp32, tokens), kept


def decode_step_row(
    loaded: LoadedModel, prompts: list[str], new_tokens: int, step_ms: float, length: int, results: dict[str, object]
) -> Row:
    """The 100-row decode step against the bytes it must read, with GPU time by kernel kind."""
    bandwidth = float(results["copy_bandwidth_bytes_per_s"])  # type: ignore[arg-type]
    floor = decode_floor(loaded, prompts, 2, new_tokens)
    floor_ms = 1000 * (floor["weight_bytes"] + floor["kv_bytes"]) / bandwidth
    results["decode_floor"] = {**floor, "bandwidth": bandwidth, "floor_ms": floor_ms}
    try:
        kinds = profile_fast_step(loaded, 2 * len(prompts), length)
    except Exception as exc:  # the profile explains the figure; it is not a target
        kinds = {}
        results["errors"]["profile"] = repr(exc)  # type: ignore[index]
    results["decode_step_kernels_ms"] = kinds
    by_kind = ", ".join(f"{kind} {ms:.2f}" for kind, ms in sorted(kinds.items(), key=lambda item: -item[1]))
    return at_most(
        "decode step at 100 rows (ms)",
        step_ms,
        9,
        f"floor {floor_ms:.2f} ms ({floor['weight_bytes'] / 1e9:.1f} GB weights + {floor['kv_bytes'] / 1e9:.1f} GB "
        f"KV at {bandwidth / 1e12:.2f} TB/s copy bandwidth), {step_ms / floor_ms:.2f}x the floor; "
        f"GPU ms per step by kernel kind (uncaptured): {by_kind}",
    )


def at_most(name: str, value: float, limit: float, detail: str) -> Row:
    """A row whose target is `value <= limit`."""
    return Row(name, value, f"<= {limit}", value <= limit, detail)


def run_detail(runs: list[fast_decode.RunInfo]) -> str:
    last = runs[-1]
    prefill = statistics.median(info.prefill_s for info in runs)
    step = statistics.median(info.step_ms for info in runs)
    return (
        f"{last.rows} rows, bucket {last.bucket_rows} x {last.bucket_length}, {last.mode}; "
        f"prefill {prefill:.2f} s, {step:.2f} ms/step"
    )


def report(out: Path | None, results: dict[str, object], rows: list[Row], quiet: bool = False) -> None:
    title = f"GPU: {results['gpu']}, random Llama-3.1-8B shape, bf16"
    if quiet:
        with contextlib.redirect_stdout(io.StringIO()):
            results["table"] = print_targets(title, rows)
    else:
        results["table"] = print_targets(title, rows)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "benchmark.json").write_text(json.dumps(results, indent=2, default=str))


def multi_gpu(single: LoadedModel, prompts: list[str], vector: torch.Tensor, results: dict[str, object]) -> list[Row]:
    """Save the model, reload it with --tensor-parallel-size 2, and compare greedy texts and timings."""
    import time
    from dataclasses import replace as replace_settings

    # a model split over devices prefills inside generate (see generation._prompt_cache): compare like with like
    settings = GenerationSettings(max_new_tokens=24, temperature=0.0, batch_size=64, packed_prefill=False)
    one = generate_with_scales(single, prompts, 16, vector, [0.0, 2.0], settings, progress=False)
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:
        single.model.save_pretrained(folder)
        single.tokenizer.save_pretrained(folder)
        started = time.perf_counter()
        spread = load_model(folder, device="cuda", dtype="bfloat16", tensor_parallel_size=2)
        load_s = time.perf_counter() - started
    devices = sorted({str(p.device) for p in spread.model.parameters()})
    two = generate_with_scales(spread, prompts, 16, vector, [0.0, 2.0], settings, progress=False)
    times = side_by_side(
        {
            "one_gpu": lambda: generate_with_scales(single, prompts, 16, vector, [0.0, 2.0], settings, progress=False),
            "two_gpus": lambda: generate_with_scales(spread, prompts, 16, vector, [0.0, 2.0], settings, progress=False),
        },
        2,
    )
    same = one.texts == two.texts
    packed_one = generate_with_scales(
        single, prompts, 16, vector, [0.0, 2.0], replace_settings(settings, packed_prefill=True), progress=False
    )
    pairs = [(a, b) for ra, rb in zip(one.texts, packed_one.texts, strict=True) for a, b in zip(ra, rb, strict=True)]
    packed_agreement = sum(a == b for a, b in pairs) / len(pairs)
    checks = {}
    for cache in ("static", "dynamic"):
        forced = replace_settings(settings, cache_implementation=cache)
        try:
            a = generate_with_scales(single, prompts, 16, vector, [0.0, 2.0], forced, progress=False).texts
            b = generate_with_scales(spread, prompts, 16, vector, [0.0, 2.0], forced, progress=False).texts
            checks[cache] = a == b
        except Exception as exc:  # report, do not hide: a cache kind may not support several devices
            checks[cache] = f"{exc.__class__.__name__}: {exc}"[:300]
    results["texts_equal_by_cache"] = checks
    print("texts equal with the same cache kind on both:", checks, flush=True)
    caches = {"one_gpu": settings.cache_implementation, "two_gpus": settings.cache_implementation}
    results["multi_gpu"] = {
        "devices": devices,
        "load_s": load_s,
        "generate_s": times,
        "texts_equal": same,
        "one_gpu_packed_vs_plain_prefill_agreement": packed_agreement,
        "kv_cache": caches,
    }
    return [
        Row("TP=2: greedy baseline+steered texts equal single-GPU", float(same), "1", same, f"devices {devices}"),
        Row(
            "one GPU: greedy texts with packed prefill equal to generate's own prefill (share)",
            packed_agreement,
            "-",
            True,
            "bf16 rounding differs with batch shapes; near-ties of a random model can flip",
        ),
        Row(
            "TP=2 / one GPU generate time (8 prompts x 24 tokens)",
            times["two_gpus"] / times["one_gpu"],
            "-",
            True,
            f"{times['two_gpus']:.2f} s vs {times['one_gpu']:.2f} s",
        ),
    ]


if __name__ == "__main__":
    main()
