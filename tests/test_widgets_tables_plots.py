"""The notebook building blocks: playground and viewer driven from code, results tables, plotly figures."""

from __future__ import annotations

import html
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from chunky_utils import activations
from chunky_utils.comparison_html import comparison_rows, side_by_side_html, word_diff_html
from chunky_utils.config import RunConfig
from chunky_utils.errors import UsageError
from chunky_utils.models import LoadedModel
from chunky_utils.notebook.project import config_from_parameters, project_root, use_project_root
from chunky_utils.notebook.subsets import (
    all_layer_means,
    load_prompt_sets,
    means_table,
    prompt_activations,
    subsets_to_compare,
)
from chunky_utils.results import read_results, write_results
from chunky_utils.steering import contrastive_vector
from chunky_utils.tables import load_results_frame, metric_names, outcome_payload, summarize_configs
from tests.conftest import REPO_ROOT

pytest.importorskip("ipywidgets")
pytest.importorskip("plotly")

from chunky_utils import activation_plots, plots, sweep_overview  # noqa: E402
from chunky_utils.widgets.comparison import ComparisonViewer  # noqa: E402
from chunky_utils.widgets.playground import SteeringPlayground  # noqa: E402
from chunky_utils.widgets.playground_controls import BUILTIN_PROMPTS, TYPED_PROMPTS  # noqa: E402


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
    """Every prompt set the extraction pass reads, recorded (its prompt count)."""
    calls: list[int] = []
    original = activations.extract_prompt_sets

    def counting(model: Any, tokenizer: Any, prompt_sets: Any, *args: Any, **kwargs: Any) -> Any:
        calls.extend(len(prompts) for prompts in prompt_sets)
        return original(model, tokenizer, prompt_sets, *args, **kwargs)

    monkeypatch.setattr(activations, "extract_prompt_sets", counting)
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
    assert playground.wait(120)
    assert playground.last_error is None, playground.last_error
    assert playground.last_vector_source == "extracted" and count_extractions == [6, 6]
    first = playground.last_payload
    assert first is not None and len(first["results"]) == 3
    assert "chunky-side-by-side" in playground.table.value
    assert html.escape(first["results"][0]["prompt"]) in playground.table.value
    assert "vector norm" in playground.table.value and "effective magnitude" in playground.table.value
    assert playground.status.value.startswith("Run 1: generated layer 2, scale 4")

    playground.layer_slider.value = 1
    playground.scale_slider.value = -6.0
    assert "Settings changed" in playground.status.value
    playground.generate_button.click()
    assert playground.wait(120)
    assert playground.last_error is None and playground.last_vector_source == "memory"
    assert count_extractions == [6, 6], "a slider move must not extract again"
    meta = playground.last_payload["metadata"]
    assert (meta["layer"], meta["scale"]) == (1, -6.0)
    assert meta["effective_magnitude"] == pytest.approx(-6.0 * meta["contrastive_vector_norm"])
    assert "layer 1, scale -6" in playground.table.value
    assert [r["baseline"] for r in playground.last_payload["results"]] == [r["baseline"] for r in first["results"]]

    fresh = SteeringPlayground(tiny, tiny_config(tmp_path, layer=3))
    fresh.generate_button.click()
    assert fresh.wait(120)
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
    assert playground.wait(60)
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
    fig = activation_plots.layer_norms_figure(means, vector)
    names = [trace.name for trace in fig.data]
    assert names == ["mean of 12 CoCoNot", "mean of 0 Math", "vector 12 - 0", "vector norm / mean norm"]
    assert all(list(trace.x) == [0, 1, 2, 3] for trace in fig.data)
    assert list(fig.data[0].y) == pytest.approx([means["12"].means[layer].norm for layer in range(4)])
    assert list(fig.data[2].y) == pytest.approx([vector.norm(layer) for layer in range(4)])
    # two means with nearly equal norms stay distinguishable: different dash, marker and width
    first, second = fig.data[0], fig.data[1]
    assert (first.line.dash, first.marker.symbol) != (second.line.dash, second.marker.symbol)
    assert first.line.width > second.line.width
    shares = [vector.norm(k) / ((means["12"].means[k].norm + means["0"].means[k].norm) / 2) for k in range(4)]
    assert list(fig.data[3].y) == pytest.approx(shares) and fig.data[3].yaxis == "y2"
    assert fig.layout.xaxis2.title.text == "layer"


def test_cosine_heatmap_of_all_nineteen_subsets(nineteen_subsets: dict[str, Any]) -> None:
    fig = activation_plots.cosine_heatmap_figure(nineteen_subsets["means"], layer=2)
    heatmap = fig.data[0]
    z = torch.tensor(heatmap.z)
    assert z.shape == (19, 19) and len(heatmap.x) == 19 and heatmap.y[18] == "18 IF Data"
    torch.testing.assert_close(z.diagonal(), torch.ones(19), atol=1e-5, rtol=0)
    torch.testing.assert_close(z, z.T)
    assert "layer 2" in fig.layout.title.text
    assert (heatmap.zmin, heatmap.zmax, heatmap.zmid) == (-1.0, 1.0, 0.0), "0.95 must not look very different"
    assert "fixed range -1..1" in fig.layout.title.text
    centred = activation_plots.cosine_heatmap_figure(nineteen_subsets["means"], layer=2, center=True)
    assert centred.data[0].zmid == 0 and float(torch.tensor(centred.data[0].z).min()) < float(z.min())
    assert (centred.data[0].zmin, centred.data[0].zmax) == (-1.0, 1.0)
    with pytest.raises(UsageError, match="at least two"):
        activation_plots.cosine_heatmap_figure({"12": nineteen_subsets["means"]["12"]}, layer=2)
    two = {key: nineteen_subsets["means"][key] for key in ("12", "0")}
    with pytest.raises(UsageError, match="opposite directions by construction"):
        activation_plots.cosine_heatmap_figure(two, layer=2, center=True)


def test_pca_figure_colours_prompts_by_subset(tiny: LoadedModel, nineteen_subsets: dict[str, Any]) -> None:
    prompt_sets = nineteen_subsets["prompt_sets"]
    acts = {key: prompt_activations(tiny, prompt_sets[key], 1, nineteen_subsets["cache"]) for key in ("12", "0", "8")}
    assert acts["12"].shape == (2, 64)
    fig = activation_plots.pca_figure(acts, layer=1, prompts={key: prompt_sets[key].prompts for key in acts})
    assert [trace.name for trace in fig.data] == ["12 CoCoNot", "0 Math", "8 Code"]
    assert [len(trace.x) for trace in fig.data] == [2, 2, 2]
    first_prompt = prompt_sets["12"].prompts[0]
    assert first_prompt.split()[0] in fig.data[0].hovertext[0]
    assert "%{hovertext}" in fig.data[0].hovertemplate, "hover shows the prompt, not coordinates"
    assert fig.layout.xaxis.title.text.startswith("PC1 (") and "layer 1" in fig.layout.title.text


def test_pca_2d_finds_the_direction_that_separates_two_clusters() -> None:
    generator = torch.Generator().manual_seed(0)
    offset = torch.zeros(16)
    offset[5] = 10.0
    points = torch.cat([torch.randn(20, 16, generator=generator), torch.randn(20, 16, generator=generator) + offset])
    coordinates, shares = activation_plots.pca_2d(points)
    assert coordinates.shape == (40, 2) and shares[0] > 0.5 > shares[1]
    first, second = coordinates[:20, 0], coordinates[20:, 0]
    assert (first.max() < second.min()) or (second.max() < first.min())
    with pytest.raises(UsageError):
        activation_plots.pca_2d(torch.zeros(1, 4))


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
import chunky_utils.instrument
print("ok", sorted(m for m in BLOCKED if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok []"


def test_metric_cell_browser_shows_the_texts_of_the_chosen_cell(tmp_path) -> None:
    from chunky_utils.metric_views import metrics_frame
    from chunky_utils.results import write_results
    from chunky_utils.widgets.cell_browser import MetricCellBrowser

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


# ---------------------------------------------------------------- issue 13: the playground as an instrument


SHORT_PROMPTS = ["Name a bird.", "What is 2 + 2?"]
"""Quick to read for the tiny model (the bundled FLAN prompts run to thousands of tokens)."""


def wait_until(condition: Any, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_generate_runs_on_a_worker_thread_and_stop_ends_it_within_a_step(tiny: LoadedModel, tmp_path: Path) -> None:
    playground = SteeringPlayground(tiny, tiny_config(tmp_path, metrics=False))
    playground.generate_button.click()
    assert playground.wait(120) and playground.last_error is None, playground.last_error
    shown = playground.table.value
    playground.max_tokens.value = 2000  # long enough to still be running when Stop comes
    playground.generate_button.click()
    assert playground.busy and playground.generate_button.disabled and not playground.stop_button.disabled
    assert wait_until(lambda: playground.last_progress is not None and playground.last_progress.done > 3)
    assert "chunky-stale" in playground.table.value and "opacity:0.35" in playground.table.value, "old table dimmed"
    progress = playground.last_progress
    assert progress.stage == "generating" and progress.total == 2000 and "token" in progress.describe()
    assert 0 < playground.progress.value < 1 and "generating: token" in playground.progress_label.value
    pressed = time.monotonic()
    playground.stop_button.click()  # from this thread, as the kernel would: the worker keeps running meanwhile
    assert "Stopping" in playground.status.value
    assert playground.wait(10) and time.monotonic() - pressed < 2.0
    assert playground.status.value.startswith("Stopped while generating (token")
    assert playground.progress_label.value == "generating: stopped"
    assert playground.table.value == shown, "the previous answers stay, undimmed"
    assert not playground.busy and not playground.generate_button.disabled and not playground.generate_button.value
    assert playground.stop_button.disabled and playground.progress.bar_style == "warning"
    assert playground.runs == 1
    from chunky_utils.steering import active_hook_count

    left = [  # every hook but transformers' own, observers included (user_hooks leaves those out)
        hook
        for layer in tiny.model.model.layers
        for hook in (*layer._forward_hooks.values(), *layer._forward_pre_hooks.values())
        if not getattr(hook, "__module__", "").startswith("transformers.")
    ]
    assert active_hook_count(tiny.model) == 0 and not left, "every hook removed after a stop"


def test_a_double_click_starts_one_generation(tiny: LoadedModel, tmp_path: Path) -> None:
    playground = SteeringPlayground(tiny, tiny_config(tmp_path, metrics=False))
    from chunky_utils.widgets.common import GUARD_CSS

    assert "chunky-guarded" in playground.generate_button._dom_classes, "inert in the browser once pressed"
    assert (
        ".chunky-guarded.mod-active{pointer-events:none" in GUARD_CSS
        and playground.guard_css in playground.view.children
    )
    playground.generate_button.click()
    playground.generate_button.click()  # pressed again before the first run ends: ignored
    playground._on_generate(playground.generate_button)  # even a click the browser let through
    assert playground.wait(120) and playground.last_error is None, playground.last_error
    assert playground.runs == 1 and "Run 1:" in playground.status.value
    playground.generate_button.click()
    assert playground.wait(120) and playground.runs == 2


def test_your_own_prompts_from_the_box_and_from_the_parameters(tiny: LoadedModel, tmp_path: Path) -> None:
    from chunky_utils.notebook.own_prompts import typed_prompts, with_typed_prompts

    playground = SteeringPlayground(tiny, tiny_config(tmp_path, metrics=False))
    playground.prompt_source_dropdown.value = BUILTIN_PROMPTS
    assert playground.n_prompts.value == 5 and playground.n_prompts.disabled, "the built-in set has 5"
    playground.prompt_source_dropdown.value = "5"
    assert playground.n_prompts.value == 3 and not playground.n_prompts.disabled, "the subset count comes back"
    playground.prompts_box.value = "Name a bird.\n\n  What is 2 + 2?  \n"
    assert playground.prompt_source_dropdown.value == TYPED_PROMPTS, "typing selects your prompts"
    assert playground.n_prompts.value == 2 and playground.n_prompts.disabled
    payload = playground.generate()
    assert [row["prompt"] for row in payload["results"]] == ["Name a bird.", "What is 2 + 2?"]
    config = playground.last_config
    assert config.inference_n_samples == -1 and config.include_vector_prompts
    assert Path(config.inference_dataset).read_text().count("\n") == 2
    assert "--inference-dataset" in playground.show_cli_command()
    playground.prompts_box.value = ""
    playground.generate_button.click()
    assert playground.wait(60) and "box is empty" in (playground.last_error or "")

    assert typed_prompts(["a", " ", "b "]) == ["a", "b"] and typed_prompts(None) == []
    base = tiny_config(tmp_path)
    assert with_typed_prompts(base, []) is base
    again = with_typed_prompts(base, ["Name a bird.", "What is 2 + 2?"])
    assert again.inference_dataset == config.inference_dataset, "the same prompts reuse one file"
    from_parameters = SteeringPlayground(tiny, again, prompts=["Name a bird.", "What is 2 + 2?"])
    assert from_parameters.prompt_source_dropdown.value == TYPED_PROMPTS
    assert from_parameters.current_config().inference_dataset == again.inference_dataset


def test_token_readings_are_taken_while_generating_and_match_a_second_pass(tiny: LoadedModel, tmp_path: Path) -> None:
    from chunky_utils.activations import output_hidden
    from chunky_utils.chat import format_prompts, tokenize_prompts
    from chunky_utils.models import find_decoder_layers

    playground = SteeringPlayground(tiny, tiny_config(tmp_path, metrics=False, max_tokens=8), prompts=SHORT_PROMPTS)
    payload = playground.generate()
    readings = playground.last_readings
    rows = payload["results"]
    assert set(readings) == {(i, side) for i in range(len(rows)) for side in ("baseline", "steered")}
    vector = playground.known_vector(playground.last_config)
    unit = vector.at(2) / vector.norm(2)
    captured: dict[str, torch.Tensor] = {}
    handle = find_decoder_layers(tiny.model)[2].register_forward_hook(
        lambda _m, _a, out: captured.__setitem__("hidden", output_hidden(out))
    )
    try:
        for (index, side), reading in readings.items():
            assert "".join(reading.pieces) == rows[index][side]
            prompt = tokenize_prompts(tiny.tokenizer, format_prompts(tiny.tokenizer, [rows[index]["prompt"]]))[0]
            with torch.no_grad():  # the unsteered model reads the same tokens afterwards
                tiny.model(input_ids=torch.tensor([prompt + reading.ids]))
            second = (captured["hidden"][0, len(prompt) :, :].float() @ unit).tolist()
            full = [v for v in reading.values if v is not None]
            assert len(second) >= len(full) > 0
            assert full == pytest.approx(second[: len(full)], abs=2e-3), (index, side)
    finally:
        handle.remove()
    page = playground.tokens_view.value
    assert page.count('class="chunky-token"') >= 6 and "data-value=" in page and "layer 2" in page
    assert "towards the target" in page and 'title="projection ' in page


def test_grid_steers_each_row_at_its_own_layer_in_one_batch(tiny: LoadedModel, tmp_path: Path) -> None:
    from chunky_utils.instrument.grid import grid_rows

    playground = SteeringPlayground(tiny, tiny_config(tmp_path, metrics=False, max_tokens=6), prompts=SHORT_PROMPTS)
    playground.grid_layers.value = "1, 3"
    playground.grid_scales.value = "2 8"
    playground.grid_prompts.value = 2
    playground.grid_button.click()
    assert playground.wait(120) and playground.last_error is None, playground.last_error
    grid = playground.last_grid
    assert (grid.layers, grid.scales, len(grid.prompts)) == ([1, 3], [2.0, 8.0], 2)
    assert len(grid.cells) == 2 * (1 + 4) and playground.tabs.selected_index == 2
    page = playground.grid_view.value
    assert page.count('class="chunky-grid-cell"') == 8 and "of norm: " in page
    assert page.count('class="chunky-collapsed"') == sum(c.collapse is not None for c in grid.cells)
    vector = playground.known_vector(playground.current_config())
    row_prompts, row_cells, deltas = grid_rows(vector, 2, [1, 3], [2.0, 8.0])
    assert row_prompts == [0] * 5 + [1] * 5 and row_cells[:3] == [(None, 0.0), (1, 2.0), (1, 8.0)]
    torch.testing.assert_close(deltas[1][2], vector.at(1).float() * 8.0)
    assert float(deltas[3][2].abs().sum()) == 0.0 and float(deltas[1][0].abs().sum()) == 0.0
    playground.grid_scales.value = "two"
    playground.grid_button.click()
    assert playground.wait(30) and "not a number" in (playground.last_error or "")


def test_next_token_preview_and_scale_guidance_follow_the_sliders(tiny: LoadedModel, tmp_path: Path) -> None:
    from chunky_utils.instrument.preview import next_token_preview
    from chunky_utils.instrument.vectors import relative_magnitude

    playground = SteeringPlayground(tiny, tiny_config(tmp_path, metrics=False), prompts=SHORT_PROMPTS)
    assert "press Generate" in playground.guidance.value and playground.preview_view.value == ""
    playground.generate()
    vector = playground.known_vector(playground.current_config())
    share = relative_magnitude(vector, 2, 4.0)
    meta = vector.metadata
    assert share == pytest.approx(4.0 * vector.norm(2) / ((meta["target_norms"][2] + meta["baseline_norms"][2]) / 2))
    assert f"{share:.0%}" in playground.guidance.value and playground.bands.band(share) in playground.guidance.value
    before = playground.last_preview
    assert before is not None and "chunky-kl" in playground.preview_view.value
    playground.scale_slider.value = 0.0
    still = playground.last_preview
    assert still is not before and still.kl == pytest.approx(0.0, abs=1e-6)
    assert still.unsteered == pytest.approx(still.steered, abs=1e-6)
    playground.scale_slider.value = 9.0
    assert playground.last_preview.kl > still.kl and "scale 9" in playground.preview_view.value
    assert sum(playground.last_preview.steered) <= 1.0 + 1e-6
    direct = next_token_preview(tiny, "Hello", 2, vector.at(2) * 9.0, top=3)
    assert 3 <= len(direct.tokens) <= 6 and direct.kl > 0


def test_scale_bands_come_from_measured_results(tmp_path: Path) -> None:
    from chunky_utils.notebook.scale_guidance import DEFAULT_BANDS, run_strength_table, scale_bands, threshold

    assert threshold([0.1, 0.2, 1.0, 2.0], [False, False, True, True]) == pytest.approx((0.2 * 1.0) ** 0.5)
    assert threshold([0.1, 0.2], [False, False]) == float("inf") and threshold([0.1], [True]) == 0.0
    for layer, scale in ((1, 0.5), (1, 1.0), (1, 4.0), (2, 0.5), (2, 2.0), (2, 8.0)):
        payload = fake_payload(layer, scale, metrics=False)
        payload["metadata"] |= {"target_norm": 10.0, "baseline_norm": 10.0, "model_name": "tiny"}
        for row in payload["results"]:
            row["steered"] = "one two" if scale < 1 else "completely other words here"
            row["collapse"] = {"baseline": None, "steered": "loops" if scale >= 4 else None}
        write_results(
            tmp_path / "12_0" / f"layer_{layer}_scale_{scale!r}" / "out_5_2.json",
            payload["metadata"],
            payload["results"],
        )
    table = run_strength_table(tmp_path)
    assert len(table) == 6 and table["relative_magnitude"].max() == pytest.approx(2.0 * 8.0 / 10.0)
    bands = scale_bands(tmp_path)
    assert bands is not None and bands.band(0.05) == "subtle" and bands.band(0.3) == "strong"
    assert bands.band(1.6) == "likely to collapse" and "6 runs" in bands.source
    assert scale_bands(tmp_path, model_name="another model") is None
    assert DEFAULT_BANDS.subtle_below < DEFAULT_BANDS.collapse_from


def test_export_csv_html_and_the_cli_command(tiny: LoadedModel, tmp_path: Path) -> None:
    import pandas as pd

    from chunky_utils.cli import build_parser, config_from_args
    from chunky_utils.notebook.command_line import cli_command

    playground = SteeringPlayground(tiny, tiny_config(tmp_path, metrics=False), prompts=SHORT_PROMPTS)
    assert playground.csv_button.disabled and playground.html_button.disabled
    payload = playground.generate()
    playground.csv_button.click()
    playground.html_button.click()
    assert playground.last_error is None, playground.last_error
    csv_path, html_path = playground.exported
    assert csv_path.suffix == ".csv" and csv_path.with_suffix(".json") == playground.save_path()
    exported = pd.read_csv(csv_path)
    assert exported["steered"].fillna("").tolist() == [row["steered"] for row in payload["results"]]
    assert {"prompt", "baseline", "baseline_collapse", "steered_collapse"} <= set(exported.columns)
    page = html_path.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<title>12 CoCoNot - 0 Math, layer 2, scale 4" in page
    assert "chunky-side-by-side" in page and "<script" not in page

    playground.scale_slider.value = -1.5
    playground.cli_button.click()
    command = playground.cli_text.value
    assert command.startswith("test_tulu_contrastive_steering --target-subset 12 --baseline-subset 0 --layer 2")
    assert "--scale -1.5" in command and "--model tiny-random:llama" in command and "--max-tokens 6" in command
    assert "--temperature 0.0" in command and "--top-k" not in command, "only settings that differ from defaults"
    assert "navigator.clipboard" in playground.copy_html.value
    parsed = config_from_args(build_parser().parse_args(command.split()[1:]))
    assert parsed.result_settings() == playground.current_config().result_settings()
    odd = RunConfig("12", "0", 3, metrics=False, reuse_baselines=False, include_vector_prompts=True, top_p=0.9)
    again = config_from_args(build_parser().parse_args(cli_command(odd).split()[1:]))
    assert again.result_settings() == odd.result_settings() and not again.reuse_baselines


def test_side_by_side_marks_words_only_where_answers_are_alike_and_pages() -> None:
    from chunky_utils.comparison_html import row_diff_html

    left, right, note = row_diff_html("alpha beta gamma delta", "one two three four five")
    assert "chunky-added" not in right and "differ throughout" in note
    left, right, note = row_diff_html("the cat sat on the mat", "the dog sat on the mat")
    assert "chunky-added" in right and "of words shared" in note
    _, right, note = row_diff_html("a b c d", "x x x x", ("looped", None))
    assert "chunky-added" not in right and "collapsed" in note
    rows = [
        {"prompt_idx": i, "prompt": f"p{i}", "baseline": "line one\nline two", "steered": f"s{i}"} for i in range(23)
    ]
    page = side_by_side_html(rows, {}, page=2, page_size=10)
    assert page.count("<tr class=") == 3 and "rows 21-23 of 23" in visible_text(page)
    assert "23 of 23 answers differ" in visible_text(page) and "line one\nline two" in html.unescape(page)
    one_sided = [{"prompt": "a", "left": "x", "right": "", "only": "left"}, {"prompt": "b", "left": "x", "right": "y"}]
    text = visible_text(side_by_side_html(one_sided, left="left", right="right"))
    assert "1 of 1 answers differ (1 prompts have an answer on one side only)" in text
    assert "no answer for this prompt on this side" in text


def test_viewer_opens_on_configs_that_share_prompts_and_pages(tmp_path: Path) -> None:
    from chunky_utils.widgets.comparison import default_pair

    for layer, prompts in ((1, ("a", "b")), (2, ("c", "d")), (3, tuple(f"q{i}" for i in range(25)))):
        payload = fake_payload(layer, 1.0, metrics=False, prompts=prompts)
        write_results(
            tmp_path / "x" / "12_0" / f"layer_{layer}_scale_1.0" / "results.json",
            payload["metadata"],
            payload["results"],
        )
    payload = fake_payload(4, 1.0, metrics=False, prompts=tuple(f"q{i}" for i in range(25)))
    write_results(
        tmp_path / "x" / "12_0" / "layer_4_scale_1.0" / "results.json", payload["metadata"], payload["results"]
    )
    frame = load_results_frame(tmp_path / "x")
    ids = frame["config_id"].unique().tolist()
    assert default_pair(frame) == (f"{ids[2]}::steered", f"{ids[3]}::steered"), "the two configs sharing 25 prompts"
    viewer = ComparisonViewer(frame)
    assert "25 of 25 answers differ" in visible_text(viewer.table.value)
    assert viewer.table.value.count("<tr class=") == 10 and viewer.pager.n_pages == 3
    viewer.pager.next.click()
    assert "rows 11-20 of 25" in visible_text(viewer.table.value)
    lonely = load_results_frame(tmp_path / "x").query("layer == 1")
    assert default_pair(lonely) == (f"{ids[0]}::baseline", f"{ids[0]}::steered"), "none shared: its own two sides"


def test_cell_browser_shows_real_line_breaks_a_page_at_a_time(tmp_path: Path) -> None:
    from chunky_utils.metric_views import metrics_frame
    from chunky_utils.widgets.cell_browser import MetricCellBrowser

    fluent = {"perplexity": 2.0, "distinct_2": 0.9, "relevance": 1.0, "overall": 0.8, "concept_score": 0.1}
    rows = [
        {
            "prompt_idx": i,
            "prompt": f"prompt {i}",
            "baseline": "first line\n\nsecond line",
            "steered": "steered\nanswer",
            "metrics": {"baseline": fluent, "steered": fluent},
        }
        for i in range(14)
    ]
    metadata = {"target_subset": "12", "baseline_subset": "0", "layer": 3, "scale": 2.0, "inference_dataset": "5"}
    write_results(tmp_path / "12_0" / "layer_3_scale_2.0" / "out_5_14.json", metadata, rows)
    browser = MetricCellBrowser(metrics_frame(tmp_path), page_size=10)
    page = browser.table.value
    assert "\\n" not in page and "first line\n\nsecond line" in page and "white-space:pre-wrap" in page
    assert page.count("<tr><td") == 10 and "rows 1-10 of 14" in visible_text(page) and "ppl 2" in page
    browser.pager.next.click()
    assert browser.table.value.count("<tr><td") == 4


def test_heatmaps_name_their_experiment_say_which_way_is_better_and_explain_empty_cells() -> None:
    import pandas as pd

    from chunky_utils.layer_scale_heatmaps import heatmap_trace, layer_scale_heatmap, metric_heatmaps
    from chunky_utils.notebook.layer_table import per_layer_table

    records = []
    for experiment in ("12_0/out_a.json [m]", "8_5/out_b.json [m]"):
        for layer, scale in ((1, 1.0), (1, 4.0), (2, 1.0), (2, 4.0)):
            empty = layer == 2
            for prompt in range(2):
                record = {"experiment": experiment, "layer": layer, "scale": scale, "prompt_idx": prompt}
                for side in ("baseline", "steered"):
                    record |= {
                        f"{side}.concept_score": (math.nan if empty else 0.1 * scale) if side == "steered" else 0.0,
                        f"{side}.concept_probe": 0.0,
                        f"{side}.perplexity": math.nan if empty and side == "steered" else 3.0 * scale,
                        f"{side}.distinct_2": 0.9,
                        f"{side}.relevance": 0.0,
                        f"{side}.overall": 0.5,
                        f"{side}.n_tokens": 0 if empty and side == "steered" else 10,
                    }
                    record[f"{side}.collapse"] = "empty answer" if empty and side == "steered" else None
                for name in ("concept_score", "concept_probe", "relevance"):
                    record[f"delta.{name}"] = record[f"steered.{name}"] - record[f"baseline.{name}"]
                records.append(record)
    frame = pd.DataFrame.from_records(records)
    figure = metric_heatmaps(frame, experiment="8_5/out_b.json [m]")
    assert figure.layout.title.text.startswith("8_5/out_b.json [m]")
    concept, perplexity = figure.data
    assert concept.colorscale[-1][1] == "rgb(5,48,97)" and concept.zmid == 0.0, "higher concept: blue"
    assert perplexity.colorscale[-1][1] == "rgb(103,0,31)", "higher perplexity: red"
    assert (
        "higher is better" in figure.layout.annotations[0].text
        and "lower is better" in figure.layout.annotations[1].text
    )
    assert (
        concept.text[1][0].startswith("n/a") and "every steered answer in this cell is empty" in concept.hovertext[1][0]
    )
    one = layer_scale_heatmap(frame, "concept_delta", experiment="12_0/out_a.json [m]")
    assert one.layout.title.text.startswith("12_0/out_a.json [m]: concept, steered - baseline (higher is better)")
    table = per_layer_table(frame, "12_0/out_a.json [m]")
    assert table.loc[table["layer"] == 2, "note"].item() == "every steered scale collapsed (✕)"
    assert table.loc[table["layer"] == 1, "best scale"].item() == 4.0
    assert heatmap_trace is not None


def test_sweep_overview_figure_has_one_entry_per_measure_colour_bars_and_a_page_title() -> None:
    import pandas as pd

    rows = []
    for layer in (4, 8):
        for scale in (1.0, 2.0):
            rows.append(
                {
                    "target_subset": "12",
                    "baseline_subset": "0",
                    "inference_dataset": None,
                    "inference_n_samples": None,
                    "layer": layer,
                    "scale": scale,
                    "delta.perplexity": scale * 2,
                    "delta.concept_score": 0.1 * scale,
                    "delta.n_tokens": -1.0,
                    "text_change": 0.5,
                }
            )
    frame = pd.DataFrame(rows)
    figure = sweep_overview.sweep_overview_figure(frame)
    labels = [button.label for menu in figure.layout.updatemenus for button in menu.buttons]
    assert labels == ["concept score change", "perplexity change", "n tokens change", "text change from the baseline"]
    assert len(set(labels)) == len(labels) and figure.layout.updatemenus[0].type == "buttons"
    assert "concept score" in figure.layout.title.text
    concept_axis, perplexity_axis = figure.layout.coloraxis, figure.layout.coloraxis2
    assert concept_axis.showscale and concept_axis.colorscale[-1][1] == "rgb(5,48,97)", "concept up: blue"
    assert perplexity_axis.colorscale[-1][1] == "rgb(103,0,31)", "perplexity up: red"
    assert concept_axis.cmin == -concept_axis.cmax and "higher is better" in concept_axis.colorbar.title.text
    assert "lower is better" in perplexity_axis.colorbar.title.text
    assert "12 CoCoNot vs 0 Math on built-in prompts" in figure.layout.annotations[0].text
    page = sweep_overview.sweep_overview_html(frame, "Sweep layer-scale")
    assert "<title>Sweep layer-scale</title>" in page and not re.search(r"<script[^>]+src=", page)
