"""The notebook building blocks: playground and viewer driven from code, results tables, plotly figures."""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from chunky_utils import activations
from chunky_utils.config import RunConfig
from chunky_utils.errors import UsageError
from chunky_utils.models import LoadedModel
from chunky_utils.notebook import (
    all_layer_means,
    config_from_parameters,
    load_prompt_sets,
    means_table,
    project_root,
    prompt_activations,
    subsets_to_compare,
    use_project_root,
)
from chunky_utils.results import read_results, write_results
from chunky_utils.steering import contrastive_vector
from chunky_utils.tables import (
    comparison_rows,
    load_results_frame,
    metric_names,
    outcome_payload,
    side_by_side_html,
    summarize_configs,
    word_diff_html,
)
from tests.conftest import REPO_ROOT

pytest.importorskip("ipywidgets")
pytest.importorskip("plotly")

from chunky_utils import plots  # noqa: E402
from chunky_utils.widgets import BUILTIN_PROMPTS, ComparisonViewer, SteeringPlayground  # noqa: E402


def tiny_config(tmp_path: Path, **changes: Any) -> RunConfig:
    """A small greedy run on the bundled sample, writing into tmp_path."""
    values: dict[str, Any] = {
        "target_subset": "12",
        "baseline_subset": "0",
        "layer": 2,
        "scale": 4.0,
        "model": "tiny-random:llama",
        "n_samples": 6,
        "inference_dataset": "5",
        "inference_n_samples": 3,
        "max_tokens": 6,
        "temperature": 0.0,
        "data_source": "bundled",
        "output_dir": str(tmp_path / "results"),
        "cache_dir": str(tmp_path / "cache"),
        "progress": False,
    }
    values.update(changes)
    return RunConfig(**values)


@pytest.fixture
def count_extractions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every call of the extraction pass, recorded (its prompt count)."""
    calls: list[int] = []
    original = activations.extract_last_token_activations

    def counting(model: Any, tokenizer: Any, prompts: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(prompts))
        return original(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(activations, "extract_last_token_activations", counting)
    return calls


# ---------------------------------------------------------------- playground


def test_playground_controls_span_the_model_and_the_subsets(tiny: LoadedModel, tmp_path: Path) -> None:
    playground = SteeringPlayground(tiny, tiny_config(tmp_path, scale=2.5, temperature=0.3, max_tokens=9))
    assert (playground.layer_slider.min, playground.layer_slider.max, playground.layer_slider.value) == (0, 3, 2)
    assert playground.scale_slider.min < 0 < playground.scale_slider.max and playground.scale_slider.value == 2.5
    assert [value for _, value in playground.target_dropdown.options] == [str(k) for k in range(19)]
    assert playground.target_dropdown.label == "12 CoCoNot" and playground.baseline_dropdown.label == "0 Math"
    assert playground.prompt_source_dropdown.options[0][1] == BUILTIN_PROMPTS
    assert playground.prompt_source_dropdown.value == "5" and not playground.n_prompts.disabled
    assert (playground.max_tokens.value, playground.temperature.value) == (9, 0.3)
    playground.prompt_source_dropdown.value = BUILTIN_PROMPTS
    assert playground.n_prompts.disabled and playground.current_config().inference_dataset is None
    with pytest.raises(UsageError, match="out of range"):
        SteeringPlayground(tiny, tiny_config(tmp_path, layer=4))


def test_generate_then_moving_sliders_costs_only_generation(
    tiny: LoadedModel, tmp_path: Path, count_extractions: list[int]
) -> None:
    playground = SteeringPlayground(tiny, tiny_config(tmp_path))
    playground.generate_button.click()
    assert playground.last_error is None, playground.last_error
    assert playground.last_vector_source == "extracted" and count_extractions == [6, 6]
    first = playground.last_payload
    assert first is not None and len(first["results"]) == 3
    assert "chunky-side-by-side" in playground.table.value
    assert html.escape(first["results"][0]["prompt"]) in playground.table.value
    assert "vector norm" in playground.table.value and "effective magnitude" in playground.table.value
    assert playground.status.value.startswith("Generated: layer 2, scale 4")

    playground.layer_slider.value = 1
    playground.scale_slider.value = -6.0
    assert "Settings changed" in playground.status.value
    playground.generate_button.click()
    assert playground.last_error is None and playground.last_vector_source == "memory"
    assert count_extractions == [6, 6], "a slider move must not extract again"
    meta = playground.last_payload["metadata"]
    assert (meta["layer"], meta["scale"]) == (1, -6.0)
    assert meta["effective_magnitude"] == pytest.approx(-6.0 * meta["contrastive_vector_norm"])
    assert "layer 1, scale -6" in playground.table.value
    assert [r["baseline"] for r in playground.last_payload["results"]] == [r["baseline"] for r in first["results"]]

    fresh = SteeringPlayground(tiny, tiny_config(tmp_path, layer=3))
    fresh.generate_button.click()
    assert fresh.last_vector_source == "cache" and count_extractions == [6, 6], "other layers are cache hits"


def test_scale_zero_steers_nothing(tiny: LoadedModel, tmp_path: Path) -> None:
    playground = SteeringPlayground(tiny, tiny_config(tmp_path, scale=0.0))
    payload = playground.generate()
    assert all(row["baseline"] == row["steered"] for row in payload["results"])
    assert "0 of 3 answers differ" in playground.table.value
    assert payload["metadata"]["effective_magnitude"] == 0.0


def test_playground_save_writes_what_the_cli_writes(tiny: LoadedModel, tmp_path: Path) -> None:
    playground = SteeringPlayground(tiny, tiny_config(tmp_path))
    assert playground.save_button.disabled
    shown = playground.generate()
    assert not playground.save_button.disabled
    playground.save_button.click()
    assert playground.last_error is None, playground.last_error
    # the seed's layout, with the decoding settings that differ from the CLI defaults in the file name
    expected = tmp_path / "results" / "12_0" / "layer_2_scale_4.0" / "out_5_3_temp0.0_max6.json"
    assert playground.saved_path == expected and "Saved" in playground.status.value
    saved = read_results(expected)
    assert [r["steered"] for r in saved["results"]] == [r["steered"] for r in shown["results"]]
    assert [r["baseline"] for r in saved["results"]] == [r["baseline"] for r in shown["results"]]
    assert saved["metadata"]["settings_hash"] == shown["metadata"]["settings_hash"]


def test_playground_shows_bad_input_instead_of_raising(tiny: LoadedModel, tmp_path: Path) -> None:
    playground = SteeringPlayground(tiny, tiny_config(tmp_path, n_samples=500))
    playground.generate_button.click()
    assert playground.last_error is not None and "only 160 are available" in playground.last_error
    assert "error:" in playground.status.value and not playground.generate_button.disabled
    playground.save_button.click()
    assert "press Generate first" in (playground.last_error or "")


# ---------------------------------------------------------------- tables


def visible_text(page: str) -> str:
    """The text a browser shows for an HTML fragment (tags dropped, entities decoded)."""
    return html.unescape(re.sub(r"<[^>]+>", "", page))


def fake_payload(layer: int, scale: float, metrics: bool, prompts: tuple[str, ...] = ("p0", "p1")) -> dict[str, Any]:
    """A results payload in the seed format; steered answers get longer with the scale."""
    metadata = {
        "target_subset": "12",
        "baseline_subset": "0",
        "layer": layer,
        "scale": scale,
        "contrastive_vector_norm": 2.0,
        "effective_magnitude": 2.0 * scale,
        "inference_dataset": "5",
        "inference_n_samples": len(prompts),
        "model_name": "tiny",
        "timings": {"total_s": 1.0},
    }
    rows = []
    for index, prompt in enumerate(prompts):
        row: dict[str, Any] = {
            "prompt_idx": index,
            "prompt": prompt,
            "baseline": "one two",
            "steered": " ".join(["word"] * int(2 + scale + layer)),
        }
        if metrics:
            row["metrics"] = {
                "baseline": {"concept_score": 0.1, "perplexity": 10.0, "label": "x"},
                "steered": {"concept_score": 0.1 * scale, "perplexity": 10.0 + layer},
            }
        rows.append(row)
    return {"metadata": metadata, "results": rows}


def write_fake_results(root: Path, layers: tuple[int, ...] = (1, 2), scales: tuple[float, ...] = (1.0, 2.0)) -> None:
    for layer in layers:
        for scale in scales:
            payload = fake_payload(layer, scale, metrics=layer == 1)
            path = root / "12_0" / f"layer_{layer}_scale_{scale!r}" / "out_5_2.json"
            write_results(path, payload["metadata"], payload["results"])


def test_results_frame_has_a_row_per_prompt_and_config(tmp_path: Path) -> None:
    write_fake_results(tmp_path)
    (tmp_path / "notes.json").write_text("{}")  # not a results file: ignored
    frame = load_results_frame(tmp_path)
    assert len(frame) == 8 and frame["config_id"].nunique() == 4
    assert list(frame[["layer", "scale"]].drop_duplicates().itertuples(index=False, name=None)) == [
        (1, 1.0),
        (1, 2.0),
        (2, 1.0),
        (2, 2.0),
    ]
    row = frame[(frame["layer"] == 2) & (frame["scale"] == 2.0)].iloc[0]
    assert (row["steered.words"], row["baseline.words"], row["delta.words"]) == (6, 2, 4)
    assert row["config"] == "12_0 L2 s2 (5 x2)" and "timings" not in frame.columns
    assert metric_names(frame) == ["concept_score", "perplexity"], "numbers only; lengths are not metrics"
    with_metrics = frame[frame["layer"] == 1]
    assert with_metrics["delta.perplexity"].tolist() == [1.0] * 4
    summary = summarize_configs(frame)
    assert len(summary) == 4 and summary["n_prompts"].tolist() == [2] * 4
    assert {"config_id", "contrastive_vector_norm", "effective_magnitude", "steered.words"} <= set(summary.columns)
    with pytest.raises(UsageError, match="not found"):
        load_results_frame(tmp_path / "nowhere")


def test_empty_results_folder_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no results JSON"):
        load_results_frame(tmp_path)


def test_malformed_results_are_usage_errors(tmp_path: Path) -> None:
    folder = tmp_path / "12_0" / "layer_1_scale_1.0"
    write_results(folder / "results.json", {"target_subset": "12"}, [{"prompt": "p", "baseline": "", "steered": ""}])
    with pytest.raises(UsageError, match="lack metadata 'layer'"):
        load_results_frame(tmp_path)
    write_results(folder / "results.json", fake_payload(1, 1.0, metrics=False)["metadata"], ["not a row"])
    with pytest.raises(UsageError, match=r"results\[0\] is not an object"):
        load_results_frame(tmp_path)
    (folder / "results.json").write_text("{broken")
    with pytest.raises(UsageError, match="cannot read results"):
        load_results_frame(tmp_path)


def test_word_diff_marks_changed_words_and_escapes_html() -> None:
    left, right = word_diff_html("the cat <b>sat</b>", "the dog <b>sat</b>")
    assert '<span class="chunky-removed"' in left and ">cat</span>" in left and "dog" not in left
    assert '<span class="chunky-added"' in right and ">dog</span>" in right
    assert "&lt;b&gt;sat&lt;/b&gt;" in left and "<b>" not in left + right
    same_left, same_right = word_diff_html("same text", "same text")
    assert same_left == same_right == "same text"


def test_side_by_side_table_wraps_text_and_states_norm_and_magnitude() -> None:
    payload = fake_payload(layer=3, scale=1.5, metrics=False)
    payload["results"][1]["steered"] = payload["results"][1]["baseline"]
    page = side_by_side_html(payload["results"], payload["metadata"])
    assert "12 CoCoNot - 0 Math, layer 3, scale 1.5 | vector norm 2, effective magnitude 3" in page
    assert "white-space:pre-wrap" in page and "1 of 2 answers differ" in page
    assert page.count('class="baseline left"') == 2 and page.count('class="steered right"') == 2
    assert '<tr class="changed">' in page and '<tr class="same">' in page


def test_outcome_payload_reads_a_skipped_run_from_disk(tmp_path: Path) -> None:
    from chunky_utils.pipeline import RunOutcome

    payload = fake_payload(1, 1.0, metrics=False)
    path = write_results(tmp_path / "r.json", payload["metadata"], payload["results"])
    assert outcome_payload(RunOutcome(skipped={1.0: path})) == (path, json.loads(path.read_text()))
    with pytest.raises(UsageError):
        outcome_payload(RunOutcome())


def test_comparison_viewer_follows_its_dropdowns(tmp_path: Path) -> None:
    write_fake_results(tmp_path)
    frame = load_results_frame(tmp_path)
    viewer = ComparisonViewer(frame)
    ids = frame["config_id"].unique().tolist()
    assert viewer.left_dropdown.value == f"{ids[0]}::steered" and viewer.right_dropdown.value == f"{ids[1]}::steered"
    assert "word word word word" in visible_text(viewer.table.value) and "vector norm 2" in viewer.table.value
    viewer.right_dropdown.value = f"{ids[0]}::baseline"
    assert "one two" in visible_text(viewer.table.value)
    assert "baseline of [12_0 L1 s1 (5 x2)]" in viewer.table.value
    assert "2 of 2 answers differ" in viewer.table.value
    viewer.right_dropdown.value = f"{ids[0]}::steered"
    assert "0 of 2 answers differ" in viewer.table.value
    assert ComparisonViewer(frame, left=ids[3]).left_dropdown.value == f"{ids[3]}::steered"
    with pytest.raises(UsageError, match="no config"):
        ComparisonViewer(frame, left="nope")


def test_comparison_rows_match_prompts_across_configs(tmp_path: Path) -> None:
    for layer, prompts in ((1, ("a", "b")), (2, ("b", "c"))):
        payload = fake_payload(layer, 1.0, metrics=False, prompts=prompts)
        path = tmp_path / "12_0" / f"layer_{layer}_scale_1.0" / "results.json"
        write_results(path, payload["metadata"], payload["results"])
    frame = load_results_frame(tmp_path)
    ids = frame["config_id"].unique().tolist()
    rows, caption = comparison_rows(frame, (ids[0], "steered"), (ids[1], "steered"))
    assert [(r["prompt"], bool(r["left"]), bool(r["right"])) for r in rows] == [
        ("a", True, False),
        ("b", True, True),
        ("c", False, True),
    ]
    assert "effective magnitude 2" in caption
    with pytest.raises(UsageError, match="column"):
        comparison_rows(frame, (ids[0], "prompt"), (ids[1], "steered"))


# ---------------------------------------------------------------- figures


@pytest.fixture(scope="module")
def nineteen_subsets(tiny: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Means at every layer and prompt sets for all 19 Tulu subsets (2 prompts each) on the tiny model."""
    cache = tmp_path_factory.mktemp("cache")
    prompt_sets = load_prompt_sets(subsets_to_compare("12", "0", all_subsets=True), 2, "bundled", 0)
    return {"cache": cache, "prompt_sets": prompt_sets, "means": all_layer_means(tiny, prompt_sets, cache)}


def test_layer_norms_figure_has_a_line_per_subset_and_the_vector(nineteen_subsets: dict[str, Any]) -> None:
    means = {key: nineteen_subsets["means"][key] for key in ("12", "0")}
    vector = contrastive_vector(means["12"], means["0"])
    fig = plots.layer_norms_figure(means, vector)
    assert [trace.name for trace in fig.data] == ["mean of 12 CoCoNot", "mean of 0 Math", "vector 12 - 0"]
    assert all(list(trace.x) == [0, 1, 2, 3] for trace in fig.data)
    assert list(fig.data[0].y) == pytest.approx([means["12"].means[layer].norm for layer in range(4)])
    assert list(fig.data[2].y) == pytest.approx([vector.norm(layer) for layer in range(4)])
    assert fig.layout.xaxis.title.text == "layer"


def test_cosine_heatmap_of_all_nineteen_subsets(nineteen_subsets: dict[str, Any]) -> None:
    fig = plots.cosine_heatmap_figure(nineteen_subsets["means"], layer=2)
    heatmap = fig.data[0]
    z = torch.tensor(heatmap.z)
    assert z.shape == (19, 19) and len(heatmap.x) == 19 and heatmap.y[18] == "18 IF Data"
    torch.testing.assert_close(z.diagonal(), torch.ones(19), atol=1e-5, rtol=0)
    torch.testing.assert_close(z, z.T)
    assert "layer 2" in fig.layout.title.text
    centred = plots.cosine_heatmap_figure(nineteen_subsets["means"], layer=2, center=True)
    assert centred.data[0].zmid == 0 and float(torch.tensor(centred.data[0].z).min()) < float(z.min())
    with pytest.raises(UsageError, match="at least two"):
        plots.cosine_heatmap_figure({"12": nineteen_subsets["means"]["12"]}, layer=2)


def test_pca_figure_colours_prompts_by_subset(tiny: LoadedModel, nineteen_subsets: dict[str, Any]) -> None:
    prompt_sets = nineteen_subsets["prompt_sets"]
    acts = {key: prompt_activations(tiny, prompt_sets[key], 1, nineteen_subsets["cache"]) for key in ("12", "0", "8")}
    assert acts["12"].shape == (2, 64)
    fig = plots.pca_figure(acts, layer=1)
    assert [trace.name for trace in fig.data] == ["12 CoCoNot", "0 Math", "8 Code"]
    assert [len(trace.x) for trace in fig.data] == [2, 2, 2]
    assert fig.layout.xaxis.title.text.startswith("PC1 (") and "layer 1" in fig.layout.title.text


def test_pca_2d_finds_the_direction_that_separates_two_clusters() -> None:
    generator = torch.Generator().manual_seed(0)
    offset = torch.zeros(16)
    offset[5] = 10.0
    points = torch.cat([torch.randn(20, 16, generator=generator), torch.randn(20, 16, generator=generator) + offset])
    coordinates, shares = plots.pca_2d(points)
    assert coordinates.shape == (40, 2) and shares[0] > 0.5 > shares[1]
    first, second = coordinates[:20, 0], coordinates[20:, 0]
    assert (first.max() < second.min()) or (second.max() < first.min())
    with pytest.raises(UsageError):
        plots.pca_2d(torch.zeros(1, 4))


def test_trend_figures_plot_length_and_metrics_over_scale_then_layer(tmp_path: Path) -> None:
    write_fake_results(tmp_path)
    frame = load_results_frame(tmp_path)
    fig = plots.response_length_figure(frame)
    solid = [trace for trace in fig.data if trace.line.dash == "solid"]
    assert [trace.name for trace in solid] == ["12_0 layer 1", "12_0 layer 2"]
    assert list(solid[0].x) == [1.0, 2.0] and list(solid[0].y) == [4.0, 5.0] and list(solid[1].y) == [5.0, 6.0]
    dotted = [trace for trace in fig.data if trace.line.dash == "dot"]
    assert all(list(trace.y) == [2.0, 2.0] for trace in dotted)
    assert fig.layout.xaxis.title.text == "scale" and "Response length (words)" in fig.layout.title.text
    metric_figs = plots.metric_figures(frame)
    assert [f.layout.yaxis.title.text for f in metric_figs] == ["mean concept_score", "mean perplexity"]
    assert list(metric_figs[0].data[0].y) == pytest.approx([0.1, 0.2])
    one_scale = frame[frame["scale"] == 2.0]
    by_layer = plots.response_length_figure(one_scale, unit="chars")
    assert by_layer.layout.xaxis.title.text == "layer" and list(by_layer.data[0].x) == [1, 2]
    with pytest.raises(UsageError, match="no measure 'fluency'"):
        plots.trend_figure(frame, "fluency")
    with pytest.raises(UsageError, match="length unit"):
        plots.response_length_figure(frame, unit="tokens")


def test_offline_renderer_embeds_no_cdn() -> None:
    import plotly.graph_objects as go
    import plotly.io as pio

    assert plots.setup_offline_plotly() == "plotly_mimetype+chunky_offline" == pio.renderers.default
    bundle = pio.renderers._build_mime_bundle(go.Figure(go.Bar(x=[1], y=[2])).to_dict())
    assert "application/vnd.plotly.v1+json" in bundle and "text/html" in bundle
    assert "cdn" not in bundle["text/html"].lower() and "mathjax" not in bundle["text/html"].lower()
    assert "Plotly.newPlot" in bundle["text/html"]


# ---------------------------------------------------------------- notebook helpers and imports


def test_config_from_parameters_matches_the_cli(tmp_path: Path) -> None:
    params = {"target_subset": 12, "baseline_subset": 0, "layer": 2, "scale": 2, "output_dir": str(tmp_path), "x": 1}
    config = config_from_parameters(params, progress=False)
    assert (config.target_subset, config.baseline_subset, config.scale) == ("12", "0", 2.0)
    cli_like = RunConfig("12", "0", 2, 2.0, output_dir=str(tmp_path))
    assert config.settings_hash == cli_like.settings_hash
    with pytest.raises(UsageError, match="unknown subset key"):
        config_from_parameters({**params, "target_subset": 99})
    with pytest.raises(UsageError, match="scale must be a number"):
        config_from_parameters({**params, "scale": "big"})


def test_subsets_to_compare_and_means_table(tiny: LoadedModel, nineteen_subsets: dict[str, Any]) -> None:
    assert subsets_to_compare("12", "0", ["8", "12"]) == ["12", "0", "8"]
    assert subsets_to_compare(12, 0, all_subsets=True)[:3] == ["12", "0", "1"]
    assert len(subsets_to_compare("12", "0", all_subsets=True)) == 19
    with pytest.raises(UsageError):
        subsets_to_compare("12", "0", "8")
    with pytest.raises(UsageError):
        subsets_to_compare("12", "77")
    table = means_table({k: nineteen_subsets["means"][k] for k in ("12", "0")}, layer=3)
    assert table["subset"].tolist() == ["12 CoCoNot", "0 Math"] and table["prompts"].tolist() == [2, 2]
    assert all(Path(p).name.endswith("_2_layer_3.pt") for p in table["cache file"])


def test_project_root_is_found_from_notebooks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert project_root(REPO_ROOT / "notebooks") == REPO_ROOT
    assert project_root(tmp_path) is None
    monkeypatch.chdir(REPO_ROOT / "notebooks")
    assert use_project_root() == REPO_ROOT and Path.cwd() == REPO_ROOT
    monkeypatch.chdir(tmp_path)
    assert use_project_root() == tmp_path


def test_chunky_utils_imports_without_notebook_packages() -> None:
    """A GPU machine may lack plotly, ipywidgets and papermill: every module must still import."""
    code = """
import importlib.abc, sys
BLOCKED = {"plotly", "ipywidgets", "papermill", "nbformat", "nbclient", "IPython", "jupyterlab"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked {name}")
sys.meta_path.insert(0, Block())
import chunky_utils, chunky_utils.tables, chunky_utils.plots, chunky_utils.widgets, chunky_utils.notebook
print("ok", sorted(m for m in BLOCKED if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok []"


def test_metric_cell_browser_shows_the_texts_of_the_chosen_cell(tmp_path) -> None:
    from chunky_utils.metric_views import metrics_frame
    from chunky_utils.results import write_results
    from chunky_utils.widgets import MetricCellBrowser

    fluent = {"perplexity": 2.0, "distinct_2": 0.9, "relevance": 1.0, "overall": 0.8, "concept_score": 0.1}
    for scale in (1.0, 4.0):
        rows = [
            {
                "prompt_idx": 0,
                "prompt": "p",
                "baseline": "plain answer",
                "steered": f"answer at {scale}",
                "metrics": {"baseline": fluent, "steered": {**fluent, "concept_score": scale / 10}},
            }
        ]
        metadata = {
            "target_subset": "12",
            "baseline_subset": "0",
            "layer": 3,
            "scale": scale,
            "inference_dataset": None,
            "model_name": "m",
        }
        write_results(tmp_path / "12_0" / f"layer_3_scale_{scale!r}" / "results.json", metadata, rows)
    browser = MetricCellBrowser(metrics_frame(tmp_path))
    labels = [label for label, _ in browser.dropdown.options]
    assert len(labels) == 2 and labels[0].startswith("layer 3, scale 1")
    assert "answer at 1.0" in browser.table.value
    browser.dropdown.value = (3, 4.0)
    assert "answer at 4.0" in browser.table.value and "answer at 1.0" not in browser.table.value


def test_save_after_moving_a_slider_writes_what_is_shown(tiny: LoadedModel, tmp_path: Path) -> None:
    playground = SteeringPlayground(tiny, tiny_config(tmp_path))
    shown = playground.generate()
    playground.layer_slider.value = 1  # moved, not generated: the save must still be the layer-2 answers
    playground.temperature.value = 0.9
    playground.save_button.click()
    assert playground.last_error is None, playground.last_error
    saved = read_results(playground.saved_path)
    assert saved == json.loads(json.dumps(shown))  # exactly the payload on screen
    assert saved["metadata"]["layer"] == 2 and saved["metadata"]["temperature"] == 0.0
    assert playground.saved_path.parent.name == "layer_2_scale_4.0"

    first_path = playground.saved_path
    playground.layer_slider.value = 2
    playground.generate()  # now at temperature 0.9: another file, no collision
    playground.save_button.click()
    assert playground.last_error is None, playground.last_error
    assert playground.saved_path != first_path and "temp0.9" in playground.saved_path.name
    assert read_results(first_path) == saved

    playground.save_button.click()  # the same file again: resolved in the UI, never by a CLI flag
    assert "tick 'overwrite'" in (playground.last_error or "") and "--overwrite" not in playground.last_error
    playground.save_name.value = "second look"
    playground.save_button.click()
    assert playground.last_error is None and playground.saved_path.name.endswith("_second_look.json")
    playground.save_name.value = ""
    playground.overwrite_toggle.value = True
    playground.save_button.click()
    assert playground.last_error is None


def test_rows_carry_one_collapse_verdict(tiny: LoadedModel, tmp_path: Path) -> None:
    payload = SteeringPlayground(tiny, tiny_config(tmp_path, scale=40.0, max_tokens=12)).generate()
    for row in payload["results"]:
        assert set(row["collapse"]) == {"baseline", "steered"}
        assert row["collapsed"] == (row["collapse"]["steered"] is not None)
    counts = payload["metadata"]["collapsed"]
    assert counts["steered"] == sum(row["collapsed"] for row in payload["results"])


def test_collapse_badges_in_the_side_by_side_and_the_comparison(tmp_path: Path) -> None:
    payload = fake_payload(layer=2, scale=8.0, metrics=False)
    payload["results"][0]["collapse"] = {"baseline": None, "steered": "loops (80% of tokens repeat back to back)"}
    payload["results"][1]["collapse"] = {"baseline": None, "steered": None}
    page = side_by_side_html(payload["results"], payload["metadata"])
    assert page.count('class="chunky-collapsed"') == 1 and 'title="loops (80%' in page
    assert "collapsed: baseline 0, steered 1" in visible_text(page)
    path = tmp_path / "r" / "12_0" / "layer_2_scale_8.0" / "out_5_2.json"
    write_results(path, payload["metadata"], payload["results"])
    frame = load_results_frame(tmp_path / "r")
    config_id = frame["config_id"].iloc[0]
    rows, _ = comparison_rows(frame, (config_id, "baseline"), (config_id, "steered"))
    assert [row["right_collapse"] for row in rows] == ["loops (80% of tokens repeat back to back)", None]
    assert "chunky-collapsed" in side_by_side_html(rows, left="left", right="right")
