"""The per-layer table of the comparison notebook: best scale, where fluency collapses, and why a layer has
no best scale."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


def per_layer_table(frame: pd.DataFrame, experiment: str | None = None) -> pd.DataFrame:
    """Per layer: the best scale (with its concept delta and perplexity), where fluency collapses, and a note
    saying why a layer has no best scale instead of leaving a row of NaN."""
    import pandas as pd

    from chunky_utils.metric_views import best_scale_per_layer, collapse_scale_per_layer, layer_scale_summary

    summary = layer_scale_summary(frame, experiment)
    best = best_scale_per_layer(frame, experiment).set_index("layer")
    collapse = collapse_scale_per_layer(frame, experiment).set_index("layer")
    records = []
    for layer, cells in summary.groupby("layer", sort=True):
        steered = cells[cells["scale"] != 0.0]
        row = best.loc[layer]
        found = not pd.isna(row["best_scale"])
        if found:
            note = ""
        elif not steered.empty and steered["collapsed"].all():
            note = "every steered scale collapsed (✕)"
        elif steered["concept_delta"].isna().all():
            note = "no concept scores (every answer empty, or run with --no-metrics)"
        else:
            note = "no scale that kept fluency raised the concept above the baseline"
        positive, negative = collapse.loc[layer, "collapse_scale"], collapse.loc[layer, "collapse_scale_negative"]
        records.append(
            {
                "layer": int(layer),
                "best scale": float(row["best_scale"]) if found else None,
                "concept delta there": float(row["concept_delta"]) if found else None,
                "perplexity there": float(row["perplexity"]) if found else None,
                "collapses from scale": (
                    f"{positive:g}" if not pd.isna(positive) else f"none up to {steered['scale'].max():g}"
                )
                if (steered["scale"] > 0).any()
                else "no positive scale run",
                "collapses from negative scale": (
                    f"{negative:g}" if not pd.isna(negative) else f"none down to {steered['scale'].min():g}"
                )
                if (steered["scale"] < 0).any()
                else "no negative scale run",
                "note": note,
            }
        )
    return pd.DataFrame.from_records(records)
