"""Where a notebook runs and what it runs: the project root, and a validated `RunConfig` from its parameters."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from chunky_utils.config import RunConfig
from chunky_utils.errors import UsageError


def project_root(start: Path | str | None = None) -> Path | None:
    """The workbench folder (holding pyproject.toml and chunky_utils/) at or above `start` (default: cwd)."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "chunky_utils").is_dir():
            return folder
    return None


def use_project_root(start: Path | str | None = None) -> Path:
    """Change into the project root, so relative paths mean what they mean for the CLI; return the folder used.

    JupyterLab starts kernels in `notebooks/`; outside the project the working folder stays as it is.
    """
    root = project_root(start)
    if root is not None:
        os.chdir(root)
    return Path.cwd()


SUBSET_FIELDS: tuple[str, ...] = ("target_subset", "baseline_subset", "inference_dataset")


def config_from_parameters(parameters: Mapping[str, Any], **overrides: Any) -> RunConfig:
    """A validated `RunConfig` from a notebook's parameters (e.g. `globals()`): the names that are RunConfig
    fields are used, the rest ignored. Subsets become strings and the scale a float, since papermill's `-p 12`
    passes an int and the settings hash must match the CLI's."""
    values = {name: parameters[name] for name in RunConfig.field_names() if name in parameters}
    values.update(overrides)
    for name in SUBSET_FIELDS:
        if values.get(name) is not None:
            values[name] = str(values[name])
    if "scale" in values:
        try:
            values["scale"] = float(values["scale"])
        except (TypeError, ValueError):
            raise UsageError(f"scale must be a number, got {values['scale']!r}") from None
    try:
        config = RunConfig(**values)
    except TypeError as exc:
        raise UsageError(f"cannot build a run from these parameters: {exc}") from None
    return config.validated()
