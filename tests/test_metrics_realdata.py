"""Validation on real prompts nobody here wrote: the concept score rises with scale, perplexity follows.

CoCoNot (target) vs GSM8K (baseline), 24 prompts each, steering SmolLM2-135M-Instruct at layer 12; held-out
IFEval prompts, greedy, 24 new tokens. Skipped when ../shared/realdata is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chunky_utils.config import RunConfig
from chunky_utils.metric_views import collapse_scale_per_layer, layer_scale_summary, metrics_frame
from chunky_utils.models import LoadedModel
from chunky_utils.pipeline import run_experiment

pytestmark = [pytest.mark.slow, pytest.mark.realdata]

LAYER = 12
SCALES = (2.0, 4.0)


def test_concept_rises_with_scale_while_perplexity_rises_past_it(
    realdata: Path, embedded: LoadedModel, tmp_path: Path
) -> None:
    config = RunConfig(
        target_subset=str(realdata / "coconot_eval.jsonl"),
        baseline_subset=str(realdata / "gsm8k_test.jsonl"),
        layer=LAYER,
        n_samples=24,
        inference_dataset=str(realdata / "ifeval.jsonl"),
        inference_n_samples=6,
        max_tokens=24,
        temperature=0.0,
        capture="needed",
        output_dir=str(tmp_path / "results"),
        cache_dir=str(tmp_path / "cache"),
        progress=False,
    )
    outcome = run_experiment(config, loaded=embedded, scales=list(SCALES))
    summaries = [outcome.payloads[scale]["metadata"]["metrics"] for scale in SCALES]
    concept = [summaries[0]["baseline_mean"]["concept_score"]] + [s["steered_mean"]["concept_score"] for s in summaries]
    perplexity = [summaries[0]["baseline_median"]["perplexity"]]
    perplexity += [s["steered_median"]["perplexity"] for s in summaries]
    figures = {
        "scales": [0.0, *SCALES],
        "concept_mean": concept,
        "perplexity_median": perplexity,
        "probe_auroc": summaries[0]["probe_auroc"],
        "relevance_mean": [summaries[0]["baseline_mean"]["relevance"]]
        + [s["steered_mean"]["relevance"] for s in summaries],
        "overall_mean": [summaries[0]["baseline_mean"]["overall"]] + [s["steered_mean"]["overall"] for s in summaries],
        "generate_s": outcome.payloads[SCALES[0]]["metadata"]["timings"]["generate_s"],
        "metrics_s": summaries[0]["seconds"],
    }
    print("validation figures:", json.dumps(figures))

    assert summaries[0]["probe_auroc"] >= 0.9, "the probe separates CoCoNot from GSM8K prompts"
    assert all(later > earlier + 0.02 for earlier, later in zip(concept, concept[1:], strict=False)), concept
    assert perplexity[-1] > 3 * perplexity[0], perplexity
    assert perplexity[1] < perplexity[-1], perplexity
    rows = outcome.payloads[SCALES[-1]]["results"]
    risen = [r["metrics"]["steered"]["concept_score"] > r["metrics"]["baseline"]["concept_score"] for r in rows]
    assert sum(risen) >= len(rows) - 1, "the concept score rises on (almost) every held-out prompt"

    frame = metrics_frame(tmp_path / "results")
    summary = layer_scale_summary(frame)
    assert summary["concept_delta"].is_monotonic_increasing
    collapse = collapse_scale_per_layer(frame).set_index("layer")
    assert collapse.loc[LAYER, "collapse_scale"] in SCALES, "fluency collapse is flagged within the sweep"
