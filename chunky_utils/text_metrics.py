"""Per-text metrics that need no model: the fluency and overall scores (distinct-n lives in chunky_utils.collapse)."""

from __future__ import annotations

import math

from chunky_utils.collapse import DISTINCT_2_FLOOR

PPL_CEILING = 200.0
"""Perplexity at which the fluency part of `overall` reaches 0 (it is 1 at perplexity 1)."""
RELEVANCE_FULL = 1.0
"""Relevance (nats per token) at which the relevance part of `overall` saturates at 1."""
RELEVANCE_TOKENS = 16
"""Relevance reads the first this many tokens of a text (where its dependence on the prompt shows; later tokens
lean on the text itself): the 'without prompt' pass then costs at most this many tokens per text."""
OVERALL_FORMULA = (
    f"harmonic mean of c=clip(concept_score,0,1), f=min(clip(1-ln(ppl)/ln({PPL_CEILING:g}),0,1), "
    f"clip((distinct_2-{DISTINCT_2_FLOOR:g})/{1 - DISTINCT_2_FLOOR:g},0,1)), r=clip(relevance/{RELEVANCE_FULL:g},0,1); "
    "0 when any part is 0 or undefined"
)


def fluency_part(perplexity: float | None, distinct_2: float | None) -> float:
    """The fluency part of `overall` in [0, 1]: the worse of the perplexity part and the repetition part."""
    if perplexity is None or distinct_2 is None or not math.isfinite(perplexity) or perplexity <= 0:
        return 0.0
    ppl_part = 1.0 - math.log(max(perplexity, 1.0)) / math.log(PPL_CEILING)
    repetition_part = (distinct_2 - DISTINCT_2_FLOOR) / (1.0 - DISTINCT_2_FLOOR)
    return _clip01(min(ppl_part, repetition_part))


def overall_score(
    concept_score: float | None,
    perplexity: float | None,
    distinct_2: float | None,
    relevance: float | None,
) -> float:
    """One number per text in [0, 1], in the spirit of AxBench's harmonic mean; 0 when any part collapses.

    overall = 3 / (1/c + 1/f + 1/r) with
      c = clip(concept_score, 0, 1)                       (moved toward the target),
      f = min(clip(1 - ln(perplexity) / ln(PPL_CEILING), 0, 1),
              clip((distinct_2 - DISTINCT_2_FLOOR) / (1 - DISTINCT_2_FLOOR), 0, 1))   (still fluent, not looping),
      r = clip(relevance / RELEVANCE_FULL, 0, 1)          (still answers its prompt);
    overall = 0 when any of c, f, r is 0 or undefined (None, e.g. an empty answer). The concept axis is
    calibrated on prompt reads, so an unsteered answer need not read 0: compare steered with baseline.
    """
    if concept_score is None or relevance is None or not math.isfinite(concept_score) or not math.isfinite(relevance):
        return 0.0
    parts = (_clip01(concept_score), fluency_part(perplexity, distinct_2), _clip01(relevance / RELEVANCE_FULL))
    if min(parts) <= 0.0:
        return 0.0
    return len(parts) / sum(1.0 / part for part in parts)


def _clip01(value: float) -> float:
    return min(1.0, max(0.0, value))
