"""Keep executed outputs out of git: strip a notebook's outputs, execution counts and run-time metadata.

    .venv/bin/python scripts/strip_notebook_outputs.py < in.ipynb > out.ipynb   # git's clean filter
    .venv/bin/python scripts/strip_notebook_outputs.py --check notebooks/*.ipynb  # exit 1 if any holds outputs
    .venv/bin/python scripts/strip_notebook_outputs.py --in-place notebooks/*.ipynb

`make install` registers it as the git filter `chunky-strip` (see .gitattributes), so `git add` stores
notebooks without outputs while the working copy keeps them; `tests/test_notebooks.py` runs `--check` on the
committed notebooks. Output is nbformat's own layout (indent 1, sorted keys, a final newline), so a
committed notebook (no outputs) passes through unchanged. Only the standard library is used.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

RUN_CELL_METADATA = ("execution", "ExecuteTime", "papermill", "scrolled")
RUN_NOTEBOOK_METADATA = ("widgets", "papermill")


def strip(notebook: dict[str, Any]) -> dict[str, Any]:
    """The notebook without outputs, execution counts and what running it added to the metadata."""
    for cell in notebook.get("cells", []):
        metadata = cell.get("metadata", {})
        for key in RUN_CELL_METADATA:
            metadata.pop(key, None)
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    metadata = notebook.get("metadata", {})
    for key in RUN_NOTEBOOK_METADATA:
        metadata.pop(key, None)
    if isinstance(metadata.get("language_info"), dict):  # the kernel fills in versions when it runs
        metadata["language_info"] = {"name": metadata["language_info"].get("name", "python")}
    return notebook


def dumps(notebook: dict[str, Any]) -> str:
    """The notebook as nbformat writes it."""
    return json.dumps(notebook, sort_keys=True, indent=1, ensure_ascii=False, separators=(",", ": ")) + "\n"


def problems(path: Path) -> list[str]:
    """What running left in a notebook file (empty when it is clean)."""
    notebook = json.loads(path.read_text(encoding="utf-8"))
    found = []
    for index, cell in enumerate(notebook.get("cells", [])):
        if cell.get("outputs"):
            found.append(f"cell {index} has outputs")
        if cell.get("execution_count") is not None:
            found.append(f"cell {index} has an execution count")
    if any(key in notebook.get("metadata", {}) for key in RUN_NOTEBOOK_METADATA):
        found.append("notebook metadata holds widget or papermill state")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (none: read stdin, write stdout)")
    parser.add_argument("--check", action="store_true", help="only report notebooks holding outputs; exit 1 if any")
    parser.add_argument("--in-place", action="store_true", help="rewrite the given notebooks stripped")
    args = parser.parse_args(argv)
    if not args.paths:
        sys.stdout.write(dumps(strip(json.load(sys.stdin))))
        return 0
    dirty = 0
    for path in args.paths:
        if args.check:
            for problem in problems(path):
                print(f"{path}: {problem} (clear outputs before committing: make install sets a git filter)")
                dirty = 1
        elif args.in_place:
            path.write_text(dumps(strip(json.loads(path.read_text(encoding="utf-8")))), encoding="utf-8")
        else:
            sys.stdout.write(dumps(strip(json.loads(path.read_text(encoding="utf-8")))))
    return dirty


if __name__ == "__main__":
    raise SystemExit(main())
