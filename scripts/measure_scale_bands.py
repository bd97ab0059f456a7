"""Measure how steering strength relates to collapse, for the playground's scale guidance.

    .venv/bin/python scripts/measure_scale_bands.py --out results/scale_bands

For each layer it generates greedy answers at scales chosen so that the effective magnitude is a set share
of the layer's mean residual-stream norm (the mean of the target and baseline means' norms), scores them
(the Runner's metrics, so the collapse verdict includes perplexity), and writes every result JSON in the
CLI's layout under OUT. `chunky_utils.notebook.scale_bands(...)` then reads the bands from those files;
docs/scale_bands.md records what one run measured.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from chunky_utils.config import RunConfig
from chunky_utils.pipeline import Runner

SHARES = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)
"""Relative magnitudes asked for: |scale| x vector norm / mean residual norm."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/scale_bands"))
    parser.add_argument("--pairs", nargs="+", default=["12:0"], help="target:baseline subset keys")
    parser.add_argument("--layers", nargs="+", type=int, default=[8, 16, 24])
    parser.add_argument("--inference-dataset", default="2")
    parser.add_argument("--inference-n-samples", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--n-samples", type=int, default=100)
    parser.add_argument("--shares", nargs="+", type=float, default=list(SHARES), help="relative magnitudes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    runner = Runner()
    for pair in args.pairs:
        target, baseline = pair.split(":")
        for layer in args.layers:
            config = RunConfig(
                target_subset=target,
                baseline_subset=baseline,
                layer=layer,
                n_samples=args.n_samples,
                inference_dataset=args.inference_dataset,
                inference_n_samples=args.inference_n_samples,
                max_tokens=args.max_tokens,
                temperature=0.0,
                data_source="bundled",
                output_dir=str(args.out),
                cache_dir="cache",
                progress=False,
            )
            vector, _ = runner.vector(config, runner.prompts(config))
            meta = vector.metadata
            mean_norm = (meta["target_norms"][layer] + meta["baseline_norms"][layer]) / 2
            scales = [float(f"{share * mean_norm / vector.norm(layer):.3g}") for share in args.shares]
            for record in runner.run(config, scales=scales):
                path = runner.save(record, overwrite=True)
                collapsed = record.payload["metadata"]["collapsed"]["steered"]
                print(f"{path}: scale {record.config.scale:g}, {collapsed} collapsed", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
