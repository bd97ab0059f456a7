"""Results in the seed's layout and format, written atomically and never silently overwritten."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from chunky_utils.cache import atomic_write_json
from chunky_utils.data import parse_subset
from chunky_utils.errors import UsageError

log = logging.getLogger(__name__)


def format_scale(scale: float) -> str:
    """The seed writes scales with Python's float repr: 2.0, 0.5, -1.0."""
    return repr(float(scale))


def results_path(
    output_dir: Path | str,
    target_subset: str,
    baseline_subset: str,
    layer: int,
    scale: float,
    inference_dataset: str | None,
    inference_n_samples: int,
    suffix: str = "",
) -> Path:
    """`{output_dir}/{target}_{baseline}/layer_{layer}_scale_{scale}/(out_{ds}_{n}.json | results.json)`;
    `suffix` (non-default decoding settings, e.g. '_temp0.0') goes before '.json'."""
    target = parse_subset(target_subset).label
    baseline = parse_subset(baseline_subset).label
    folder = Path(output_dir) / f"{target}_{baseline}" / f"layer_{layer}_scale_{format_scale(scale)}"
    if inference_dataset is None:
        return folder / f"results{suffix}.json"
    return folder / f"out_{parse_subset(inference_dataset).label}_{inference_n_samples}{suffix}.json"


def read_results(path: Path | str) -> dict[str, Any]:
    """Load one results JSON, with a one-line error if it is not one."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read results {path}: {exc}") from None
    if not isinstance(payload, dict) or "metadata" not in payload or "results" not in payload:
        raise UsageError(f"{path} is not a results file (needs 'metadata' and 'results')")
    return payload


def existing_status(path: Path, settings_hash: str) -> str:
    """'absent', 'same' (finished with these settings) or 'different' (another run's result)."""
    if not path.exists():
        return "absent"
    try:
        metadata = read_results(path)["metadata"]
    except UsageError:
        return "different"
    return "same" if metadata.get("settings_hash") == settings_hash else "different"


def guard_existing(path: Path, settings_hash: str, overwrite: bool) -> str:
    """Refuse to replace another run's result unless `overwrite`; return the status."""
    status = existing_status(path, settings_hash)
    if status == "different" and not overwrite:
        raise UsageError(f"{path} holds a result made with other settings; pass --overwrite to replace it")
    return status


def write_results(path: Path, metadata: dict[str, Any], rows: list[dict[str, Any]]) -> Path:
    atomic_write_json(path, {"metadata": metadata, "results": rows})
    log.info("results written to %s", path)
    return path


def iter_results_files(root: Path | str) -> Iterator[Path]:
    """Every seed-format results JSON under a folder."""
    root = Path(root)
    for path in sorted(root.rglob("*.json")):
        seed_named = path.name == "results.json" or path.name.startswith(("out_", "results_"))
        if seed_named and path.parent.name.startswith("layer_"):
            yield path
