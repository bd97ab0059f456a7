"""chunky-sweep: grid parsing, papermill runs of the point notebook on the tiny model, resuming, workers, summary."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from chunky_utils.config import RunConfig
from chunky_utils.errors import UsageError
from chunky_utils.results import write_results
from chunky_utils.sweep import (
    NOTEBOOK_PARAMETERS,
    SweepOptions,
    gpu_for_slot,
    load_sweep,
    main,
    run_sweep,
    summarize,
    visible_gpus,
    write_summary,
)
from tests.conftest import REPO_ROOT

POINT_NOTEBOOK = REPO_ROOT / "notebooks" / "04_sweep_point.ipynb"
# Tiny and fast: 6 prompts per subset, 2 inference prompts, 3 greedy tokens, no metric pass.
SETTINGS: dict[str, Any] = {
    "model": "tiny-random:llama",
    "data_source": "bundled",
    "n_samples": 6,
    "max_tokens": 3,
    "temperature": 0.0,
    **({"metrics": False} if "metrics" in RunConfig.field_names() else {}),
}
QUIET = SweepOptions(progress=False)


@pytest.fixture(autouse=True)
def one_thread_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernels inherit this: one torch thread each keeps two workers on two cores from thrashing."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def sweep(tmp_path: Path, name: str, **grid: Any) -> dict[str, Any]:
    """A sweep mapping on the tiny model: pair 12:0, inference subset 0 x 2, the cache under tmp_path."""
    return {
        "name": name,
        "output_root": str(tmp_path / "sweeps"),
        "cache_dir": str(tmp_path / "cache"),
        "pairs": ["12:0"],
        "layers": [1],
        "scales": [1.0],
        "inference_datasets": ["0"],
        "inference_n_samples": [2],
        **SETTINGS,
        **grid,
    }


def config_file(tmp_path: Path, mapping: dict[str, Any]) -> Path:
    """The sweep as a --config YAML file."""
    import yaml

    path = tmp_path / f"{mapping['name']}.yaml"
    path.write_text(yaml.safe_dump(mapping))
    return path


def result_files(folder: Path) -> dict[str, float]:
    """Finished result JSONs under a sweep folder -> modification time."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("out_*.json")}


def notebook_text(path: Path) -> str:
    notebook = json.loads(path.read_text())
    return "".join("".join(output.get("text", "")) for cell in notebook["cells"] for output in cell.get("outputs", []))


def read_status(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "status.json").read_text())["points"]


# ---------------------------------------------------------------- no kernel needed


def test_spec_from_flags_and_yaml_forms(tmp_path: Path) -> None:
    spec, options = load_sweep(
        {
            "pairs": ["12:0", [8, 5], {"target": "12", "baseline": 0}],
            "layers": [10, "16", 10],
            "scales": [0.5, 1, 2.0],
            "inference_datasets": ["none", 0],
            "inference_n_samples": [5],
            "temperature": 0,
            "workers": 3,
        }
    )
    assert spec.pairs == (("12", "0"), ("8", "5"))
    assert spec.layers == (10, 16) and spec.scales == (0.5, 1.0, 2.0)
    assert spec.inference_datasets == (None, "0")
    assert spec.settings == {"temperature": 0.0} and isinstance(spec.settings["temperature"], float)
    assert options.workers == 3 and options.executor == "local"
    assert spec.sweep_name.startswith("sweep-")
    same = {"pairs": ["12:0", "8:5"], "layers": [10, 16], "scales": [0.5, 1, 2], "temperature": 0.0}
    same |= {"inference_datasets": [None, "0"], "inference_n_samples": 5}
    assert load_sweep(same)[0].sweep_name == spec.sweep_name, "the default name follows the parameters"
    assert load_sweep({**same, "layers": [10]})[0].sweep_name != spec.sweep_name


def test_points_differing_only_in_scale_form_one_group(tmp_path: Path) -> None:
    spec, _ = load_sweep(sweep(tmp_path, "names", layers=[1, 2], scales=[0.5, 2]))
    groups = spec.groups()
    assert [group.id for group in groups] == ["12_0/layer_1_out_0_2", "12_0/layer_2_out_0_2"]
    assert [config.scale for config in groups[0].configs] == [0.5, 2.0]
    assert groups[0].point_id(groups[0].configs[1]) == "12_0/layer_1_scale_2.0/out_0_2"
    assert groups[1].notebook_path == spec.folder / "12_0" / "layer_2_out_0_2.ipynb"
    assert spec.folder == (tmp_path / "sweeps" / "names").resolve()
    parameters = groups[0].parameters([2.0])
    assert set(parameters) == {*NOTEBOOK_PARAMETERS, "scales"} and parameters["scales"] == [2.0]
    assert parameters["output_dir"] == str(spec.folder) and parameters["layer"] == 1


def test_notebook_declares_exactly_what_the_driver_injects() -> None:
    import nbformat
    import papermill

    declared = set(papermill.inspect_notebook(str(POINT_NOTEBOOK)))
    assert declared == {*NOTEBOOK_PARAMETERS, "scales"}
    notebook = nbformat.read(POINT_NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code[0].metadata.get("tags") == ["parameters"]
    assert "run_experiment(config, scales=" in "".join(cell.source for cell in code)
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "commit it without outputs"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--pairs", "12", "--layers", "1", "--scales", "1"], "TARGET:BASELINE"),
        (["--pairs", "12:99", "--layers", "1", "--scales", "1"], "unknown subset key '99'"),
        (["--pairs", "12:0", "--layers", "-1", "--scales", "1"], "--layers must be non-negative"),
        (["--pairs", "12:0", "--layers", "1"], "a sweep needs --scales"),
        (["--pairs", "12:0", "--layers", "1", "--scales", "1", "--workers", "0"], "--workers must be at least 1"),
        (["--pairs", "12:0", "--layers", "1", "--scales", "1", "--name", "../x"], "--name must be"),
        (["--pairs", "12:0", "--layers", "1", "--scales", "1", "--n-samples", "0"], "--n-samples must be"),
        (["--config", "missing.yaml"], "cannot read --config"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(extra: list[str], message: str, capsys, tmp_path: Path) -> None:
    assert main(["--output-root", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_unknown_yaml_key_and_bad_yaml_exit_2(tmp_path: Path, capsys) -> None:
    config = tmp_path / "sweep.yaml"
    config.write_text("pairs: ['12:0']\nlayers: [1]\nscales: [1]\nlayr: 3\n")
    assert main(["--config", str(config)]) == 2
    assert "unknown sweep key(s) layr" in capsys.readouterr().err
    config.write_text("pairs: [12:0\n")
    assert main(["--config", str(config)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_yaml_config_with_flag_override_dry_run(tmp_path: Path, capsys) -> None:
    config = tmp_path / "sweep.yaml"
    config.write_text(
        "name: from-yaml\npairs: ['12:0', [8, 5]]\nlayers: [1, 2]\nscales: [0.5, 1]\n"
        "inference_datasets: [0]\ninference_n_samples: [2]\nmodel: tiny-random:llama\ndata_source: bundled\n"
    )
    assert main(["--config", str(config), "--scales", "2", "--output-root", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "sweep from-yaml" in out and "4 points in 4 notebook run(s)" in out
    assert "8_5/layer_2_out_0_2: scales 2 (to run)" in out
    assert not [p for p in (tmp_path / "from-yaml").rglob("*") if p.is_file()], "a dry run writes no file"


def test_import_needs_no_papermill_plotly_submitit_or_yaml() -> None:
    code = (
        "import sys, chunky_utils.sweep; "
        "print([m for m in ('papermill', 'plotly', 'submitit', 'yaml') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_gpus_are_handed_out_one_per_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_gpus() == ("0", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert visible_gpus() == ("3", "5")
    assert [gpu_for_slot(slot, ("3", "5")) for slot in range(3)] == ["3", "5", "3"]
    assert gpu_for_slot(0, ()) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert visible_gpus() == ()


def test_summary_flattens_metadata_texts_and_metrics(tmp_path: Path) -> None:
    for layer, scale in [(1, 1.0), (1, 2.0), (2, 1.0)]:
        metadata = {"target_subset": "12", "baseline_subset": "0", "layer": layer, "scale": scale}
        metadata |= {"inference_dataset": "0", "inference_n_samples": 1, "timings": {"generate_s": 0.5}}
        row = {"prompt_idx": 0, "prompt": "Hi", "baseline": "a b c", "steered": "a b d"}
        row["metrics"] = {"baseline": {"concept_score": 0.25}, "steered": {"concept_score": 0.75 * scale}}
        write_results(tmp_path / "12_0" / f"layer_{layer}_scale_{scale}" / "out_0_1.json", metadata, [row])
    frame = summarize(tmp_path)
    assert len(frame) == 3
    assert {"point_id", "layer", "scale", "timings.generate_s", "prompt", "baseline", "steered"} <= set(frame)
    assert {"baseline.concept_score", "steered.concept_score", "delta.concept_score", "text_change"} <= set(frame)
    first = frame.set_index("point_id").loc["12_0/layer_1_scale_2.0/out_0_1"]
    assert first["delta.concept_score"] == pytest.approx(1.25) and 0 < first["text_change"] < 1
    summary, figure = write_summary(tmp_path)
    assert summary == tmp_path / "summary.csv" and figure == tmp_path / "overview.html"
    html = figure.read_text()
    assert "delta.concept_score" in html and "text_change" in html
    assert '<script src="https://cdn' not in html and "plotly.js v" in html, "plotly.js inline, works offline"


# ---------------------------------------------------------------- papermill on the tiny model


def test_grid_runs_on_two_workers_then_rerun_skips_every_point(tmp_path: Path) -> None:
    """2 layers x 2 scales: two notebook runs at once, one per worker and GPU, sharing the cache."""
    spec, _ = load_sweep(sweep(tmp_path, "grid", layers=[1, 2], scales=[1.0, 2.0]))
    report = run_sweep(spec, SweepOptions(workers=2, progress=False, gpus=("7", "8")))
    folder = spec.folder
    assert not report.failed and len(report.ran) == 4 and not report.skipped
    files = result_files(folder)
    assert sorted(files) == [
        f"12_0/layer_{layer}_scale_{scale}/out_0_2.json" for layer in (1, 2) for scale in (1.0, 2.0)
    ]
    metas = [json.loads((folder / path).read_text())["metadata"] for path in files]
    assert all(meta["scales_generated_together"] == 3 for meta in metas), "baseline + 2 scales, one batch"
    assert sorted(p.name for p in (folder / "12_0").glob("*.ipynb")) == [
        "layer_1_out_0_2.ipynb",
        "layer_2_out_0_2.ipynb",
    ]
    assert not list(folder.rglob(".*.running.ipynb"))

    status = list(read_status(folder).values())
    assert {entry["state"] for entry in status} == {"done"}
    assert {entry["worker"]["gpu"] for entry in status} == {"7", "8"}, "one GPU per worker"
    pids = {entry["worker"]["pid"] for entry in status}
    assert len(pids) == 2 and os.getpid() not in pids
    assert max(e["started_at"] for e in status) < min(e["finished_at"] for e in status), "the two ran at once"
    outputs = [notebook_text(path) for path in folder.rglob("*.ipynb")]
    assert sorted(text.split("CUDA_VISIBLE_DEVICES=")[1][0] for text in outputs) == ["7", "8"]
    assert sum(text.count("cache miss for subset 12") for text in outputs) == 1, "each subset computed once"
    assert sum(text.count("cache miss for subset 0 ") for text in outputs) == 1
    for side in ("target", "baseline"):
        assert sorted({meta["layer"]: meta["cache_hits"][side] for meta in metas}.values()) == [False, True]
    assert not [p for p in (tmp_path / "cache").rglob("*.tmp")], "no half-written cache file left"

    summary = summarize(folder)
    assert len(summary) == 4 * 2 and set(summary["layer"]) == {1, 2} and set(summary["scale"]) == {1.0, 2.0}
    assert (folder / "summary.csv").is_file() and (folder / "overview.html").is_file()
    notebooks = {p: p.stat().st_mtime_ns for p in folder.rglob("*.ipynb")}

    again = run_sweep(spec, QUIET)
    assert not again.ran and sorted(again.skipped) == sorted(report.ran)
    assert result_files(folder) == files and {p: p.stat().st_mtime_ns for p in notebooks} == notebooks
    status = list(read_status(folder).values())
    assert {entry["state"] for entry in status} == {"skipped"}
    assert all(entry["worker"]["pid"] and entry["seconds"] > 0 for entry in status), "the first run's record kept"


def test_killed_sweep_reruns_only_the_missing_points(tmp_path: Path) -> None:
    mapping = sweep(tmp_path, "killed", layers=[1, 2])
    folder = tmp_path / "sweeps" / "killed"
    command = [sys.executable, "-m", "chunky_utils.sweep", "--config", str(config_file(tmp_path, mapping)), "-q"]
    process = subprocess.Popen(command, cwd=tmp_path, start_new_session=True, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while not result_files(folder) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, "the sweep ended before it could be killed"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    time.sleep(2)  # an orphaned kernel notices its parent is gone within a second
    finished = result_files(folder)
    assert 1 <= len(finished) < 2, finished

    spec, _ = load_sweep(mapping)
    report = run_sweep(spec, QUIET)
    assert sorted(f"{point}.json" for point in report.skipped) == sorted(finished)
    assert sorted(f"{point}.json" for point in report.ran) == sorted(set(result_files(folder)) - set(finished))
    assert len(result_files(folder)) == 2 and not report.failed
    assert all(result_files(folder)[path] == mtime for path, mtime in finished.items()), "finished points untouched"
    assert not list(folder.rglob(".*.running.ipynb"))


def test_sweep_on_builtin_prompts_finishes_with_summary_and_one_baseline_pass(tmp_path: Path, capsys) -> None:
    """No --inference-datasets: the 5 built-in prompts. Two layers, two scales, sampled (temperature 0.7)."""
    mapping = sweep(tmp_path, "builtin", layers=[1, 2], scales=[0.5, 2.0], inference_datasets=[None], temperature=0.7)
    assert main(["--config", str(config_file(tmp_path, mapping)), "-q"]) == 0, capsys.readouterr().err
    folder = tmp_path / "sweeps" / "builtin"
    assert (folder / "summary.csv").is_file() and (folder / "overview.html").is_file()
    assert "built-in prompts" in (folder / "overview.html").read_text()
    payloads = [json.loads(path.read_text()) for path in sorted(folder.rglob("results.json"))]
    assert len(payloads) == 4
    reuse = sorted(payload["metadata"]["baseline_cache"]["reused"] for payload in payloads)
    assert reuse == [0, 0, 5, 5], "the second layer's group reuses the first group's baselines"
    baselines = {json.dumps([row["baseline"] for row in payload["results"]]) for payload in payloads}
    assert len(baselines) == 1, "every point shows the same sampled baselines"


def test_failing_point_is_recorded_and_the_others_go_on(tmp_path: Path, capsys) -> None:
    mapping = sweep(tmp_path, "failing", layers=[99, 1])
    assert main(["--config", str(config_file(tmp_path, mapping)), "-q"]) == 1
    captured = capsys.readouterr()
    assert "1 run, 0 already finished, 1 failed" in captured.out and "status.json" in captured.err
    folder = tmp_path / "sweeps" / "failing"
    status = read_status(folder)
    failed = status["12_0/layer_99_scale_1.0/out_0_2"]
    assert failed["state"] == "failed" and "layer 99 is out of range" in failed["error"]
    assert (folder / failed["notebook"]).is_file(), "the failing notebook is kept, traceback included"
    assert status["12_0/layer_1_scale_1.0/out_0_2"]["state"] == "done"
    assert list(result_files(folder)) == ["12_0/layer_1_scale_1.0/out_0_2.json"]
    assert (folder / "summary.csv").is_file()


def _same_subset_worker(cache_root: str, barrier: Any, calls: str, results: Any) -> None:
    """One worker process: build the tiny model, wait for the other, then ask for the same subset mean."""
    import chunky_utils.activations as activations
    from chunky_utils.data import load_prompt_set
    from chunky_utils.models import load_model

    original = activations.extract_prompt_sets

    def slow_extraction(*args: Any, **kwargs: Any) -> Any:
        with open(calls, "a", encoding="utf-8") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # widen the window in which the other worker could start the same extraction
        return original(*args, **kwargs)

    activations.extract_prompt_sets = slow_extraction
    loaded = load_model("tiny-random:llama")
    prompt_set = load_prompt_set("12", 6, data_source="bundled")
    barrier.wait(timeout=120)
    means = activations.subset_means(loaded, prompt_set, [1], cache_root, progress=False)
    results.put((os.getpid(), means.cache_hit, means.means[1].mean_vector.tolist()))


def test_two_processes_compute_one_cache_entry_once(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    calls = tmp_path / "extractions.txt"
    workers = [
        context.Process(target=_same_subset_worker, args=(str(tmp_path), barrier, str(calls), results))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    assert len(calls.read_text().split()) == 1, "exactly one process extracted"
    assert sorted(hit for _pid, hit, _vector in outcomes) == [False, True]
    assert outcomes[0][2] == outcomes[1][2], "the waiting process read the other's file, whole"
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    assert sorted(p.name for p in folder.glob("12_6_*")) == [
        "12_6_activations.safetensors",
        *[f"12_6_layer_{layer}.pt" for layer in range(4)],
    ]


def test_submitit_local_executor(tmp_path: Path) -> None:
    mapping = sweep(tmp_path, "submitit", scales=[1.0, 2.0], executor="submitit")
    mapping["submitit"] = {"cluster": "local", "timeout_min": 10}
    spec, options = load_sweep(mapping)
    report = run_sweep(spec, replace(options, progress=False))
    assert sorted(report.ran) == ["12_0/layer_1_scale_1.0/out_0_2", "12_0/layer_1_scale_2.0/out_0_2"]
    assert not report.failed
    status = read_status(spec.folder)
    assert {entry["worker"]["pid"] for entry in status.values()} != {os.getpid()}
    assert list((spec.folder / "submitit").glob("*_log.out")), "submitit kept the job's logs"
    with pytest.raises(UsageError, match="submitit cluster must be one of"):
        load_sweep({**mapping, "submitit": {"cluster": "nowhere"}})
