"""The seed's CLI end to end on a tiny model: layout, JSON format, cache reuse, one-line errors."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from chunky_utils.cli import main
from tests.conftest import REPO_ROOT

TINY = ["--model", "tiny-random:llama", "--data-source", "bundled", "-q"]
SEED_METADATA_KEYS = {
    "target_subset",
    "target_subset_name",
    "baseline_subset",
    "baseline_subset_name",
    "n_samples",
    "layer",
    "scale",
    "contrastive_vector_norm",
    "effective_magnitude",
    "inference_dataset",
    "inference_n_samples",
}


def run_cli(tmp_path: Path, *extra: str) -> int:
    return main(
        [
            *TINY,
            "--output-dir",
            str(tmp_path),
            "--target-subset",
            "12",
            "--baseline-subset",
            "0",
            "--n-samples",
            "8",
            "--max-tokens",
            "6",
            "--temperature",
            "0",
            *extra,
        ]
    )


def test_results_json_in_seed_layout_and_format(tmp_path: Path) -> None:
    assert (
        run_cli(tmp_path, "--layer", "2", "--scale", "2.0", "--inference-dataset", "0", "--inference-n-samples", "3")
        == 0
    )
    path = tmp_path / "12_0" / "layer_2_scale_2.0" / "out_0_3.json"
    payload = json.loads(path.read_text())
    meta = payload["metadata"]
    assert set(meta) >= SEED_METADATA_KEYS
    assert meta["target_subset_name"] == "ai2-adapt-dev/coconot_converted"
    assert meta["effective_magnitude"] == pytest.approx(2.0 * meta["contrastive_vector_norm"])
    assert {"target_norm", "baseline_norm", "model_name", "seed", "data_source", "timings"} <= set(meta)
    assert meta["data_source"] == "bundled" and meta["inference_sampling"]["excludes_vector_prompts"]
    rows = payload["results"]
    assert [r["prompt_idx"] for r in rows] == [0, 1, 2]
    assert all({"prompt", "baseline", "steered"} <= set(r) for r in rows)
    assert (tmp_path / "dataset_cache").is_dir(), "--output-dir alone puts the cache at OUTPUT_DIR/dataset_cache"


def test_default_prompts_write_results_json(tmp_path: Path) -> None:
    assert run_cli(tmp_path, "--layer", "1") == 0
    payload = json.loads((tmp_path / "12_0" / "layer_1_scale_1.0" / "results.json").read_text())
    assert len(payload["results"]) == 5 and payload["metadata"]["inference_dataset"] is None


def test_new_layer_or_scale_runs_no_extraction(tmp_path: Path, caplog) -> None:
    assert run_cli(tmp_path, "--layer", "1") == 0
    with caplog.at_level(logging.INFO, logger="chunky_utils"):
        assert run_cli(tmp_path, "--layer", "3", "--scale", "-1.0") == 0
    assert "cache miss" not in caplog.text and "cache hit" in caplog.text
    meta = json.loads((tmp_path / "12_0" / "layer_3_scale_-1.0" / "results.json").read_text())["metadata"]
    assert meta["cache_hits"] == {"target": True, "baseline": True}


def test_same_command_twice_gives_same_text(tmp_path: Path) -> None:
    args = ("--layer", "1", "--temperature", "0.9", "--seed", "3")
    for folder in "ab":
        assert (
            main(
                [
                    *TINY,
                    "--output-dir",
                    str(tmp_path / folder),
                    "--target-subset",
                    "5",
                    "--baseline-subset",
                    "8",
                    "--n-samples",
                    "4",
                    "--max-tokens",
                    "8",
                    *args,
                ]
            )
            == 0
        )
    texts = [json.loads(next((tmp_path / d).rglob("results.json")).read_text())["results"] for d in "ab"]
    assert texts[0] == texts[1]


def test_large_scale_changes_text(tmp_path: Path) -> None:
    assert run_cli(tmp_path, "--layer", "1", "--scale", "5000") == 0
    rows = json.loads(next(tmp_path.rglob("results.json")).read_text())["results"]
    assert any(r["baseline"] != r["steered"] for r in rows)


def test_finished_result_is_kept(tmp_path: Path, capsys) -> None:
    assert run_cli(tmp_path, "--layer", "1") == 0
    path = tmp_path / "12_0" / "layer_1_scale_1.0" / "results.json"
    before = path.read_text()
    assert run_cli(tmp_path, "--layer", "1") == 0
    assert "already finished" in capsys.readouterr().out
    assert run_cli(tmp_path, "--layer", "1", "--max-tokens", "3") == 2
    assert "other settings" in capsys.readouterr().err
    assert path.read_text() == before
    assert run_cli(tmp_path, "--layer", "1", "--max-tokens", "3", "--overwrite") == 0
    assert json.loads(path.read_text())["metadata"]["max_tokens"] == 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--layer", "1", "--target-subset", "42"], "unknown subset key '42'"),
        (["--layer", "1", "--target-subset", "/nope/missing.jsonl"], "subset file not found"),
        (["--layer", "9"], "layer 9 is out of range: this model has layers 0..3"),
        (["--layer", "1", "--n-samples", "500"], "asked for 500 prompts but only"),
        (["--layer", "1", "--n-samples", "0"], "--n-samples must be a positive integer or -1"),
        (["--layer", "1", "--max-tokens", "0"], "--max-tokens must be at least 1"),
        (["--layer", "1", "--temperature", "-1"], "--temperature must be a finite number >= 0"),
        (["--layer", "1", "--scale", "nan"], "must be finite"),
        (["--layer", "1", "--inference-dataset", "0", "--inference-n-samples", "10000"], "asked for 10000"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    tmp_path: Path, capsys, extra: list[str], message: str
) -> None:
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exited:
        code = run_cli(out, *extra)
        raise SystemExit(code)
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not list(out.rglob("*.json")) and not list(out.rglob("*.pt"))


def test_empty_prompt_file_is_an_error(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert run_cli(tmp_path / "out", "--layer", "1", "--target-subset", str(empty)) == 2
    assert "no prompts available" in capsys.readouterr().err


def test_user_file_as_target(tmp_path: Path, prompt_file: Path) -> None:
    assert run_cli(tmp_path, "--layer", "1", "--target-subset", str(prompt_file)) == 0
    folder = next(tmp_path.glob("mine-*_0"))
    assert (
        json.loads((folder / "layer_1_scale_1.0" / "results.json").read_text())["metadata"]["data_sources"]["target"]
        == "file"
    )


def test_script_entry_point_runs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "test_tulu_contrastive_steering.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for flag in (
        "--target-subset",
        "--baseline-subset",
        "--layer",
        "--inference-dataset",
        "--inference-n-samples",
        "--scale",
        "--output-dir",
        "--n-samples",
        "--max-tokens",
        "--temperature",
        "--model",
        "--tensor-parallel-size",
        "--data-source",
        "--cache-dir",
    ):
        assert flag in result.stdout
