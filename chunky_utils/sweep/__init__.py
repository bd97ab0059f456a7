"""Sweeps: run `notebooks/04_sweep_point.ipynb` through papermill over pairs x layers x scales.

Points that differ only in scale form a group: one notebook run, one model load, one cached vector and one
`generate` call (`run_experiment(config, scales=[...])`). Finished points are skipped, failures are recorded in
`status.json` while the rest go on, and every result is gathered into `summary.csv` plus a layer x scale figure.

Modules: `spec` (the grid and its groups), `load` (a YAML/flags mapping into a spec), `executors` (local
worker processes with one GPU each, submitit), `status` (status.json), `driver` (`run_sweep`), `report`
(summary.csv, overview.html) and `cli` (`chunky-sweep`). papermill, plotly, submitit, pandas and yaml are
imported only where they are used.
"""

from chunky_utils.sweep.cli import build_parser, describe_plan, main, mapping_from_args
from chunky_utils.sweep.driver import POINT_NOTEBOOK, SPEC_FILE, SweepReport, find_notebook, run_sweep
from chunky_utils.sweep.executors import (
    EXECUTORS,
    SUBMITIT_CLUSTERS,
    GroupJob,
    GroupResult,
    execute_group,
    gpu_for_slot,
    run_local,
    run_submitit,
    visible_gpus,
)
from chunky_utils.sweep.load import GRID_KEYS, OPTION_KEYS, coerce_setting, load_sweep, parse_pair, read_sweep_file
from chunky_utils.sweep.report import (
    FIGURE_FILE,
    SUMMARY_FILE,
    overview_figure,
    read_summary,
    summarize,
    summary_rows,
    write_summary,
)
from chunky_utils.sweep.spec import (
    DEFAULT_ROOT,
    NOTEBOOK_PARAMETERS,
    SETTING_FIELDS,
    PointGroup,
    SweepOptions,
    SweepSpec,
    plan_sweep,
)
from chunky_utils.sweep.status import STATUS_FILE, SweepStatus

__all__ = [
    "DEFAULT_ROOT",
    "EXECUTORS",
    "FIGURE_FILE",
    "GRID_KEYS",
    "NOTEBOOK_PARAMETERS",
    "OPTION_KEYS",
    "POINT_NOTEBOOK",
    "SETTING_FIELDS",
    "SPEC_FILE",
    "STATUS_FILE",
    "SUBMITIT_CLUSTERS",
    "SUMMARY_FILE",
    "GroupJob",
    "GroupResult",
    "PointGroup",
    "SweepOptions",
    "SweepReport",
    "SweepSpec",
    "SweepStatus",
    "build_parser",
    "coerce_setting",
    "describe_plan",
    "execute_group",
    "find_notebook",
    "gpu_for_slot",
    "load_sweep",
    "main",
    "mapping_from_args",
    "overview_figure",
    "parse_pair",
    "plan_sweep",
    "read_summary",
    "read_sweep_file",
    "run_local",
    "run_submitit",
    "run_sweep",
    "summarize",
    "summary_rows",
    "visible_gpus",
    "write_summary",
]
