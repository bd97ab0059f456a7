"""End to end on the embedded SmolLM2-135M-Instruct: the seed's command shape, offline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_CACHE, REPO_ROOT

pytestmark = pytest.mark.slow


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "test_tulu_contrastive_steering.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_seed_command_on_embedded_model(tmp_path: Path) -> None:
    common = [
        "--target-subset",
        "12",
        "--baseline-subset",
        "0",
        "--n-samples",
        "24",
        "--inference-dataset",
        "0",
        "--inference-n-samples",
        "4",
        "--max-tokens",
        "24",
        "--temperature",
        "0",
        "--data-source",
        "bundled",
        "--output-dir",
        str(tmp_path),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    first = run_script(*common, "--layer", "16", "--scale", "8.0")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "cache miss" in first.stderr
    payload = json.loads((tmp_path / "12_0" / "layer_16_scale_8.0" / "out_0_4.json").read_text())
    meta = payload["metadata"]
    assert meta["model_name"] == "embedded:smollm2-135m-instruct" and meta["hidden_size"] == 576
    assert meta["n_layers"] == 30 and meta["contrastive_vector_norm"] > 0
    changed = [r for r in payload["results"] if r["baseline"] != r["steered"]]
    assert len(changed) >= 3, "a large scale must change most answers"
    assert all(r["baseline"].strip() for r in payload["results"])

    second = run_script(*common, "--layer", "20", "--scale", "1.0")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "cache miss" not in second.stderr and "cache hit" in second.stderr
    assert "extract" not in second.stderr.replace("no extraction", "")


def test_embedded_model_loads_from_converted_folder(embedded) -> None:
    assert embedded.n_layers == 30 and embedded.hidden_size == 576
    assert (PROJECT_CACHE / "models" / "smollm2-135m-instruct" / "model.safetensors").is_file()
    assert "<|im_start|>assistant" in embedded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
