"""Reading a sweep: a YAML `--config` file and flags merged into one mapping, checked into a spec."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from chunky_utils.config import RunConfig
from chunky_utils.data import TULU_SET_MAP, USER_FILE_SUFFIXES
from chunky_utils.errors import UsageError
from chunky_utils.sweep.executors import EXECUTORS, SUBMITIT_CLUSTERS
from chunky_utils.sweep.spec import DEFAULT_ROOT, SETTING_FIELDS, SweepOptions, SweepSpec

GRID_KEYS: tuple[str, ...] = ("pairs", "layers", "scales", "inference_datasets", "inference_n_samples")
OPTION_KEYS: tuple[str, ...] = ("workers", "executor", "submitit", "notebook", "kernel")
ROOT_KEYS: tuple[str, ...] = ("output_dir", "output_root")
"""The folder holding sweeps: `output_dir` as in the steering CLI, `output_root` its former name."""
NONE_WORDS = frozenset({"none", "null", "builtin", "built-in", ""})


def _as_list(key: str, value: Any) -> list[Any]:
    values = list(value) if isinstance(value, list | tuple) else [value]
    if not values:
        raise UsageError(f"{key} needs at least one value")
    return values


def _unique(values: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(dict.fromkeys(values))


def _subset_arg(value: Any, what: str) -> str:
    """A Tulu key as text, or a prompt file as an absolute path (so every worker reads the same file)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise UsageError(f"{what} must be a Tulu key or a prompt file, got {value!r}")
    text = str(value).strip()
    if text not in TULU_SET_MAP and Path(text).suffix.lower() in USER_FILE_SUFFIXES:
        return str(Path(text).expanduser().resolve())
    return text


def _integer(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise UsageError(f"{what} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    raise UsageError(f"{what} must be an integer, got {value!r}")


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise UsageError(f"{what} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise UsageError(f"{what} must be finite, got {value!r}")
    return number


def parse_pair(value: Any) -> tuple[str, str]:
    """'12:0', [12, 0] or {target: 12, baseline: 0} -> ('12', '0')."""
    if isinstance(value, Mapping):
        if set(value) != {"target", "baseline"}:
            raise UsageError(f"a pair mapping needs exactly 'target' and 'baseline', got {sorted(value)}")
        parts = [value["target"], value["baseline"]]
    elif isinstance(value, list | tuple):
        parts = list(value)
    else:
        parts = str(value).split(":")
    if len(parts) != 2 or any(str(part).strip() == "" for part in parts):
        raise UsageError(f"a pair is TARGET:BASELINE (e.g. 12:0), got {value!r}")
    return _subset_arg(parts[0], "a pair's target"), _subset_arg(parts[1], "a pair's baseline")


def _inference_dataset(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS):
        return None
    return _subset_arg(value, "--inference-datasets")


_FIELD_TYPES = {f.name: str(f.type) for f in fields(RunConfig)}


def coerce_setting(name: str, value: Any) -> Any:
    """A RunConfig setting in its field's type, so YAML `temperature: 0` and the flag `0.0` hash alike."""
    kind = _FIELD_TYPES[name]
    flag = "--" + name.replace("_", "-")
    if value is None and "None" in kind:
        return None
    if kind.startswith("bool"):
        if not isinstance(value, bool):
            raise UsageError(f"{flag} must be true or false, got {value!r}")
        return value
    if kind.startswith("int"):
        return _integer(value, flag)
    if kind.startswith("float"):
        return _number(value, flag)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise UsageError(f"{flag} must be text, got {value!r}")
    return str(value)


def check_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name):
        raise UsageError(
            f"--name must be letters, digits, '.', '_' or '-' (starting with a letter or digit), got {name!r}"
        )
    return name


def output_root(mapping: Mapping[str, Any]) -> str:
    """The folder holding sweeps, from `output_dir` or its former name `output_root` (they must agree)."""
    given = {str(mapping[key]) for key in ROOT_KEYS if mapping.get(key)}
    if len(given) > 1:
        raise UsageError(f"output_dir and output_root (its former name) disagree: {', '.join(sorted(given))}")
    return given.pop() if given else DEFAULT_ROOT


def load_sweep(mapping: Mapping[str, Any]) -> tuple[SweepSpec, SweepOptions]:
    """Build a spec and run options from a YAML mapping (flags already merged in); UsageError on bad input."""
    known = {"name", *ROOT_KEYS, *GRID_KEYS, *OPTION_KEYS, *SETTING_FIELDS}
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise UsageError(f"unknown sweep key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
    missing = [key for key in ("pairs", "layers", "scales") if mapping.get(key) in (None, [], ())]
    if missing:
        flags = ", ".join("--" + key for key in missing)
        raise UsageError(f"a sweep needs {flags} (as flags or in a --config file)")
    pairs = _unique(parse_pair(value) for value in _as_list("--pairs", mapping["pairs"]))
    layers = _unique(_integer(value, "--layers") for value in _as_list("--layers", mapping["layers"]))
    if any(layer < 0 for layer in layers):
        raise UsageError(f"--layers must be non-negative, got {list(layers)}")
    scales = _unique(_number(value, "--scales") for value in _as_list("--scales", mapping["scales"]))
    datasets = _unique(
        _inference_dataset(v) for v in _as_list("--inference-datasets", mapping.get("inference_datasets"))
    )
    counts = _unique(
        _integer(value, "--inference-n-samples")
        for value in _as_list("--inference-n-samples", mapping.get("inference_n_samples", 10))
    )
    settings = {key: coerce_setting(key, mapping[key]) for key in SETTING_FIELDS if key in mapping}
    if (
        settings.get("model") and Path(settings["model"]).expanduser().is_dir()
    ):  # a local folder: as every worker sees it
        settings["model"] = str(Path(settings["model"]).expanduser().resolve())
    name = mapping.get("name")
    spec = SweepSpec(
        pairs=pairs,
        layers=layers,
        scales=scales,
        inference_datasets=datasets,
        inference_n_samples=counts,
        settings=settings,
        name=check_name(str(name)) if name is not None else None,
        output_root=output_root(mapping),
    )
    return spec, load_options(mapping)


def load_options(mapping: Mapping[str, Any]) -> SweepOptions:
    """The run options of a sweep mapping (workers, executor, submitit parameters, notebook, kernel)."""
    workers = _integer(mapping.get("workers", 1), "--workers")
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    executor = str(mapping.get("executor", "local"))
    if executor not in EXECUTORS:
        raise UsageError(f"--executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    submitit_params = mapping.get("submitit") or {}
    if not isinstance(submitit_params, Mapping):
        raise UsageError(f"'submitit' must be a mapping of executor parameters, got {submitit_params!r}")
    cluster = submitit_params.get("cluster", "auto")
    if cluster not in SUBMITIT_CLUSTERS:
        raise UsageError(f"submitit cluster must be one of {', '.join(SUBMITIT_CLUSTERS)}, got {cluster!r}")
    return SweepOptions(
        workers=workers,
        executor=executor,
        submitit=dict(submitit_params),
        notebook=str(mapping["notebook"]) if mapping.get("notebook") else None,
        kernel=str(mapping.get("kernel") or "python3"),
    )


def read_sweep_file(path: Path | str) -> dict[str, Any]:
    """A `--config` YAML file as a mapping."""
    import yaml

    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read --config {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"--config {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise UsageError(f"--config {path} must hold a mapping of sweep keys, got {type(loaded).__name__}")
    return {str(key).replace("-", "_"): value for key, value in loaded.items()}
