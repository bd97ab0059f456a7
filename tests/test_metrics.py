"""Per-generation metrics on tiny models: exact values, manual cross-checks, JSON integration and the views."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from chunky_utils.chat import format_prompts, tokenize_prompts
from chunky_utils.cli import main
from chunky_utils.config import RunConfig
from chunky_utils.layer_scale_heatmaps import layer_scale_heatmap, metric_heatmaps
from chunky_utils.metric_views import (
    best_scale_per_layer,
    cell_from_click,
    cell_options,
    cell_rows,
    collapse_scale_per_layer,
    layer_scale_summary,
    metrics_frame,
)
from chunky_utils.metrics import (
    DISTINCT_2_FLOOR,
    METRIC_NAMES,
    PPL_CEILING,
    RELEVANCE_FULL,
    RELEVANCE_TOKENS,
    ConceptAxis,
    auroc,
    distinct_n,
    fit_probe,
    fluency_part,
    overall_score,
    score_texts,
)
from chunky_utils.models import TINY_ARCHITECTURES, LoadedModel, build_tiny_model, find_decoder_layers
from chunky_utils.pipeline import run_experiment
from chunky_utils.steering import SteeringVector

TINY_CLI = ["--model", "tiny-random:llama", "--data-source", "bundled", "-q"]


# ---------------------------------------------------------------- pure metrics


@pytest.mark.parametrize(
    ("units", "expected"),
    [
        ([1, 2, 3, 4], 1.0),
        ([1, 1, 1, 1], 1 / 3),
        ([1, 2, 1, 2, 1], 0.5),
        (["the", "cat", "the", "cat"], 2 / 3),
        (["a", "b", "c", "a", "b", "c", "a", "b"], 3 / 7),
        ([7], 1.0),
        ([], 0.0),
    ],
)
def test_distinct_2_exact_values(units: list, expected: float) -> None:
    assert distinct_n(units, 2) == pytest.approx(expected, abs=1e-12)


def test_distinct_n_other_orders() -> None:
    assert distinct_n([1, 1, 2, 2], 1) == pytest.approx(0.5)
    assert distinct_n([1, 2, 3, 1, 2, 3], 3) == pytest.approx(3 / 4)
    with pytest.raises(ValueError):
        distinct_n([1, 2], 0)


def test_concept_score_is_0_at_baseline_mean_and_1_at_target_mean() -> None:
    generator = torch.Generator().manual_seed(0)
    target, baseline = torch.randn(32, generator=generator), torch.randn(32, generator=generator)
    axis = ConceptAxis.from_means(3, target, baseline)
    scores = axis.score(torch.stack([baseline, target, (target + baseline) / 2, 2 * target - baseline]))
    torch.testing.assert_close(scores, torch.tensor([0.0, 1.0, 0.5, 2.0]), atol=1e-5, rtol=0)
    assert axis.target_projection - axis.baseline_projection == pytest.approx(float((target - baseline).norm()))
    assert float(axis.direction.norm()) == pytest.approx(1.0)
    orthogonal = torch.randn(32, generator=generator)
    orthogonal -= (orthogonal @ axis.direction) * axis.direction
    assert float(axis.score(baseline + orthogonal)) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="coincide"):
        ConceptAxis.from_means(3, target, target)


def test_overall_is_zero_when_any_part_collapses() -> None:
    healthy = {"concept_score": 0.8, "perplexity": 3.0, "distinct_2": 0.95, "relevance": 0.9}
    value = overall_score(**healthy)
    assert 0.0 < value <= 1.0
    concept_part, relevance_part = 0.8, 0.9 / RELEVANCE_FULL
    fluency = fluency_part(3.0, 0.95)
    assert value == pytest.approx(3 / (1 / concept_part + 1 / fluency + 1 / min(1.0, relevance_part)))
    collapsed = [
        {"concept_score": 0.0},
        {"concept_score": -0.4},
        {"perplexity": PPL_CEILING},
        {"perplexity": PPL_CEILING * 10},
        {"distinct_2": DISTINCT_2_FLOOR},
        {"distinct_2": 0.0},
        {"relevance": 0.0},
        {"relevance": -1.0},
        {"concept_score": None},
        {"perplexity": None},
        {"relevance": None},
        {"perplexity": math.nan},
    ]
    for change in collapsed:
        assert overall_score(**(healthy | change)) == 0.0, change
    perfect = overall_score(concept_score=1.5, perplexity=1.0, distinct_2=1.0, relevance=5 * RELEVANCE_FULL)
    assert perfect == pytest.approx(1.0)


def test_auroc_exact_values() -> None:
    labels = torch.tensor([1, 1, 0, 0])
    assert auroc(torch.tensor([0.9, 0.8, 0.1, 0.2]), labels) == 1.0
    assert auroc(torch.tensor([0.1, 0.2, 0.9, 0.8]), labels) == 0.0
    assert auroc(torch.tensor([0.5, 0.5, 0.5, 0.5]), labels) == 0.5
    assert auroc(torch.tensor([0.9, 0.3, 0.5, 0.1]), labels) == pytest.approx(0.75)
    assert math.isnan(auroc(torch.tensor([0.3, 0.4]), torch.tensor([1, 1])))


def test_probe_separates_shifted_clouds_and_not_noise() -> None:
    generator = torch.Generator().manual_seed(1)
    shift = torch.zeros(16)
    shift[0] = 4.0
    target = torch.randn(20, 16, generator=generator) + shift
    baseline = torch.randn(20, 16, generator=generator)
    probe = fit_probe(5, target, baseline)
    assert probe.heldout_auroc is not None and probe.heldout_auroc > 0.95
    assert float(probe.predict_proba(shift * 2)) > 0.9 > 0.1 > float(probe.predict_proba(-shift))
    noise = fit_probe(5, torch.randn(20, 16, generator=generator), torch.randn(20, 16, generator=generator))
    assert noise.heldout_auroc is not None and noise.heldout_auroc < 0.8
    assert fit_probe(5, target[:1], baseline).heldout_auroc is None, "one target row cannot be held out"


# ---------------------------------------------------------------- scoring by the model


def manual_reading(
    loaded: LoadedModel, prompt: str, text: str, layer: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probs of the text tokens after the chat prompt, after the empty-prompt context, mean layer output)."""
    text_ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    results = []
    for context_prompt in (prompt, ""):
        context = tokenize_prompts(loaded.tokenizer, format_prompts(loaded.tokenizer, [context_prompt]))[0]
        captured: dict[str, torch.Tensor] = {}

        def capture(_module: object, _args: object, out: object, store: dict = captured) -> None:
            store["h"] = out[0] if isinstance(out, tuple) else out

        hook = find_decoder_layers(loaded.model)[layer].register_forward_hook(capture)
        try:
            with torch.no_grad():
                logits = loaded.model(torch.tensor([context + text_ids])).logits[0].float()
        finally:
            hook.remove()
        log_probs = torch.log_softmax(logits[len(context) - 1 : -1], dim=-1)
        picked = log_probs.gather(-1, torch.tensor(text_ids)[:, None]).squeeze(-1)
        results.append((picked, captured["h"][0, len(context) :].float().mean(0)))
    return results[0][0], results[1][0], results[0][1]


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_perplexity_relevance_and_concept_match_a_manual_computation(architecture: str) -> None:
    loaded = build_tiny_model(architecture, n_layers=4, hidden_size=64, seed=0)
    generator = torch.Generator().manual_seed(2)
    axis = ConceptAxis.from_means(2, torch.randn(64, generator=generator), torch.randn(64, generator=generator))
    prompts = ["Hi there", "Name a colour, please.", "Hi there"]
    texts = ["Red is nice.", "Blue, or maybe green; a longer answer than the others here.", "Hello!"]
    scores = score_texts(loaded, prompts, texts, axis=axis, batch_size=2, progress=False)
    whole = score_texts(loaded, prompts, texts, axis=axis, relevance_tokens=None, progress=False)
    for prompt, text, score, score_whole in zip(prompts, texts, scores, whole, strict=True):
        with_prompt, without_prompt, activation = manual_reading(loaded, prompt, text, 2)
        window = RELEVANCE_TOKENS
        assert score["perplexity"] == pytest.approx(math.exp(-float(with_prompt.mean())), rel=1e-4)
        relevance = float(with_prompt[:window].mean() - without_prompt[:window].mean())
        assert score["relevance"] == pytest.approx(relevance, abs=1e-4)
        relevance_whole = float(with_prompt.mean() - without_prompt.mean())
        assert score_whole["relevance"] == pytest.approx(relevance_whole, abs=1e-4)
        assert score_whole["perplexity"] == pytest.approx(score["perplexity"], rel=1e-5)
        assert score["concept_score"] == pytest.approx(float(axis.score(activation)), abs=1e-4)
        assert score["n_tokens"] == len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])
        assert set(score) == set(METRIC_NAMES)


def test_batching_and_deduplication_do_not_change_scores(tiny: LoadedModel) -> None:
    prompts = ["A", "Bee keeping tips?", "A", "Bee keeping tips?", "Cats"]
    texts = ["one two", "buzz buzz buzz buzz", "one two", "something else entirely", ""]
    one_by_one = score_texts(tiny, prompts, texts, batch_size=1, progress=False)
    together = score_texts(tiny, prompts, texts, batch_size=32, progress=False)
    for single, batched in zip(one_by_one, together, strict=True):
        for name in ("perplexity", "relevance", "distinct_2"):
            if single[name] is None:
                assert batched[name] is None
            else:
                assert batched[name] == pytest.approx(single[name], rel=1e-4, abs=1e-5)
    assert together[0] == together[2]
    assert together[4]["perplexity"] is None and together[4]["overall"] == 0.0 and together[4]["n_tokens"] == 0
    assert together[0]["concept_score"] is None, "no axis given: no concept score"


def test_scoring_refuses_while_a_steering_hook_is_on(tiny: LoadedModel) -> None:
    with (
        SteeringVector({1: torch.ones(64)}).apply(tiny.model, scale=3.0),
        pytest.raises(RuntimeError, match="unsteered"),
    ):
        score_texts(tiny, ["hi"], ["hello"], progress=False)
    assert score_texts(tiny, ["hi"], ["hello"], progress=False)[0]["perplexity"] is not None


# ---------------------------------------------------------------- integration: JSON, CLI, RunConfig


def run_cli(tmp_path: Path, *extra: str) -> int:
    common = ["--output-dir", str(tmp_path), "--target-subset", "12", "--baseline-subset", "0", "--n-samples", "8"]
    return main([*TINY_CLI, *common, "--max-tokens", "6", "--temperature", "0", "--layer", "2", *extra])


def test_cli_writes_metrics_into_the_results_json(tmp_path: Path) -> None:
    assert run_cli(tmp_path, "--scale", "4.0", "--inference-dataset", "0", "--inference-n-samples", "3") == 0
    payload = json.loads((tmp_path / "12_0" / "layer_2_scale_4.0" / "out_0_3.json").read_text())
    meta = payload["metadata"]
    assert {"target_subset", "layer", "scale", "contrastive_vector_norm", "effective_magnitude"} <= set(meta)
    summary = meta["metrics"]
    assert set(summary["baseline_mean"]) == set(METRIC_NAMES) == set(summary["steered_mean"]) == set(summary["delta"])
    assert summary["probe_auroc"] is not None and 0.0 <= summary["probe_auroc"] <= 1.0
    assert summary["seconds"] >= 0 and meta["timings"]["metrics_s"] >= 0
    for name in METRIC_NAMES:
        if summary["delta"][name] is not None:
            expected = summary["steered_mean"][name] - summary["baseline_mean"][name]
            assert summary["delta"][name] == pytest.approx(expected, abs=1e-5)
    for row in payload["results"]:
        assert {"prompt_idx", "prompt", "prompt_id", "baseline", "steered"} <= set(row)
        assert set(row["metrics"]) == {"baseline", "steered"}
        for side in ("baseline", "steered"):
            assert set(row["metrics"][side]) == set(METRIC_NAMES)
    means = [r["metrics"]["baseline"]["distinct_2"] for r in payload["results"]]
    assert summary["baseline_mean"]["distinct_2"] == pytest.approx(sum(means) / len(means), abs=1e-5)


def test_no_metrics_flag_leaves_them_out(tmp_path: Path) -> None:
    assert run_cli(tmp_path, "--no-metrics") == 0
    payload = json.loads((tmp_path / "12_0" / "layer_2_scale_1.0" / "results.json").read_text())
    assert "metrics" not in payload["metadata"] and "metrics_s" not in payload["metadata"]["timings"]
    assert all("metrics" not in row for row in payload["results"])


def test_metrics_setting_is_part_of_the_result_settings() -> None:
    config = RunConfig(target_subset="12", baseline_subset="0", layer=1)
    assert config.metrics is True and config.result_settings()["metrics"] is True
    assert config.settings_hash != config.with_changes(metrics=False).settings_hash


# ---------------------------------------------------------------- views


@pytest.fixture(scope="module")
def sweep_frame(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """A tiny-model sweep: layers 1 and 2 x scales 1 and 300, three prompts, metrics on."""
    tiny = build_tiny_model("llama", n_layers=4, hidden_size=64, seed=0)
    root = tmp_path_factory.mktemp("sweep")
    for layer in (1, 2):
        config = RunConfig(
            target_subset="12",
            baseline_subset="0",
            layer=layer,
            model="tiny-random:llama",
            n_samples=8,
            inference_dataset="0",
            inference_n_samples=3,
            max_tokens=6,
            temperature=0.0,
            data_source="bundled",
            output_dir=str(root),
            progress=False,
        )
        run_experiment(config, loaded=tiny, scales=[1.0, 300.0])
    return metrics_frame(root)


def test_metrics_frame_and_summary(sweep_frame: pd.DataFrame) -> None:
    assert len(sweep_frame) == 2 * 2 * 3
    assert {"layer", "scale", "prompt", "steered", "steered.perplexity", "delta.concept_score"} <= set(sweep_frame)
    summary = layer_scale_summary(sweep_frame)
    assert list(zip(summary["layer"], summary["scale"], strict=True)) == [(1, 1.0), (1, 300.0), (2, 1.0), (2, 300.0)]
    assert (summary["n"] == 3).all()
    assert summary["best"].sum() <= 2
    rows = cell_rows(sweep_frame, 2, 300.0)
    assert len(rows) == 3 and {"prompt", "baseline", "steered", "steered.perplexity"} <= set(rows)
    options = cell_options(sweep_frame)
    assert [value for _, value in options] == [(1, 1.0), (1, 300.0), (2, 1.0), (2, 300.0)]
    assert len(cell_rows(sweep_frame, *options[1][1])) == 3


def test_heatmaps_carry_cells_for_clicks(sweep_frame: pd.DataFrame) -> None:
    pytest.importorskip("plotly")
    figure = layer_scale_heatmap(sweep_frame, "concept_delta")
    trace = figure.data[0]
    assert list(trace.x) == ["1", "300"] and list(trace.y) == [1, 2]
    assert [list(c) for c in trace.customdata[1]] == [[2, 1.0], [2, 300.0]]
    both = metric_heatmaps(sweep_frame)
    assert [t.name for t in both.data] == ["concept_delta", "perplexity"]

    class Points:
        xs = ["300"]
        ys = [2]

    assert cell_from_click(Points()) == (2, 300.0)
    assert cell_from_click(type("Empty", (), {"xs": [], "ys": []})()) is None


def synthetic_frame() -> pd.DataFrame:
    """Two layers x three scales, two prompts each, with known concept and fluency."""
    cells = {
        (4, 1.0): (0.1, 3.0, 0.9),
        (4, 2.0): (0.3, 5.0, 0.9),
        (4, 4.0): (0.6, 40.0, 0.9),  # perplexity 20x baseline: collapsed
        (8, 1.0): (0.2, 2.5, 0.9),
        (8, 2.0): (0.4, 2.6, 0.3),  # distinct-2 below the floor: collapsed
        (8, 4.0): (0.9, 90.0, 0.2),
    }
    records = []
    for (layer, scale), (concept, perplexity, distinct) in cells.items():
        for prompt_idx in range(2):
            record = {"experiment": "e", "layer": layer, "scale": scale, "prompt_idx": prompt_idx, "prompt": "p"}
            record |= {"prompt_id": f"id{prompt_idx}", "baseline": "b", "steered": f"s{layer}-{scale}"}
            for name in METRIC_NAMES:
                record[f"baseline.{name}"] = record[f"steered.{name}"] = 1.0
            record |= {"baseline.concept_score": 0.0, "steered.concept_score": concept, "baseline.perplexity": 2.0}
            record |= {"steered.perplexity": perplexity, "steered.distinct_2": distinct, "steered.n_tokens": 10}
            for name in METRIC_NAMES:
                record[f"delta.{name}"] = record[f"steered.{name}"] - record[f"baseline.{name}"]
            records.append(record)
    return pd.DataFrame.from_records(records)


def test_best_and_collapse_scales_per_layer() -> None:
    frame = synthetic_frame()
    summary = layer_scale_summary(frame).set_index(["layer", "scale"])
    assert summary.loc[(4, 4.0), "perplexity_ratio"] == pytest.approx(20.0)
    assert summary["collapsed"].to_dict() == {
        (4, 1.0): False,
        (4, 2.0): False,
        (4, 4.0): True,
        (8, 1.0): False,
        (8, 2.0): True,
        (8, 4.0): True,
    }
    best = best_scale_per_layer(frame).set_index("layer")
    assert best["best_scale"].to_dict() == {4: 2.0, 8: 1.0}
    assert best.loc[4, "concept_delta"] == pytest.approx(0.3)
    collapse = collapse_scale_per_layer(frame).set_index("layer")
    assert collapse["collapse_scale"].to_dict() == {4: 4.0, 8: 2.0}
    assert collapse["collapse_scale_negative"].isna().all()
    backwards = frame.assign(**{"delta.concept_score": -frame["delta.concept_score"]})
    assert best_scale_per_layer(backwards)["best_scale"].isna().all(), "no scale moved the concept: no best scale"


def test_views_refuse_mixed_experiments() -> None:
    frame = synthetic_frame()
    mixed = pd.concat([frame, frame.assign(experiment="other")])
    with pytest.raises(ValueError, match="mixes experiments"):
        layer_scale_summary(mixed)
    assert len(layer_scale_summary(mixed, experiment="other")) == 6
