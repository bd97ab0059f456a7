"""chunky-sweep's flags: shared settings generated from RunConfig's declarations, --output-dir and its old name."""

from __future__ import annotations

from pathlib import Path

import pytest

from chunky_utils.config import RunConfig
from chunky_utils.options import GRID_OPTIONS, declared, flag_of
from chunky_utils.sweep import SETTING_FIELDS, SweepSpec, build_parser, load_sweep, main, mapping_from_args

GRID = ["--pairs", "12:0", "--layers", "1", "--scales", "0.5", "2", "--inference-datasets", "0"]


def spec_of(argv: list[str]) -> SweepSpec:
    """The spec chunky-sweep builds from these flags."""
    return load_sweep(mapping_from_args(build_parser().parse_args(argv)))[0]


def test_every_shared_option_is_a_flag_and_no_grid_option_is() -> None:
    actions = {action.dest: action for action in build_parser()._actions}
    shared = [d for d in declared(RunConfig) if d.metadata["cli"] and d.name not in GRID_OPTIONS | {"output_dir"}]
    assert [d.name for d in shared] == list(SETTING_FIELDS)
    for declaration in shared:
        assert flag_of(declaration) in actions[declaration.name].option_strings
        assert actions[declaration.name].default is None, "an absent flag leaves the value to YAML or RunConfig"
    flags = {flag for action in actions.values() for flag in action.option_strings}
    assert not {"--layer", "--scale", "--target-subset", "--baseline-subset", "--inference-dataset"} & flags
    assert actions["data_source"].choices == ("auto", "hub", "bundled")


def test_new_options_reach_every_point(tmp_path: Path) -> None:
    spec = spec_of(
        [
            *GRID,
            *("--output-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache")),
            *("--top-k", "5", "--top-p", "0.9", "--min-tokens", "2"),
            *("--no-baseline-cache", "--no-metrics", "--tensor-parallel-size", "2"),
        ]
    )
    expected = {"top_k": 5, "top_p": 0.9, "min_tokens": 2, "reuse_baselines": False, "metrics": False}
    assert {key: spec.settings[key] for key in expected} == expected
    groups = spec.groups()
    assert len(groups) == 1 and len(groups[0].configs) == 2
    for config in groups[0].configs:
        assert (config.top_k, config.top_p, config.min_tokens) == (5, 0.9, 2)
        assert config.reuse_baselines is False and config.metrics is False and config.tensor_parallel_size == 2
    parameters = groups[0].parameters([0.5, 2.0])
    assert parameters["top_k"] == 5 and parameters["metrics"] is False and parameters["reuse_baselines"] is False
    assert spec.sweep_name != spec_of(GRID).sweep_name, "a result setting changes the default name"


def test_absent_flags_set_nothing() -> None:
    assert spec_of(GRID).settings == {}


def test_flags_override_the_yaml_settings(tmp_path: Path) -> None:
    config = tmp_path / "sweep.yaml"
    config.write_text("pairs: ['12:0']\nlayers: [1]\nscales: [1]\ntop_k: 3\nmetrics: false\nmin_tokens: 1\n")
    spec = spec_of(["--config", str(config), "--top-k", "7"])
    assert spec.settings == {"top_k": 7, "metrics": False, "min_tokens": 1}


@pytest.mark.parametrize("flag", ["--output-dir", "--output-root"])
def test_output_dir_and_its_deprecated_alias_place_the_sweep(flag: str, tmp_path: Path, capsys) -> None:
    assert main([*GRID, "--name", "placed", flag, str(tmp_path / "root"), "--dry-run"]) == 0
    assert f"-> {(tmp_path / 'root' / 'placed').resolve()}:" in capsys.readouterr().out


def test_output_root_help_says_deprecated() -> None:
    actions = {flag: action for action in build_parser()._actions for flag in action.option_strings}
    assert "deprecated" in actions["--output-root"].help and actions["--output-root"].dest == "output_dir"


@pytest.mark.parametrize("key", ["output_dir", "output_root"])
def test_yaml_output_dir_beside_output_root(key: str, tmp_path: Path) -> None:
    mapping = {"pairs": ["12:0"], "layers": [1], "scales": [1], "name": "y", key: str(tmp_path)}
    spec, _ = load_sweep(mapping)
    assert spec.folder == (tmp_path / "y").resolve()
    assert spec.to_mapping()["output_dir"] == str(tmp_path)


def test_flag_wins_over_the_yaml_output_root_and_yaml_names_must_agree(tmp_path: Path, capsys) -> None:
    config = tmp_path / "sweep.yaml"
    config.write_text(f"name: y\npairs: ['12:0']\nlayers: [1]\nscales: [1]\noutput_root: {tmp_path / 'old'}\n")
    assert (
        spec_of(["--config", str(config), "--output-dir", str(tmp_path / "new")]).folder
        == (tmp_path / "new" / "y").resolve()
    )
    config.write_text(config.read_text() + f"output_dir: {tmp_path / 'other'}\n")
    assert main(["--config", str(config), "--dry-run"]) == 2
    assert "output_dir and output_root (its former name) disagree" in capsys.readouterr().err
