"""`test_tulu_contrastive_steering`: the seed's command line, offline-capable."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from chunky_utils.activations import READ_POSITIONS
from chunky_utils.config import CAPTURE_MODES, RunConfig
from chunky_utils.data import DATA_SOURCES, TULU_SET_LABELS, TULU_SET_MAP
from chunky_utils.errors import UsageError
from chunky_utils.models import EMBEDDED_MODEL_ID
from chunky_utils.steering import STEER_POSITIONS

log = logging.getLogger("chunky_utils")
T = TypeVar("T")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports errors on one line with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def subset_help() -> str:
    return "; ".join(f"{key}={TULU_SET_LABELS[key]}" for key in TULU_SET_MAP)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="test_tulu_contrastive_steering",
        description="Contrastive activation steering between two Tulu subsets (or prompt files).",
        epilog=f"Subset keys: {subset_help()}. A subset may also be a .jsonl/.json/.csv/.parquet file.",
    )
    core = parser.add_argument_group("steering")
    core.add_argument("--target-subset", required=True, help="subset to steer toward (key 0..18 or file)")
    core.add_argument("--baseline-subset", required=True, help="subset to steer away from (key 0..18 or file)")
    core.add_argument("--layer", type=int, required=True, help="decoder layer to read and steer")
    core.add_argument("--scale", type=finite_float, default=1.0, help="steering multiplier; negative reverses")
    core.add_argument("--n-samples", type=int, default=100, help="prompts per subset for the vector (-1 = all)")
    inference = parser.add_argument_group("inference")
    inference.add_argument("--inference-dataset", default=None, help="subset for test prompts (default: 5 built-ins)")
    inference.add_argument("--inference-n-samples", type=int, default=10, help="test prompts to draw (-1 = all)")
    inference.add_argument(
        "--include-vector-prompts",
        action="store_true",
        help="allow prompts used to build the vector in the inference draw (the seed did)",
    )
    inference.add_argument("--max-tokens", type=int, default=100, help="new tokens per answer")
    inference.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0 = greedy)")
    inference.add_argument("--seed", type=int, default=0, help="seed for prompt draws and sampling")
    inference.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = off)")
    inference.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    inference.add_argument("--min-tokens", type=int, default=0, help="answers at least this many tokens long")
    inference.add_argument(
        "--no-baseline-cache",
        action="store_true",
        help="generate unsteered answers again instead of reusing cached ones (chunky_utils.baselines)",
    )
    inference.add_argument(
        "--steer-positions",
        choices=STEER_POSITIONS,
        default="all",
        help="add the vector at every position (seed) or on generated tokens only",
    )
    model = parser.add_argument_group("model and data")
    model.add_argument(
        "--model",
        default=EMBEDDED_MODEL_ID,
        help=f"Hugging Face id, local folder, {EMBEDDED_MODEL_ID} or tiny-random:<arch>",
    )
    model.add_argument(
        "--data-source",
        choices=DATA_SOURCES,
        default="auto",
        help="hub, bundled offline sample, or auto (hub when reachable)",
    )
    model.add_argument(
        "--read-position",
        choices=READ_POSITIONS,
        default="generation_prompt",
        help="read after the assistant header (default) or at the end of the user turn",
    )
    model.add_argument(
        "--capture",
        choices=CAPTURE_MODES,
        default="all",
        help="extract every layer at once (default) or only up to --layer",
    )
    model.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs to spread the model over")
    model.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    model.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    model.add_argument("--batch-size", type=int, default=32, help="rows per forward/generate batch")
    model.add_argument("--trust-remote-code", action="store_true", help="allow model repos to run their own code")
    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", default="results", help="results root (default: results/)")
    out.add_argument(
        "--cache-dir",
        default=None,
        help="activation cache (default: cache/, or OUTPUT_DIR/dataset_cache when --output-dir is given)",
    )
    out.add_argument("--overwrite", action="store_true", help="replace an existing result made with other settings")
    out.add_argument(
        "--no-metrics",
        action="store_true",
        help="skip scoring the texts (concept, perplexity, distinct-2, relevance, overall)",
    )
    out.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return RunConfig(
        target_subset=args.target_subset,
        baseline_subset=args.baseline_subset,
        layer=args.layer,
        scale=args.scale,
        model=args.model,
        n_samples=args.n_samples,
        inference_dataset=args.inference_dataset,
        inference_n_samples=args.inference_n_samples,
        include_vector_prompts=args.include_vector_prompts,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_tokens=args.min_tokens,
        reuse_baselines=not args.no_baseline_cache,
        seed=args.seed,
        data_source=args.data_source,
        read_position=args.read_position,
        steer_positions=args.steer_positions,
        capture=args.capture,
        output_dir=args.output_dir,
        cache_dir=args.cache_dir,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        tensor_parallel_size=args.tensor_parallel_size,
        trust_remote_code=args.trust_remote_code,
        overwrite=args.overwrite,
        progress=not args.quiet,
        metrics=not args.no_metrics,
    )


def setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def guarded(action: Callable[[], T], interrupted: str) -> T | int:
    """Run a command body: a UsageError becomes one line and exit 2, Ctrl-C a message and exit 130."""
    try:
        return action()
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    from chunky_utils.pipeline import run_experiment

    outcome = guarded(
        lambda: run_experiment(config_from_args(args).validated()), "interrupted: no partial result was written"
    )
    if isinstance(outcome, int):
        return outcome
    for scale, path in outcome.written.items():
        print(path)
        collapsed = outcome.payloads[scale]["metadata"].get("collapsed")
        if collapsed is not None:
            n = len(outcome.payloads[scale]["results"])
            print(
                f"  collapsed answers (chunky_utils.collapse): steered {collapsed['steered']}/{n}, "
                f"baseline {collapsed['baseline']}/{n}"
            )
    for path in outcome.skipped.values():
        print(f"{path} (already finished)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
