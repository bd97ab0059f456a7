"""Scale guidance: bands of the relative magnitude (subtle, strong, likely to collapse), measured once on the
embedded model or read from finished results."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chunky_utils.errors import UsageError

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class ScaleBands:
    """Bands of the relative magnitude (|scale| x vector norm / the layer's mean residual norm).

    `subtle_below`: under it, fewer than half the steered answers change much from the baseline (difflib
    change under CHANGED_AT); `collapse_from`: at and above it, at least half collapse (chunky_utils.collapse).
    """

    subtle_below: float
    collapse_from: float
    source: str

    def band(self, relative: float) -> str:
        if relative < self.subtle_below:
            return "subtle"
        if relative < self.collapse_from:
            return "strong"
        return "likely to collapse"


CHANGED_AT = 0.5
"""A steered answer counts as changed when 1 - difflib similarity to its baseline is at least this."""
MIN_RUNS_FOR_BANDS = 6

DEFAULT_BANDS = ScaleBands(
    subtle_below=0.071,
    collapse_from=0.71,
    source="24 runs of SmolLM2-135M-Instruct, docs/scale_bands.md",
)
"""What scripts/measure_scale_bands.py found on the embedded model (docs/scale_bands.md has the table)."""


def run_strength_table(sources: Any, model_name: str | None = None) -> pd.DataFrame:
    """One row per results file: relative magnitude, share of steered answers changed, share collapsed."""
    import difflib

    import pandas as pd

    from chunky_utils.collapse import row_collapse
    from chunky_utils.results import iter_results_files, read_results

    paths = []
    for source in [sources] if isinstance(sources, str | Path) else list(sources):
        source = Path(source)
        paths += list(iter_results_files(source)) if source.is_dir() else [source]
    records = []
    for path in paths:
        try:
            payload = read_results(path)
        except UsageError:
            continue
        meta, rows = payload["metadata"], payload["results"]
        if model_name is not None and meta.get("model_name") != model_name:
            continue
        norms = [meta.get("target_norm"), meta.get("baseline_norm")]
        if not rows or meta.get("effective_magnitude") is None or any(not isinstance(n, int | float) for n in norms):
            continue
        mean_norm = (float(norms[0]) + float(norms[1])) / 2
        changes = [
            1 - difflib.SequenceMatcher(None, str(r.get("baseline") or ""), str(r.get("steered") or "")).ratio()
            for r in rows
        ]
        records.append(
            {
                "path": str(path),
                "model_name": meta.get("model_name"),
                "layer": meta.get("layer"),
                "scale": meta.get("scale"),
                "relative_magnitude": abs(float(meta["effective_magnitude"])) / mean_norm if mean_norm else math.inf,
                "changed_share": sum(c >= CHANGED_AT for c in changes) / len(rows),
                "collapsed_share": sum(row_collapse(r, "steered") is not None for r in rows) / len(rows),
                "n": len(rows),
            }
        )
    return pd.DataFrame.from_records(
        records,
        columns=["path", "model_name", "layer", "scale", "relative_magnitude", "changed_share", "collapsed_share", "n"],
    )


def threshold(values: Sequence[float], positive: Sequence[bool]) -> float:
    """The cut that best separates `positive` points (meant to lie at or above it) from the rest, halfway
    (geometrically) between two measured values; inf when no point is positive, 0 when all are. Values equal
    to two significant digits count as one level, so runs asked for the same share never get split."""
    if not any(positive):
        return math.inf
    if all(positive):
        return 0.0
    levels: dict[float, list[bool]] = {}
    for value, flag in zip(values, positive, strict=True):
        levels.setdefault(float(f"{value:.2g}"), []).append(bool(flag))
    ordered = sorted(levels)
    best_errors, best_cut = math.inf, math.inf
    for index in range(len(ordered) + 1):
        below, above = ordered[:index], ordered[index:]
        errors = sum(sum(levels[v]) for v in below) + sum(len(levels[v]) - sum(levels[v]) for v in above)
        if errors < best_errors:
            low = below[-1] if below else 0.0
            high = above[0] if above else math.inf
            best_errors = errors
            best_cut = math.sqrt(low * high) if low > 0 and math.isfinite(high) else (high if low <= 0 else low)
    return best_cut


def scale_bands(sources: Any, model_name: str | None = None, source: str | None = None) -> ScaleBands | None:
    """Bands read from finished results (at least MIN_RUNS_FOR_BANDS files), else None."""
    table = run_strength_table(sources, model_name)
    if len(table) < MIN_RUNS_FOR_BANDS or table["relative_magnitude"].nunique() < 3:
        return None
    values = table["relative_magnitude"].tolist()
    subtle = threshold(values, (table["changed_share"] >= 0.5).tolist())
    collapse = threshold(values, (table["collapsed_share"] >= 0.5).tolist())
    where = source or f"{len(table)} runs{f' of {model_name}' if model_name else ''}"
    return ScaleBands(min(subtle, collapse), collapse, where)
