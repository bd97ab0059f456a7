"""Rewrite (or, with --check, compare) the RunConfig option lines of notebooks' `parameters` cells from the
declarations in chunky_utils.options: `python scripts/sync_notebook_parameters.py notebooks/*.ipynb [--check]`."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chunky_utils.config import RunConfig  # noqa: E402
from chunky_utils.options import sync_parameters_cell  # noqa: E402


def main(argv: list[str]) -> int:
    check = "--check" in argv
    paths = [arg for arg in argv if arg != "--check"]
    stale = [path for path in paths if not sync_parameters_cell(path, RunConfig, check=check)]
    if stale:
        print(("out of date: " if check else "rewrote: ") + ", ".join(stale))
    return 1 if stale and check else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
