"""`RunConfig`: everything one steering run depends on, checked before any model loads."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from chunky_utils.activations import READ_POSITIONS
from chunky_utils.data import DATA_SOURCES, parse_subset
from chunky_utils.errors import UsageError
from chunky_utils.generation import GenerationSettings
from chunky_utils.models import EMBEDDED_MODEL_ID
from chunky_utils.steering import STEER_POSITIONS

CAPTURE_MODES: tuple[str, ...] = ("all", "needed")
"""'all' reads every layer in the extraction pass (a later layer sweep runs no model);
'needed' stops the pass at the steering layer (fastest first run)."""

# Fields that do not change what a run writes: left out of the settings hash.
NON_RESULT_FIELDS = frozenset(
    {
        "output_dir",
        "cache_dir",
        "overwrite",
        "batch_size",
        "device",
        "tensor_parallel_size",
        "capture",
        "progress",
        "reuse_baselines",
    }
)
# Decoding settings that, when not at their default, name themselves in a result's file name.
DECODING_FIELDS: tuple[tuple[str, str], ...] = (
    ("temperature", "temp"),
    ("max_tokens", "max"),
    ("min_tokens", "min"),
    ("top_k", "topk"),
    ("top_p", "topp"),
    ("seed", "seed"),
)


@dataclass(frozen=True)
class RunConfig:
    """One steering run. The CLI builds it from flags, notebooks from their parameters cell, sweeps from a grid."""

    target_subset: str
    baseline_subset: str
    layer: int
    scale: float = 1.0
    model: str = EMBEDDED_MODEL_ID
    n_samples: int = 100
    inference_dataset: str | None = None
    inference_n_samples: int = 10
    include_vector_prompts: bool = False
    max_tokens: int = 100
    temperature: float = 0.7
    seed: int = 0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    min_tokens: int = 0  # answers at least this long (EOS suppressed until then)
    data_source: str = "auto"
    read_position: str = "generation_prompt"
    steer_positions: str = "all"
    capture: str = "all"
    output_dir: str = "results"
    cache_dir: str | None = None
    batch_size: int = 32
    device: str = "auto"
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    trust_remote_code: bool = False
    overwrite: bool = False
    progress: bool = True
    metrics: bool = True  # score every generation with the unsteered model (chunky_utils.metrics)
    reuse_baselines: bool = True  # unsteered answers from the baseline cache (chunky_utils.baselines)

    def validated(self) -> RunConfig:
        """Check every field that can be checked without the model; return self or raise UsageError."""
        parse_subset(self.target_subset)
        parse_subset(self.baseline_subset)
        if self.inference_dataset is not None:
            parse_subset(self.inference_dataset)
            _check_count("--inference-n-samples", self.inference_n_samples)
        _check_count("--n-samples", self.n_samples)
        if not isinstance(self.layer, int) or self.layer < 0:
            raise UsageError(f"--layer must be a non-negative integer, got {self.layer}")
        if not math.isfinite(self.scale):
            raise UsageError(f"--scale must be a finite number, got {self.scale}")
        self.generation_settings()
        _check_choice("--data-source", self.data_source, DATA_SOURCES)
        _check_choice("--read-position", self.read_position, READ_POSITIONS)
        _check_choice("--steer-positions", self.steer_positions, STEER_POSITIONS)
        _check_choice("--capture", self.capture, CAPTURE_MODES)
        check_writable(Path(self.output_dir), "--output-dir")
        check_writable(self.cache_path, "--cache-dir")
        return self

    def generation_settings(self) -> GenerationSettings:
        """Decoding settings (validated on construction)."""
        return GenerationSettings(
            max_new_tokens=self.max_tokens,
            min_new_tokens=self.min_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            batch_size=self.batch_size,
            positions=self.steer_positions,
        )

    @property
    def decoding_suffix(self) -> str:
        """'' at the default decoding settings (the seed's file names), else e.g. '_temp0.0_max32'."""
        defaults = {f.name: f.default for f in fields(self)}
        parts = [
            f"_{short}{getattr(self, name)!r}"
            for name, short in DECODING_FIELDS
            if getattr(self, name) != defaults[name]
        ]
        return "".join(parts)

    @property
    def cache_path(self) -> Path:
        """`--cache-dir`, else `{output_dir}/dataset_cache` when the output folder was moved (the seed's layout)."""
        if self.cache_dir:
            return Path(self.cache_dir)
        if Path(self.output_dir) != Path("results"):
            return Path(self.output_dir) / "dataset_cache"
        return Path("cache")

    @property
    def model_cache_path(self) -> Path:
        """Where converted models live: the explicit cache folder, else the project's `cache/`."""
        return Path(self.cache_dir) if self.cache_dir else Path("cache")

    def result_settings(self) -> dict[str, Any]:
        """The fields that determine a result's content."""
        return {k: v for k, v in asdict(self).items() if k not in NON_RESULT_FIELDS}

    @property
    def settings_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.result_settings(), sort_keys=True).encode()).hexdigest()[:16]

    def with_changes(self, **changes: Any) -> RunConfig:
        return replace(self, **changes)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def _check_count(flag: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or (value != -1 and value < 1):
        raise UsageError(f"{flag} must be a positive integer or -1 (all), got {value}")


def _check_choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")


def check_writable(folder: Path, flag: str) -> None:
    """Create `folder` if needed and prove a file can be written there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise UsageError(f"{flag} {folder} is not writable ({exc.strerror or exc})") from None
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{flag} {folder} is not writable")
