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


def test_zero_vector_at_temperature_07_changes_nothing_on_the_embedded_model(embedded) -> None:
    import torch

    from chunky_utils.data import default_prompt_set
    from chunky_utils.generation import GenerationSettings, generate_with_scales

    prompts = default_prompt_set().prompts[:3]
    settings = GenerationSettings(max_new_tokens=16, temperature=0.7, seed=0)
    out = generate_with_scales(embedded, prompts, 16, torch.zeros(embedded.hidden_size), [0.0, 2.0], settings, False)
    assert out.for_scale(0.0) == out.for_scale(2.0)
    assert all(text for text in out.for_scale(0.0))


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_baselines_agree_across_four_compositions_on_the_embedded_model(embedded, temperature: float) -> None:
    """Alone, paired, five scales, sweep-shaped: at least 95% of baseline texts identical (fp32, CPU)."""
    import torch

    from benchmarks.batch_invariance import agreement, baselines_by_composition
    from chunky_utils.data import load_prompt_set
    from chunky_utils.generation import GenerationSettings

    prompts = [row.prompt for row in load_prompt_set("5", 6, "bundled", seed=3).rows]
    vector = torch.randn(embedded.hidden_size, generator=torch.Generator().manual_seed(0)) * 4.0
    settings = GenerationSettings(max_new_tokens=16, temperature=temperature, seed=0)
    found = baselines_by_composition(embedded, prompts, 16, vector, settings)
    assert agreement(found)["share_equal"] >= 0.95, found
