"""Write notebooks/01..03 from the cells below, without outputs or execution counts (commit-ready).

    .venv/bin/python scripts/write_notebooks.py            # (re)write the three notebooks
    .venv/bin/python scripts/write_notebooks.py --check    # exit 1 if a notebook differs from this script

Notebooks edited by hand in JupyterLab are fine too: clear their outputs before committing
(`jupyter nbconvert --clear-output --inplace notebooks/*.ipynb`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbformat import NotebookNode

from chunky_utils.cache import atomic_write_text

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}

Cell = tuple[str, str]  # (kind, source): kind is "md", "code" or "parameters"


EXTRACT_VECTORS: list[Cell] = [
    (
        "md",
        """# 01 · Extract vectors

The mean residual-stream activation of each subset, at every layer, on the last prompt token: computed once and
kept in the activation cache (the CLI reads the same files), then looked at: a few prompts of each subset, the norm
of each mean and of the contrastive vector per layer (and the vector's norm as a share of the mean norm, which is
what one unit of scale moves), the cosine similarity between subset means at one layer, raw and centred, and a
2-D PCA of single prompts coloured by subset (hover a point for its prompt).

Headless: `papermill notebooks/01_extract_vectors.ipynb /tmp/01.ipynb -p layer 10 -p all_subsets True`
(`papermill --help-notebook notebooks/01_extract_vectors.ipynb` lists the parameters).""",
    ),
    (
        "parameters",
        """# Parameters: papermill injects a cell below this one that overrides them.
model: str = "embedded:smollm2-135m-instruct"  # Hugging Face id, local folder, embedded model or tiny-random:llama
target_subset: str = "12"  # subset to steer toward: Tulu key "0".."18" or a .jsonl/.json/.csv/.parquet file
baseline_subset: str = "0"  # subset to steer away from (same choices)
extra_subsets: list[str] = []  # more subsets for the norms, heatmap and PCA, e.g. ["8", "11"]
all_subsets: bool = False  # compare all 19 Tulu subsets (each extracted once, then read from the cache)
n_samples: int = 100  # prompts per subset (-1 for all)
data_source: str = "auto"  # auto (hub when reachable, else the bundled sample), hub or bundled
cache_dir: str = "cache"  # activation cache shared with the CLI; relative paths start at the project root
layer: int = 16  # layer of the heatmaps and the PCA, 0..n_layers-1
n_examples: int = 3  # example prompts shown per subset
read_position: str = "generation_prompt"  # read after the assistant header, or user_end
seed: int = 0  # seed of the prompt draw
device: str = "auto"  # auto, cpu or cuda
vector_path: str = ""  # also save the contrastive vector (every layer) as safetensors here; empty for no""",
    ),
    (
        "code",
        """from IPython.display import HTML, display

from chunky_utils.models import check_layer, load_model
from chunky_utils.notebook import (
    all_layer_means,
    example_prompts_html,
    load_prompt_sets,
    means_table,
    prompt_activations,
    subsets_to_compare,
    use_project_root,
)
from chunky_utils.plots import cosine_heatmap_figure, layer_norms_figure, pca_figure, setup_offline_plotly
from chunky_utils.steering import contrastive_vector

setup_offline_plotly()
print(f"relative paths start at {use_project_root()}")""",
    ),
    ("md", "## The model and the prompts"),
    (
        "code",
        """loaded = load_model(model, cache_dir=cache_dir, device=device)
check_layer(loaded.model, layer)
subsets = subsets_to_compare(target_subset, baseline_subset, extra_subsets, all_subsets)
prompt_sets = load_prompt_sets(subsets, n_samples, data_source, seed)
print(f"{loaded.name}: {loaded.n_layers} layers, hidden size {loaded.hidden_size}; subsets {', '.join(subsets)}")
display(HTML(example_prompts_html(prompt_sets, n_examples)))""",
    ),
    (
        "md",
        """## Subset means at every layer

Read from the cache when present; otherwise one extraction pass per subset reads every layer and caches it.""",
    ),
    (
        "code",
        """means = all_layer_means(loaded, prompt_sets, cache_dir, read_position)
vector = contrastive_vector(means[str(target_subset)], means[str(baseline_subset)])
if vector_path:
    vector.save(vector_path)
    print(f"contrastive vector saved to {vector_path}")
means_table(means, layer)""",
    ),
    ("md", "## Norms per layer"),
    ("code", "layer_norms_figure(means, vector).show()"),
    (
        "md",
        """## How alike are the subset means?

Raw means point almost the same way (every cosine near 1: they share a large common component), so the second
map subtracts the mean over the subsets shown first; both use the full -1..1 colour range. The centred map needs
three or more subsets (`extra_subsets` or `all_subsets=True`): two centred means are opposite by construction.""",
    ),
    (
        "code",
        """cosine_heatmap_figure(means, layer).show()
if len(means) >= 3:
    cosine_heatmap_figure(means, layer, center=True).show()
else:
    print("centred map skipped: it needs three or more subsets (two centred means are always opposite)")""",
    ),
    ("md", "## Single prompts: 2-D PCA at the chosen layer"),
    (
        "code",
        """activations = {subset: prompt_activations(loaded, prompt_set, layer, cache_dir, read_position)
               for subset, prompt_set in prompt_sets.items()}
pca_figure(activations, layer, {subset: ps.prompts for subset, ps in prompt_sets.items()}).show()""",
    ),
]


STEERING_PLAYGROUND: list[Cell] = [
    (
        "md",
        """# 02 · Steering playground

Pick a layer and a scale with the sliders, a target, a baseline and the prompts with the dropdowns, and press
**Generate**: baseline and steered answers appear side by side, word differences marked where the answers are
alike, collapsed answers badged. Type your own prompts (one per line) or pick a subset. While it runs a progress
bar gives the stage and the time left, and **Stop** ends it within one step.

- Next to the scale: the effective magnitude as a share of the layer's mean residual norm, with its band (subtle,
  strong, likely to collapse; measured, see docs/scale_bands.md). Beside the controls: the next-token preview,
  unsteered vs steered, with their KL divergence, updated as the sliders move.
- **Tokens** tab: every generated token coloured by its residual stream at the steered layer projected on the
  steering direction (read while generating; hover for the value).
- **Grid** tab: a few prompts at several layers x scales in one batched generation, with collapse badges.
- **Save JSON** writes where the CLI would; **Export CSV/HTML** the table; **CLI command** the same run as a
  command line.

Headless, papermill runs the parameters below once and writes the seed-format results JSON:
`papermill notebooks/02_steering_playground.ipynb /tmp/02.ipynb -p layer 10 -p scale 4.0`.""",
    ),
    (
        "parameters",
        """# Parameters: papermill injects a cell below this one that overrides them.
from typing import Optional

model: str = "embedded:smollm2-135m-instruct"  # Hugging Face id, local folder, embedded model or tiny-random:llama
target_subset: str = "12"  # subset to steer toward: Tulu key "0".."18" or a prompt file
baseline_subset: str = "0"  # subset to steer away from (same choices)
layer: int = 16  # decoder layer to read and steer, 0..n_layers-1
scale: float = 2.0  # steering multiplier; negative values steer away from the target
n_samples: int = 100  # prompts per subset for the vector (-1 for all)
inference_dataset: Optional[str] = None  # subset for the test prompts; None for the 5 built-in prompts
inference_n_samples: int = 10  # test prompts drawn from inference_dataset (-1 for all)
max_tokens: int = 100  # new tokens per answer
temperature: float = 0.7  # sampling temperature (0 for greedy)
seed: int = 0  # seed for prompt draws and sampling
data_source: str = "auto"  # auto (hub when reachable, else the bundled sample), hub or bundled
output_dir: str = "results"  # results root; relative paths start at the project root
cache_dir: Optional[str] = None  # activation cache; None for cache/ (or output_dir/dataset_cache), as in the CLI
device: str = "auto"  # auto, cpu or cuda
write_results: bool = True  # run these parameters once and write the seed-format results JSON
overwrite: bool = False  # replace a result made with other settings
prompts: list[str] = []  # your own test prompts, one string each; non-empty replaces inference_dataset""",
    ),
    (
        "code",
        """from IPython.display import display

from chunky_utils.notebook import config_from_parameters, use_project_root, with_typed_prompts
from chunky_utils.pipeline import load_run_model, run_experiment
from chunky_utils.tables import outcome_payload, side_by_side
from chunky_utils.widgets import SteeringPlayground

print(f"relative paths start at {use_project_root()}")""",
    ),
    ("md", "## The run and the model"),
    (
        "code",
        """config = config_from_parameters(globals(), progress=False)  # the parameters above, as a RunConfig
config = with_typed_prompts(config, prompts)  # your prompts, when given, as a prompt file the CLI can read too
loaded = load_run_model(config)
print(f"{loaded.name}: {loaded.n_layers} layers, hidden size {loaded.hidden_size}")""",
    ),
    (
        "md",
        """## Batch run

What papermill runs: the parameters above, once, exactly as the CLI runs them (a finished result with the same
settings is reused).""",
    ),
    (
        "code",
        """if write_results:
    outcome = run_experiment(config, loaded=loaded)
    results_path, payload = outcome_payload(outcome)
    print(f"results: {results_path}")
    display(side_by_side(payload))""",
    ),
    ("md", "## Playground"),
    (
        "code",
        """playground = SteeringPlayground(loaded, config, prompts=prompts)
if write_results:
    playground.show_payload(payload, config)
playground""",
    ),
]


COMPARE_RESULTS: list[Cell] = [
    (
        "md",
        """# 03 · Compare results

Every results JSON under a folder (CLI runs, playground saves, sweeps) in one table with a row per prompt and
config; what changes with layer and scale (response length, and the metrics when the rows carry them); and a
viewer putting any two configs side by side.

Headless: `papermill notebooks/03_compare_results.ipynb /tmp/03.ipynb -p results_dir results/sweeps/mine`.""",
    ),
    (
        "parameters",
        """# Parameters: papermill injects a cell below this one that overrides them.
results_dir: str = "results"  # folder searched recursively for results JSON; relative paths start at the project root
length_unit: str = "words"  # response length in words or chars
left: str = ""  # viewer's left side: a config_id from the summary (its steered answers); empty for the first
right: str = ""  # viewer's right side, the same way; empty for the second config""",
    ),
    (
        "code",
        """from chunky_utils.notebook import use_project_root
from chunky_utils.plots import metric_figures, response_length_figure, setup_offline_plotly
from chunky_utils.tables import load_results_frame, metric_names, summarize_configs
from chunky_utils.metric_views import experiments, metric_heatmaps, metrics_frame
from chunky_utils.notebook import per_layer_table
from chunky_utils.widgets import ComparisonViewer, MetricCellBrowser
from chunky_utils.sweep import read_summary
from IPython.display import display
from pathlib import Path

setup_offline_plotly()
print(f"relative paths start at {use_project_root()}")""",
    ),
    ("md", "## All results, one row per prompt and config"),
    (
        "code",
        """frame = load_results_frame(results_dir)
print(f"{frame['config_id'].nunique()} configs, {len(frame)} rows under {results_dir}")
summarize_configs(frame)""",
    ),
    (
        "code",
        """sweep_csv = Path(results_dir) / "summary.csv"  # present when results_dir is a chunky-sweep folder
sweep_summary = read_summary(sweep_csv) if sweep_csv.is_file() else None
print(f"sweep summary: {len(sweep_summary)} rows" if sweep_summary is not None else "no sweep summary.csv here")
sweep_summary.head() if sweep_summary is not None else None""",
    ),
    ("md", "## What changes with layer and scale"),
    ("code", "response_length_figure(frame, length_unit).show()"),
    (
        "code",
        """metrics = metric_names(frame)
print(f"metrics in the rows: {', '.join(metrics) if metrics else 'none'}")
for figure in metric_figures(frame, metrics):
    figure.show()""",
    ),
    (
        "md",
        """## Layer x scale maps

Where the rows carry metrics: per experiment (named in each title), heatmaps of the concept delta (steered minus
baseline) and of the steered perplexity, blue where better and red where worse, the best scale per layer (★),
the cells where fluency collapsed (✕; "n/a" where nothing could be scored), a table per layer that says why a
layer has no best scale, and a dropdown from any cell to its texts (10 prompts a page).""",
    ),
    (
        "code",
        """scores = metrics_frame(results_dir)
scored = [] if scores.empty else experiments(scores[scores["delta.concept_score"].notna()])
print(f"scored experiments: {', '.join(scored) if scored else 'none (runs made with --no-metrics)'}")
for experiment in scored:
    metric_heatmaps(scores, experiment=experiment).show()
    display(per_layer_table(scores, experiment).fillna("-"))""",
    ),
    ("code", "MetricCellBrowser(scores, scored[0]) if scored else None"),
    (
        "md",
        """## Side by side

Each dropdown picks a config and whether to show its baseline or its steered answers; rows are matched by
prompt, 10 a page. It opens on the two configs that share the most prompts.""",
    ),
    ("code", "ComparisonViewer(frame, left or None, right or None)"),
]


NOTEBOOKS: dict[str, list[Cell]] = {
    "01_extract_vectors.ipynb": EXTRACT_VECTORS,
    "02_steering_playground.ipynb": STEERING_PLAYGROUND,
    "03_compare_results.ipynb": COMPARE_RESULTS,
}


def build_notebook(name: str, cells: list[Cell]) -> NotebookNode:
    """A notebook with stable cell ids, the python3 kernel and no outputs."""
    notebook = nbformat.v4.new_notebook()
    notebook.metadata = {"kernelspec": KERNELSPEC, "language_info": {"name": "python"}}
    stem = name.split("_")[0]
    for index, (kind, source) in enumerate(cells):
        cell_id = f"nb{stem}-{index:02d}"
        if kind == "md":
            cell = nbformat.v4.new_markdown_cell(source, id=cell_id)
        else:
            cell = nbformat.v4.new_code_cell(source, id=cell_id)
            if kind == "parameters":
                cell.metadata["tags"] = ["parameters"]
        notebook.cells.append(cell)
    nbformat.validate(notebook)
    return notebook


def notebook_text(notebook: NotebookNode) -> str:
    return nbformat.writes(notebook) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a notebook differs")
    args = parser.parse_args(argv)
    differing = []
    for name, cells in NOTEBOOKS.items():
        path = NOTEBOOKS_DIR / name
        text = notebook_text(build_notebook(name, cells))
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                differing.append(name)
            continue
        atomic_write_text(path, text)
        print(f"wrote {path}")
    if differing:
        print(f"differ from scripts/write_notebooks.py: {', '.join(differing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
