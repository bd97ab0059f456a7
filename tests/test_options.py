"""Run options declared once: the command lines and the notebooks' parameters cells come from the declarations."""

from __future__ import annotations

import shutil
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from chunky_utils.cli import build_parser, config_from_args
from chunky_utils.config import NON_RESULT_FIELDS, RunConfig
from chunky_utils.options import declared, flag_of, option, parameters_cell, sync_parameters_cell
from tests.conftest import REPO_ROOT

REQUIRED = ["--target-subset", "12", "--baseline-subset", "0", "--layer", "3"]


def test_every_field_is_declared_once_with_help_and_group() -> None:
    assert [f.name for f in declared(RunConfig)] == [f.name for f in fields(RunConfig)]
    assert {f.name for f in declared(RunConfig) if not f.metadata["in_hash"]} == NON_RESULT_FIELDS
    assert "reuse_baselines" in NON_RESULT_FIELDS and "temperature" not in NON_RESULT_FIELDS


def test_the_cli_defaults_are_the_config_defaults() -> None:
    args = build_parser().parse_args(REQUIRED)
    config = config_from_args(args)
    for declaration in declared(RunConfig):
        if declaration.default is not MISSING and declaration.name != "progress":
            assert getattr(config, declaration.name) == declaration.default, declaration.name
    flags = {action.option_strings[0] for action in build_parser()._actions if action.option_strings}
    assert {flag_of(d) for d in declared(RunConfig) if d.metadata["cli"]} <= flags


@pytest.mark.parametrize(
    ("argv", "field", "value"),
    [
        (["--top-k", "5"], "top_k", 5),
        (["--top-p", "0.9"], "top_p", 0.9),
        (["--min-tokens", "8"], "min_tokens", 8),
        (["--no-baseline-cache"], "reuse_baselines", False),
        (["--no-metrics"], "metrics", False),
        (["--steer-positions", "generated"], "steer_positions", "generated"),
    ],
)
def test_new_options_reach_the_config(argv: list[str], field: str, value: object) -> None:
    config = config_from_args(build_parser().parse_args([*REQUIRED, *argv]))
    assert getattr(config, field) == value
    assert config.generation_settings() is not None


def test_bad_choices_and_bad_values_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*REQUIRED, "--read-position", "middle"])
    assert exit_info.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_help_may_not_hide_a_parameter_from_papermill() -> None:
    with pytest.raises(ValueError, match="must not contain"):
        option(0, help="zero = off", group="inference")


def test_parameters_cells_are_generated_from_the_declarations(tmp_path: Path) -> None:
    line = parameters_cell(RunConfig, ["top_p"], {"top_p": 0.9})[0]
    assert line.startswith("top_p: float = 0.9  # ") and line.count("=") == 1
    assert parameters_cell(RunConfig, ["device"], {"device": "cuda"})[0].startswith('device: str = "cuda"  # ')
    for path in sorted((REPO_ROOT / "notebooks").glob("*.ipynb")):
        assert sync_parameters_cell(str(path), RunConfig, check=True), f"{path.name}: run sync_notebook_parameters.py"
    notebook = REPO_ROOT / "notebooks" / "04_sweep_point.ipynb"
    stale = tmp_path / "stale.ipynb"
    shutil.copy(notebook, stale)
    stale.write_text(stale.read_text().replace("new tokens per answer", "tokens"))
    assert not sync_parameters_cell(str(stale), RunConfig, check=True)
    assert not sync_parameters_cell(str(stale), RunConfig)  # rewrites
    assert sync_parameters_cell(str(stale), RunConfig, check=True)


def test_notebooks_are_linted_and_formatted_like_the_package() -> None:
    import subprocess
    import sys

    ruff = Path(sys.executable).parent / "ruff"
    if not ruff.exists():
        pytest.skip("ruff is not installed beside this Python")
    for command in (["check"], ["format", "--check"]):
        result = subprocess.run([str(ruff), *command, str(REPO_ROOT / "notebooks")], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-2000:]
