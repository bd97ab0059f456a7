"""The results model and the one table every view reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from chunky_utils.errors import UsageError
from chunky_utils.results import ResultFile, results_path, results_table, write_results


def payload(layer: int, scale: float, steered: str = "a b d") -> dict:
    metadata = {"target_subset": "12", "baseline_subset": "0", "layer": layer, "scale": scale, "model_name": "m"}
    metadata |= {"inference_dataset": "0", "inference_n_samples": 1, "timings": {"generate_s": 0.5}}
    row = {"prompt_idx": 0, "prompt": "Hi", "prompt_id": "x", "baseline": "a b c", "steered": steered}
    row["metrics"] = {"baseline": {"perplexity": 2.0}, "steered": {"perplexity": 2.0 + scale}}
    row["collapse"] = {"baseline": None, "steered": "loops" if scale > 4 else None}
    return {"metadata": metadata, "results": [row]}


def test_one_table_with_one_column_naming(tmp_path: Path) -> None:
    for layer, scale in [(1, 1.0), (2, 8.0)]:
        data = payload(layer, scale)
        write_results(results_path(tmp_path, "12", "0", layer, scale, "0", 1), data["metadata"], data["results"])
    frame = results_table(tmp_path).set_index("config_id")
    assert list(frame.index) == ["12_0/layer_1_scale_1.0/out_0_1.json", "12_0/layer_2_scale_8.0/out_0_1.json"]
    row = frame.loc["12_0/layer_2_scale_8.0/out_0_1.json"]
    assert row["timings.generate_s"] == 0.5 and row["layer"] == 2 and row["experiment"] == "12_0/out_0_1.json [m]"
    assert row["delta.perplexity"] == pytest.approx(8.0) and row["delta.words"] == 0
    assert row["steered.collapse"] == "loops" and row["collapsed"] and row["baseline.collapse"] is None
    assert 0 < row["text_change"] < 1
    same = results_table([payload(1, 1.0)])
    assert same.loc[0, "config_id"] == "payload-0" and same.loc[0, "delta.perplexity"] == pytest.approx(1.0)
    assert same.loc[0, "experiment"] == "12_0 on 0 x1 [m]"


def test_bad_files_are_errors_unless_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "12_0" / "layer_1_scale_1.0"
    folder.mkdir(parents=True)
    (folder / "out_0_1.json").write_text('{"metadata": {}, "results": ["not a row"]}')
    with pytest.raises(UsageError, match="not an object"):
        results_table(tmp_path)
    assert results_table(tmp_path, skip_unreadable=True).empty
    with pytest.raises(UsageError, match="not a results file"):
        ResultFile.from_payload({"metadata": {}})
