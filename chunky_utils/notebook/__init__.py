"""Helpers the notebooks share: the project root, the subsets to compare, cached means and per-prompt
activations, your own prompts, the CLI command for a run, scale guidance and the per-layer table.

Modules: `project` (project root, `config_from_parameters`), `subsets` (prompt draws, means at every layer,
per-prompt activations, tables of them), `own_prompts` (typed prompts into a prompt file), `command_line`
(`cli_command`), `scale_guidance` (`ScaleBands`, `scale_bands`) and `layer_table` (`per_layer_table`).
pandas is imported only inside the functions that return DataFrames.
"""

from chunky_utils.notebook.command_line import CLI_PROGRAM, cli_command
from chunky_utils.notebook.layer_table import per_layer_table
from chunky_utils.notebook.own_prompts import prompts_file, typed_prompts, with_typed_prompts
from chunky_utils.notebook.project import SUBSET_FIELDS, config_from_parameters, project_root, use_project_root
from chunky_utils.notebook.scale_guidance import (
    CHANGED_AT,
    DEFAULT_BANDS,
    MIN_RUNS_FOR_BANDS,
    ScaleBands,
    run_strength_table,
    scale_bands,
    threshold,
)
from chunky_utils.notebook.subsets import (
    all_layer_means,
    example_prompts_html,
    load_prompt_sets,
    means_table,
    prompt_activations,
    subsets_to_compare,
)

__all__ = [
    "CHANGED_AT",
    "CLI_PROGRAM",
    "DEFAULT_BANDS",
    "MIN_RUNS_FOR_BANDS",
    "SUBSET_FIELDS",
    "ScaleBands",
    "all_layer_means",
    "cli_command",
    "config_from_parameters",
    "example_prompts_html",
    "load_prompt_sets",
    "means_table",
    "per_layer_table",
    "project_root",
    "prompt_activations",
    "prompts_file",
    "run_strength_table",
    "scale_bands",
    "subsets_to_compare",
    "threshold",
    "typed_prompts",
    "use_project_root",
    "with_typed_prompts",
]
