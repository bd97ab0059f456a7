"""One definition of a collapsed answer, used by the results JSON, the CLI summary, the playground and the views.

An answer has collapsed when it is empty, loops (a share of its tokens inside back-to-back copies of one
n-gram above REPETITION_CEILING), repeats itself (distinct token bigrams below DISTINCT_2_FLOOR), or reads as
nonsense to the unsteered model (perplexity above PERPLEXITY_CEILING). Each threshold is defined here only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

DISTINCT_2_FLOOR = 0.5
"""Share of distinct token bigrams below which an answer counts as repeating itself."""
REPETITION_CEILING = 0.5
"""Share of tokens inside a loop (3 or more back-to-back copies of one n-gram, n <= 8) above which it loops."""
PERPLEXITY_CEILING = 20.0
"""Perplexity under the unsteered model above which an answer counts as nonsense (fluent answers sit below 10)."""
CELL_COLLAPSE_SHARE = 0.5
"""A layer x scale cell counts as collapsed when at least this share of its steered answers collapsed."""
MIN_TOKENS_FOR_RATIOS = 8
"""Shorter answers are judged only on emptiness and perplexity: a few tokens give no meaningful ratios."""
_LONGEST_LOOP_UNIT = 8
_LOOP_COPIES = 3


def distinct_n(units: Sequence[Any], n: int = 2) -> float:
    """Distinct n-grams / all n-grams (1.0 for a non-empty sequence shorter than n, 0.0 when empty)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    grams = [tuple(units[i : i + n]) for i in range(len(units) - n + 1)]
    if not grams:
        return 1.0 if len(units) > 0 else 0.0
    return len(set(grams)) / len(grams)


def loop_share(units: Sequence[Any]) -> float:
    """Share of units covered by runs of at least three back-to-back copies of one n-gram (n <= 8)."""
    covered = [False] * len(units)
    for size in range(1, _LONGEST_LOOP_UNIT + 1):
        start = 0
        while start + size * _LOOP_COPIES <= len(units):
            unit = list(units[start : start + size])
            copies = 1
            while list(units[start + copies * size : start + (copies + 1) * size]) == unit:
                copies += 1
            if copies >= _LOOP_COPIES:
                for index in range(start, start + copies * size):
                    covered[index] = True
                start += copies * size
            else:
                start += 1
    return sum(covered) / len(units) if units else 0.0


def collapse_reason(tokens: Sequence[Any], perplexity: float | None = None) -> str | None:
    """Why an answer (its token ids, or words) has collapsed, in a few words; None when it has not."""
    if not tokens:
        return "empty answer"
    if len(tokens) >= MIN_TOKENS_FOR_RATIOS:
        looping = loop_share(tokens)
        if looping > REPETITION_CEILING:
            return f"loops ({looping:.0%} of tokens repeat back to back)"
        distinct = distinct_n(tokens, 2)
        if distinct < DISTINCT_2_FLOOR:
            return f"repeats itself (distinct-2 {distinct:.2f} < {DISTINCT_2_FLOOR:g})"
    if perplexity is not None and math.isfinite(perplexity) and perplexity > PERPLEXITY_CEILING:
        return f"nonsense to the unsteered model (perplexity {perplexity:.1f} > {PERPLEXITY_CEILING:g})"
    return None


def metrics_collapse_reason(metrics: Mapping[str, Any]) -> str | None:
    """The same verdict from stored metrics alone (distinct_2, perplexity, n_tokens): no loop check."""
    n_tokens = metrics.get("n_tokens")
    if n_tokens is not None and n_tokens == 0:
        return "empty answer"
    distinct = metrics.get("distinct_2")
    if distinct is not None and (n_tokens is None or n_tokens >= MIN_TOKENS_FOR_RATIOS) and distinct < DISTINCT_2_FLOOR:
        return f"repeats itself (distinct-2 {distinct:.2f} < {DISTINCT_2_FLOOR:g})"
    perplexity = metrics.get("perplexity")
    if perplexity is not None and math.isfinite(perplexity) and perplexity > PERPLEXITY_CEILING:
        return f"nonsense to the unsteered model (perplexity {perplexity:.1f} > {PERPLEXITY_CEILING:g})"
    return None


def row_collapse(row: Mapping[str, Any], side: str) -> str | None:
    """A results row's collapse reason for 'baseline' or 'steered': the stored verdict, else judged from the text
    (word level) and any stored perplexity (results written before the verdict was stored)."""
    stored = row.get("collapse")
    if isinstance(stored, Mapping) and side in stored:
        return stored[side]
    metrics = row.get("metrics", {}).get(side) if isinstance(row.get("metrics"), Mapping) else None
    if metrics:
        return metrics_collapse_reason(metrics)
    return collapse_reason(str(row.get(side) or "").split())


def collapse_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Counts of collapsed baseline and steered answers."""
    return {side: sum(row_collapse(row, side) is not None for row in rows) for side in ("baseline", "steered")}
