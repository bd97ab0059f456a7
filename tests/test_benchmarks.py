"""The GPU benchmark script still runs end to end (tiny shape on the CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT


def test_gpu_benchmark_smoke_run_writes_every_generation_timing(tmp_path: Path) -> None:
    command = [sys.executable, "benchmarks/run_gpu.py", "--smoke", "--only-generation", "--repeats", "1"]
    done = subprocess.run([*command, "--out", str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "benchmark.json").read_text())
    timings = results["generation_s"]
    expected = {"plain_generate", "plain_generate_grouped_queries", "baseline", "baseline+steered"}
    assert expected <= set(timings) and all(seconds > 0 for seconds in timings.values())
    assert "baseline+steered in one generate (packed prefill) / plain generate" in results["table"]


def test_tokens_kept_counts_leading_agreement() -> None:
    from benchmarks.run_gpu import tokens_kept

    reference = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]]
    assert tokens_kept([[1, 2, 0, 4], [5, 6, 7, 8], [0, 9, 9, 9]], reference) == (2 + 4 + 0) / 3
