"""Results in the seed's layout and format, written atomically and never silently overwritten."""

from __future__ import annotations

import difflib
import json
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chunky_utils.cache import atomic_write_json
from chunky_utils.collapse import row_collapse
from chunky_utils.data import parse_subset
from chunky_utils.errors import UsageError

if TYPE_CHECKING:
    import pandas as pd

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


# ---------------------------------------------------------------- the results model and the one table

SIDES: tuple[str, ...] = ("baseline", "steered")


@dataclass(frozen=True)
class ResultRow:
    """One prompt's answers in a results file."""

    prompt_idx: int
    prompt: str
    baseline: str
    steered: str
    prompt_id: str | None = None
    metrics: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    collapse: Mapping[str, str | None] | None = None  # each side's collapse reason (None = fine)

    @classmethod
    def from_dict(cls, row: Mapping[str, Any], index: int, path: Path | str) -> ResultRow:
        if not isinstance(row, Mapping):
            raise UsageError(f"{path}: results[{index}] is not an object")
        return cls(
            prompt_idx=int(row.get("prompt_idx", index)),
            prompt=str(row.get("prompt") or ""),
            baseline=str(row.get("baseline") or ""),
            steered=str(row.get("steered") or ""),
            prompt_id=row.get("prompt_id"),
            metrics=row.get("metrics") or {},
            collapse=row.get("collapse"),
        )


@dataclass(frozen=True)
class ResultFile:
    """One seed-format results file: where it is, its metadata and its rows."""

    path: Path | None
    metadata: Mapping[str, Any]
    rows: tuple[ResultRow, ...]

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any], path: Path | None = None) -> ResultFile:
        rows = payload.get("results")
        if not isinstance(payload.get("metadata"), Mapping) or not isinstance(rows, list):
            raise UsageError(f"{path or 'payload'} is not a results file (needs 'metadata' and 'results')")
        return cls(path, payload["metadata"], tuple(ResultRow.from_dict(r, i, path or "") for i, r in enumerate(rows)))

    @classmethod
    def read(cls, path: Path | str) -> ResultFile:
        return cls.from_payload(read_results(path), Path(path))


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys; lists as JSON text (one CSV cell each)."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list | tuple):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


def text_change(baseline: str, steered: str) -> float:
    """0 when the steered text equals the baseline, towards 1 the more it differs (difflib)."""
    return 1.0 - difflib.SequenceMatcher(None, baseline or "", steered or "", autojunk=False).ratio()


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def row_record(row: ResultRow) -> dict[str, Any]:
    """A row's columns: texts, `text_change`, and per side `<side>.words`, `.chars`, `.collapse`, `.<metric>`;
    `delta.<measure>` (steered minus baseline) for every numeric measure both sides have."""
    as_dict = {"baseline": row.baseline, "steered": row.steered, "metrics": row.metrics}
    if row.collapse is not None:
        as_dict["collapse"] = row.collapse
    record: dict[str, Any] = {
        "prompt_idx": row.prompt_idx,
        "prompt_id": row.prompt_id,
        "prompt": row.prompt,
        "baseline": row.baseline,
        "steered": row.steered,
        "text_change": text_change(row.baseline, row.steered),
    }
    for side in SIDES:
        text = getattr(row, side)
        record[f"{side}.words"] = len(text.split())
        record[f"{side}.chars"] = len(text)
        record[f"{side}.collapse"] = row_collapse(as_dict, side)
        for name, value in (row.metrics.get(side) or {}).items():
            if is_number(value) or value is None:
                record[f"{side}.{name}"] = float(value) if value is not None else math.nan
    record["collapsed"] = record["steered.collapse"] is not None
    for name in [key.removeprefix("steered.") for key in record if key.startswith("steered.")]:
        steered, baseline = record.get(f"steered.{name}"), record.get(f"baseline.{name}")
        if is_number(steered) and is_number(baseline):
            record[f"delta.{name}"] = steered - baseline
    return record


def config_label(metadata: Mapping[str, Any]) -> str:
    """A short name for one results file: pair, layer, scale and prompt source."""
    prompts = metadata.get("inference_dataset")
    source = "built-in" if prompts is None else f"{prompts} x{metadata.get('inference_n_samples')}"
    return (
        f"{metadata.get('target_subset')}_{metadata.get('baseline_subset')} "
        f"L{metadata.get('layer')} s{float(metadata.get('scale', 0.0)):g} ({source})"
    )


def experiment_label(metadata: Mapping[str, Any], path: Path | None = None) -> str:
    """What a layer x scale view compares (layer and scale vary inside): '12_0/out_0_50.json [model]' for a
    file (its pair folder and file name), else the pair, inference prompts and model from the metadata."""
    if path is not None:
        return f"{path.parent.parent.name}/{path.name} [{metadata.get('model_name', '?')}]"
    inference = metadata.get("inference_dataset") or "built-in"
    count = "" if metadata.get("inference_dataset") is None else f" x{metadata.get('inference_n_samples')}"
    return (
        f"{metadata.get('target_subset')}_{metadata.get('baseline_subset')} on {inference}{count} "
        f"[{metadata.get('model_name', '?')}]"
    )


def result_files(sources: Any, skip_unreadable: bool = False) -> Iterator[tuple[str, ResultFile]]:
    """(id, file) for a results folder (searched recursively), a file, a payload, or a list of these.
    The id is the path relative to a given folder, else the path, else 'payload-<n>'. With `skip_unreadable`,
    a file that is not a results file is logged and skipped (a sweep still running), else it is an error."""
    if isinstance(sources, Mapping | str | Path):
        sources = [sources]
    for number, source in enumerate(sources):
        if isinstance(source, Mapping):
            yield f"payload-{number}", ResultFile.from_payload(source)
            continue
        path = Path(source)
        found = (
            [(str(f.relative_to(path)), f) for f in iter_results_files(path)] if path.is_dir() else [(str(path), path)]
        )
        for file_id, file_path in found:
            try:
                yield file_id, ResultFile.read(file_path)
            except UsageError as exc:
                if not skip_unreadable:
                    raise
                log.warning("skipping %s", exc)


def results_table(sources: Any, skip_unreadable: bool = False) -> pd.DataFrame:
    """Every result in `sources` as one DataFrame, one row per (file, prompt), one column naming:
    `config_id`, `point_id`, `path`, `config`, `experiment`, the metadata flattened with dots
    (`timings.generate_s`), then `row_record`'s columns. The CLI's folders, the playground's saves and
    sweeps all read through here."""
    import pandas as pd

    records = []
    for config_id, result in result_files(sources, skip_unreadable):
        common = {
            "config_id": config_id,
            "point_id": str(Path(config_id).with_suffix("")),
            "path": str(result.path) if result.path is not None else None,
            "config": config_label(result.metadata),
            "experiment": experiment_label(result.metadata, result.path),
            "pair": f"{result.metadata.get('target_subset')}_{result.metadata.get('baseline_subset')}",
            **flatten(result.metadata),
        }
        for row in result.rows:
            records.append({**common, **row_record(row)})
    return pd.DataFrame.from_records(records)
