"""Every notebook executed by papermill (kernel python3, tiny model, small parameters), and checked for what it
wrote and what it displayed; the committed notebooks carry no outputs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from chunky_utils.results import read_results, write_results
from tests.conftest import REPO_ROOT

papermill = pytest.importorskip("papermill")
nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = REPO_ROOT / "notebooks"
OURS = ("01_extract_vectors.ipynb", "02_steering_playground.ipynb", "03_compare_results.ipynb")
PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_VIEW_MIME = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE_MIME = "application/vnd.jupyter.widget-state+json"
TINY = {"model": "tiny-random:llama", "data_source": "bundled", "device": "cpu"}


@pytest.fixture(scope="module", autouse=True)
def python3_kernel() -> None:
    from jupyter_client.kernelspec import find_kernel_specs

    if "python3" not in find_kernel_specs():
        pytest.fail(
            "no 'python3' Jupyter kernel: run .venv/bin/python -m ipykernel install --sys-prefix --name python3"
        )


def execute(name: str, tmp_path: Path, parameters: dict[str, Any]) -> Any:
    """Run one notebook with papermill in tmp_path; return the executed notebook."""
    output = tmp_path / f"executed_{name}"
    papermill.execute_notebook(
        str(NOTEBOOKS / name),
        str(output),
        parameters=parameters,
        kernel_name="python3",
        cwd=str(tmp_path),
        progress_bar=False,
        execution_timeout=300,
    )
    return nbformat.read(output, as_version=4)


def outputs(notebook: Any) -> list[dict[str, Any]]:
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]


def figures(notebook: Any) -> list[dict[str, Any]]:
    """The plotly figures the notebook displayed, as figure dicts."""
    return [o["data"][PLOTLY_MIME] for o in outputs(notebook) if PLOTLY_MIME in o.get("data", {})]


def printed(notebook: Any) -> str:
    return "".join(o.get("text", "") for o in outputs(notebook) if o.get("output_type") == "stream")


def widget_state_text(notebook: Any) -> str:
    """Every widget model's state, as one string (papermill stores it in the notebook's metadata)."""
    return json.dumps(notebook.metadata.get("widgets", {}).get(WIDGET_STATE_MIME, {}))


def assert_offline_plotly(notebook: Any) -> None:
    """Each figure carries an HTML fallback, plotly.js is embedded inline once, and nothing loads from a CDN."""
    figure_outputs = [o for o in outputs(notebook) if PLOTLY_MIME in o.get("data", {})]
    assert figure_outputs and all("text/html" in o["data"] for o in figure_outputs)
    html_parts = [o["data"]["text/html"] for o in outputs(notebook) if "text/html" in o.get("data", {})]
    assert any(len(part) > 1_000_000 and "Plotly" in part for part in html_parts), "plotly.js embedded inline"
    assert not any(re.search(r"<script[^>]+src=", part) for part in html_parts), "no script loaded from elsewhere"


def test_no_notebook_in_git_holds_outputs(tmp_path: Path) -> None:
    """Every tracked notebook is committed clean, and the git filter `make install` sets strips an executed one
    back to exactly the committed text."""
    import subprocess
    import sys

    strip = REPO_ROOT / "scripts" / "strip_notebook_outputs.py"
    tracked = subprocess.run(
        ["git", "ls-files", "*.ipynb"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert "notebooks/04_sweep_point.ipynb" in tracked
    for name in tracked:
        committed = subprocess.run(
            ["git", "show", f"HEAD:{name}"], cwd=REPO_ROOT, capture_output=True, text=True, check=False
        ).stdout
        path = tmp_path / Path(name).name
        path.write_text(committed or (REPO_ROOT / name).read_text(encoding="utf-8"), encoding="utf-8")
        check = subprocess.run([sys.executable, str(strip), "--check", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, f"{name} was committed with outputs: {check.stdout}"
    executed = nbformat.read(NOTEBOOKS / "02_steering_playground.ipynb", as_version=4)
    executed.cells[1].outputs = [nbformat.v4.new_output("stream", text="ran\n")]
    executed.cells[1].execution_count = 3
    executed.metadata["widgets"] = {WIDGET_STATE_MIME: {"state": {}}}
    cleaned = subprocess.run(
        [sys.executable, str(strip)], input=nbformat.writes(executed) + "\n", capture_output=True, text=True, check=True
    ).stdout
    assert cleaned == (NOTEBOOKS / "02_steering_playground.ipynb").read_text(encoding="utf-8")
    attributes = (REPO_ROOT / ".gitattributes").read_text(encoding="utf-8")
    assert "*.ipynb filter=chunky-strip" in attributes
    assert "filter.chunky-strip.clean" in (REPO_ROOT / "Makefile").read_text(encoding="utf-8")


def test_committed_notebooks_have_no_outputs_and_documented_parameters() -> None:
    for name in OURS:
        notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(notebook)
        assert notebook.metadata["kernelspec"]["name"] == "python3"
        code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert all(cell.outputs == [] and cell.execution_count is None for cell in code_cells), name
        assert "parameters" in code_cells[0].metadata.get("tags", []), f"{name}: first code cell is not `parameters`"
        parameters = papermill.inspect_notebook(str(NOTEBOOKS / name))
        assert parameters, name
        for parameter in parameters.values():
            assert parameter["inferred_type_name"] != "None", f"{name}: {parameter['name']} has no type"
            assert parameter["help"], f"{name}: {parameter['name']} has no comment"


def test_extract_vectors_notebook_caches_means_and_draws_all_three_views(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    vector_path = tmp_path / "vector.safetensors"
    notebook = execute(
        "01_extract_vectors.ipynb",
        tmp_path,
        {
            **TINY,
            "target_subset": 12,
            "all_subsets": True,
            "n_samples": 2,
            "layer": 2,
            "cache_dir": str(cache),
            "vector_path": str(vector_path),
        },
    )
    (model_cache,) = cache.iterdir()
    assert len(list(model_cache.glob("*_2_layer_*.pt"))) == 19 * 4, "every subset at every layer"
    assert len(list(model_cache.glob("*_2_activations.safetensors"))) == 19
    from chunky_utils.steering import SteeringVector

    assert SteeringVector.load(vector_path).layers == [0, 1, 2, 3]
    assert "4 layers" in printed(notebook) and f"saved to {vector_path}" in printed(notebook)
    norms, heatmap, centred, pca = figures(notebook)
    assert len(norms["data"]) == 21 and norms["data"][-2]["name"] == "vector 12 - 0"
    assert norms["data"][-1]["name"] == "vector norm / mean norm" and norms["data"][0]["x"] == [0, 1, 2, 3]
    assert len(heatmap["data"][0]["z"]) == 19 and len(heatmap["data"][0]["z"][0]) == 19
    assert "layer 2" in heatmap["layout"]["title"]["text"]
    assert (heatmap["data"][0]["zmin"], heatmap["data"][0]["zmax"]) == (-1, 1), "the full cosine range"
    assert "centred" in centred["layout"]["title"]["text"]
    assert len(pca["data"]) == 19 and all(len(trace["x"]) == 2 for trace in pca["data"])
    assert all(len(trace["hovertext"]) == 2 for trace in pca["data"]), "hover shows each prompt"
    examples = [
        o["data"]["text/html"] for o in outputs(notebook) if "chunky-examples" in o.get("data", {}).get("text/html", "")
    ]
    assert len(examples) == 1 and examples[0].count("<li") == 19 * 2, "example prompts of each subset"
    assert_offline_plotly(notebook)


def test_playground_notebook_headless_writes_seed_format_results(tmp_path: Path) -> None:
    results = tmp_path / "results"
    notebook = execute(
        "02_steering_playground.ipynb",
        tmp_path,
        {
            **TINY,
            "target_subset": 12,
            "baseline_subset": 0,
            "layer": 2,
            "scale": 3,
            "n_samples": 4,
            "inference_dataset": 5,
            "inference_n_samples": 2,
            "max_tokens": 6,
            "temperature": 0.0,
            "output_dir": str(results),
        },
    )
    path = results / "12_0" / "layer_2_scale_3.0" / "out_5_2.json"
    payload = read_results(path)
    assert "Showing the batch run: layer 2, scale 3" in widget_state_text(notebook)
    meta = payload["metadata"]
    assert (meta["target_subset"], meta["baseline_subset"], meta["layer"], meta["scale"]) == ("12", "0", 2, 3.0)
    assert meta["effective_magnitude"] == pytest.approx(3.0 * meta["contrastive_vector_norm"])
    assert [row["prompt_idx"] for row in payload["results"]] == [0, 1]
    assert all({"prompt", "baseline", "steered"} <= set(row) for row in payload["results"])
    assert (results / "dataset_cache").is_dir(), "cache placed as the CLI places it"
    assert f"results: {path}" in printed(notebook)
    tables = [
        o["data"]["text/html"]
        for o in outputs(notebook)
        if "chunky-side-by-side" in o.get("data", {}).get("text/html", "")
    ]
    assert len(tables) == 1 and "effective magnitude" in tables[0]
    assert any(WIDGET_VIEW_MIME in o.get("data", {}) for o in outputs(notebook)), "the playground is displayed"
    state = widget_state_text(notebook)
    assert "chunky-side-by-side" in state and "Generate" in state, "the playground shows the batch run"


def test_playground_notebook_takes_your_own_prompts(tmp_path: Path) -> None:
    results = tmp_path / "results"
    mine = ["Name a bird that cannot fly.", "What is 2 + 2?"]
    notebook = execute(
        "02_steering_playground.ipynb",
        tmp_path,
        {
            **TINY,
            "layer": 1,
            "scale": 2,
            "n_samples": 4,
            "max_tokens": 4,
            "temperature": 0.0,
            "output_dir": str(results),
            "prompts": mine,
        },
    )
    (path,) = (results / "12_0" / "layer_1_scale_2.0").glob("out_typed_*_-1.json")
    payload = read_results(path)
    assert [row["prompt"] for row in payload["results"]] == mine
    assert payload["metadata"]["inference_sampling"]["method"] == "all rows, in file order"
    state = widget_state_text(notebook)
    assert "your prompts (typed below)" in state and "Name a bird that cannot fly." in state


FLUENT = {"perplexity": 2.0, "distinct_2": 0.9, "relevance": 1.0, "overall": 0.8}


def test_compare_notebook_loads_every_result_and_plots_length_and_metrics(tmp_path: Path) -> None:
    results = tmp_path / "results"
    for layer in (1, 2):
        for scale in (1.0, 2.0):
            rows = [
                {
                    "prompt_idx": i,
                    "prompt": f"prompt {i}",
                    "baseline": "a b",
                    "steered": " ".join(["w"] * int(layer + scale)),
                    "metrics": {
                        "baseline": {**FLUENT, "concept_score": 0.0},
                        "steered": {**FLUENT, "concept_score": scale / 10, "perplexity": 2.0 * scale * layer},
                    },
                }
                for i in range(3)
            ]
            metadata = {
                "target_subset": "12",
                "baseline_subset": "0",
                "layer": layer,
                "scale": scale,
                "contrastive_vector_norm": 1.5,
                "effective_magnitude": 1.5 * scale,
                "inference_dataset": "5",
                "inference_n_samples": 3,
            }
            write_results(results / "12_0" / f"layer_{layer}_scale_{scale!r}" / "out_5_3.json", metadata, rows)
    (results / "summary.csv").write_text("point_id,prompt_idx\np1,0\np1,1\n")
    notebook = execute("03_compare_results.ipynb", tmp_path, {"results_dir": str(results)})
    assert "sweep summary: 2 rows" in printed(notebook)
    assert "4 configs, 12 rows" in printed(notebook) and "concept_score" in printed(notebook)
    assert "scored experiments: 12_0/out_5_3.json" in printed(notebook)
    summary = next(
        o["data"]["text/html"] for o in outputs(notebook) if "n_prompts" in o.get("data", {}).get("text/html", "")
    )
    assert summary.count("12_0 L") == 4
    drawn = figures(notebook)
    length, heatmaps = drawn[0], drawn[-1]
    concept = next(
        f for f in drawn if f["layout"].get("yaxis", {}).get("title", {}).get("text") == "mean concept_score"
    )
    assert [trace["type"] for trace in heatmaps["data"]][:2] == ["heatmap", "heatmap"]
    concept_map = heatmaps["data"][0]
    assert concept_map["z"] == [[pytest.approx(0.1), pytest.approx(0.2)]] * 2, "concept delta by layer and scale"
    assert "layer 1, scale 1" in widget_state_text(notebook), "the cell dropdown lists the cells"
    assert heatmaps["layout"]["title"]["text"].startswith("12_0/out_5_3.json"), "the experiment is named"
    per_layer = next(
        o["data"]["text/html"]
        for o in outputs(notebook)
        if "collapses from scale" in o.get("data", {}).get("text/html", "")
    )
    assert "NaN" not in per_layer and "note" in per_layer
    assert "Response length (words)" in length["layout"]["title"]["text"]
    steered = [trace for trace in length["data"] if trace["line"]["dash"] == "solid"]
    assert [trace["name"] for trace in steered] == ["12_0 layer 1", "12_0 layer 2"]
    assert steered[0]["x"] == [1.0, 2.0] and steered[0]["y"] == [2.0, 3.0] and steered[1]["y"] == [3.0, 4.0]
    assert concept["layout"]["yaxis"]["title"]["text"] == "mean concept_score"
    assert concept["data"][0]["y"] == pytest.approx([0.1, 0.2])
    assert any(WIDGET_VIEW_MIME in o.get("data", {}) for o in outputs(notebook)), "the viewer is displayed"
    state = widget_state_text(notebook)
    assert "12_0 L1 s1 (5 x3) - steered" in state and "chunky-side-by-side" in state
    assert_offline_plotly(notebook)
