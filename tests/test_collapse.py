"""One definition of a collapsed answer."""

from __future__ import annotations

import pytest

from chunky_utils.collapse import (
    DISTINCT_2_FLOOR,
    PERPLEXITY_CEILING,
    collapse_reason,
    collapse_summary,
    loop_share,
    metrics_collapse_reason,
    row_collapse,
)


@pytest.mark.parametrize(
    ("tokens", "perplexity", "expected"),
    [
        ([], None, "empty answer"),
        (["the", "still", "the", "the", "still", "the", "still", "the", "still", "the", "still"], None, "loops"),
        (["a", "b", "c", "a", "b", "c", "a", "b", "c", "a", "b", "c", "d"], 3.0, "loops"),
        (["x", "y", "x", "z", "x", "y", "x", "z", "y", "x", "z", "y", "x"], None, "repeats itself"),
        (
            ["plants", "turn", "light", "into", "sugar", "using", "water", "and", "air"],
            PERPLEXITY_CEILING + 1,
            "nonsense",
        ),
        (["plants", "turn", "light", "into", "sugar", "using", "water", "and", "air"], 3.0, None),
        (["ok"], None, None),  # too short to judge by ratios
    ],
)
def test_collapse_reasons(tokens: list[str], perplexity: float | None, expected: str | None) -> None:
    reason = collapse_reason(tokens, perplexity)
    assert (reason is None) if expected is None else (reason is not None and reason.startswith(expected))


def test_loop_share_counts_back_to_back_copies_only() -> None:
    assert loop_share(["a", "b", "a", "b", "a", "b"]) == 1.0
    assert loop_share(["a", "b", "c", "d", "e", "f"]) == 0.0
    assert loop_share(["x", "a", "a", "a"]) == pytest.approx(0.75)


def test_stored_verdicts_win_and_old_rows_are_judged_from_metrics() -> None:
    row = {"baseline": "fine text", "steered": "x", "collapse": {"baseline": None, "steered": "loops (90%)"}}
    assert row_collapse(row, "steered") == "loops (90%)" and row_collapse(row, "baseline") is None
    old = {"baseline": "b", "steered": "s", "metrics": {"steered": {"distinct_2": 0.1, "n_tokens": 20}}}
    assert row_collapse(old, "steered").startswith("repeats itself")
    assert metrics_collapse_reason({"distinct_2": DISTINCT_2_FLOOR, "n_tokens": 20, "perplexity": 2.0}) is None
    assert collapse_summary([row, old]) == {"baseline": 0, "steered": 2}
