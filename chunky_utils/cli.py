"""`test_tulu_contrastive_steering`: the seed's command line, offline-capable."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from chunky_utils.config import RunConfig
from chunky_utils.data import TULU_SET_LABELS, TULU_SET_MAP
from chunky_utils.errors import UsageError
from chunky_utils.options import add_options

log = logging.getLogger("chunky_utils")
T = TypeVar("T")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports errors on one line with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def subset_help() -> str:
    return "; ".join(f"{key}={TULU_SET_LABELS[key]}" for key in TULU_SET_MAP)


def build_parser() -> argparse.ArgumentParser:
    """Every `RunConfig` option as a flag (chunky_utils.options declares them), plus -q."""
    parser = OneLineParser(
        prog="test_tulu_contrastive_steering",
        description="Contrastive activation steering between two Tulu subsets (or prompt files).",
        epilog=f"Subset keys: {subset_help()}. A subset may also be a .jsonl/.json/.csv/.parquet file.",
    )
    add_options(parser, RunConfig)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return RunConfig(
        **{name: getattr(args, name) for name in RunConfig.field_names() if hasattr(args, name)},
        progress=not args.quiet,
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
