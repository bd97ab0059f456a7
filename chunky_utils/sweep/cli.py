"""`chunky-sweep`: the grid's flags, the shared settings generated from `RunConfig`'s declarations, and main."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from chunky_utils.cli import OneLineParser, guarded, setup_logging
from chunky_utils.config import RunConfig
from chunky_utils.options import add_options, finite_float
from chunky_utils.sweep.driver import POINT_NOTEBOOK, SweepReport, run_sweep
from chunky_utils.sweep.executors import EXECUTORS, SUBMITIT_CLUSTERS
from chunky_utils.sweep.load import load_sweep, read_sweep_file
from chunky_utils.sweep.spec import DEFAULT_ROOT, SETTING_FIELDS, SweepSpec, plan_sweep

_SUBMITIT_FLAGS = {
    "submitit_cluster": "cluster",
    "slurm_partition": "slurm_partition",
    "gpus_per_job": "gpus_per_node",
    "timeout_min": "timeout_min",
}


def build_parser() -> argparse.ArgumentParser:
    """The grid and run flags, plus every shared `RunConfig` option (chunky_utils.options declares them)."""
    parser = OneLineParser(
        prog="chunky-sweep",
        description="Run notebooks/04_sweep_point.ipynb through papermill over pairs x layers x scales.",
        epilog="Flags override --config values; the steering, inference, model and output settings are shared by "
        "every point and mean what they mean for test_tulu_contrastive_steering. Outputs: "
        "results/sweeps/<name>/ (results, notebooks, status.json, summary.csv, overview.html). "
        "Rerun the same command to resume.",
    )
    parser.add_argument("--config", help="YAML file with grid keys and settings (see README 'Sweeps')")
    parser.add_argument("--name", help="sweep name (default: sweep-<hash of grid and settings>)")
    parser.add_argument("--output-dir", dest="output_dir", help=f"folder holding sweeps (default: {DEFAULT_ROOT})")
    parser.add_argument("--output-root", dest="output_dir", help="deprecated alias of --output-dir")
    grid = parser.add_argument_group("grid")
    grid.add_argument("--pairs", nargs="+", metavar="T:B", help="target:baseline subset pairs, e.g. 12:0 8:5")
    grid.add_argument("--layers", nargs="+", type=int, metavar="L", help="decoder layers")
    grid.add_argument("--scales", nargs="+", type=finite_float, metavar="S", help="steering scales")
    grid.add_argument(
        "--inference-datasets", nargs="+", metavar="D", help="inference subsets ('none' = the 5 built-in prompts)"
    )
    grid.add_argument("--inference-n-samples", nargs="+", type=int, metavar="N", help="inference prompt counts")
    add_options(parser, RunConfig, names=frozenset(SETTING_FIELDS), shared=True)
    run = parser.add_argument_group("running")
    run.add_argument("--workers", type=int, help="groups run at once (one GPU each where GPUs exist; default 1)")
    run.add_argument("--executor", choices=EXECUTORS, help="local processes (default) or submitit jobs")
    run.add_argument("--submitit-cluster", choices=SUBMITIT_CLUSTERS, help="auto: SLURM where sbatch exists")
    run.add_argument("--slurm-partition", help="SLURM partition for submitit jobs")
    run.add_argument("--gpus-per-job", type=int, help="GPUs per submitit job (SLURM)")
    run.add_argument("--timeout-min", type=int, help="time limit per submitit job in minutes (default 240)")
    run.add_argument("--notebook", help=f"point notebook (default notebooks/{POINT_NOTEBOOK})")
    run.add_argument("--kernel", help="Jupyter kernel name (default python3)")
    run.add_argument("--dry-run", action="store_true", help="list the groups and what would run, then stop")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar, warnings only")
    return parser


def mapping_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The --config file's mapping with every given flag laid over it."""
    mapping = read_sweep_file(args.config) if args.config else {}
    submitit_params = dict(mapping.get("submitit") or {}) if isinstance(mapping.get("submitit"), Mapping) else {}
    if args.output_dir is not None:  # the flag wins over the file's key, under either of its names
        mapping.pop("output_root", None)
    skip = {"config", "dry_run", "quiet", *_SUBMITIT_FLAGS}
    for key, value in vars(args).items():
        if key in skip or value is None:
            continue
        mapping[key] = value
    for flag, param in _SUBMITIT_FLAGS.items():
        if getattr(args, flag) is not None:
            submitit_params[param] = getattr(args, flag)
    if submitit_params:
        mapping["submitit"] = submitit_params
    return mapping


def describe_plan(spec: SweepSpec) -> list[str]:
    """The dry run's lines: the sweep, then each group with its scales and their states."""
    groups, states = plan_sweep(spec)
    lines = [f"sweep {spec.sweep_name} -> {spec.folder}: {len(states)} points in {len(groups)} notebook run(s)"]
    labels = {"absent": "to run", "same": "finished", "different": "other settings"}
    for group in groups:
        marks = [f"{config.scale:g} ({labels[states[group.point_id(config)]]})" for config in group.configs]
        lines.append(f"  {group.id}: scales {', '.join(marks)}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """The `chunky-sweep` command: 0 when every point finished, 1 when some failed, 2 on bad input."""
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)

    def body() -> SweepReport | None:
        spec, options = load_sweep(mapping_from_args(args))
        if args.dry_run:
            print("\n".join(describe_plan(spec)))
            return None
        return run_sweep(spec, replace(options, progress=not args.quiet))

    report = guarded(body, "interrupted: finished points are kept; rerun the same command to resume")
    if report is None:
        return 0
    if isinstance(report, int):
        return report
    print(
        f"sweep {report.folder.name}: {len(report.ran)} run, {len(report.skipped)} already finished, "
        f"{len(report.failed)} failed"
    )
    for path in (report.summary, report.figure):
        if path is not None:
            print(path)
    if report.failed:
        print(f"failed points and their errors: {report.status}", file=sys.stderr)
        return 1
    return 0
