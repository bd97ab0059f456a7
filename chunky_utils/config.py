"""`RunConfig`: everything one steering run depends on, checked before any model loads."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chunky_utils.data import parse_subset
from chunky_utils.errors import UsageError
from chunky_utils.options import (
    BATCH_ROWS,
    CAPTURE_MODES,
    DATA_SOURCES,
    EMBEDDED_MODEL_ID,
    READ_POSITIONS,
    STEER_POSITIONS,
    non_result_fields,
    option,
)

if TYPE_CHECKING:
    from chunky_utils.generation import GenerationSettings

# Decoding settings that, when not at their default, name themselves in a saved result's file name.
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
    """One steering run. The CLI builds it from flags, notebooks from their parameters cell, sweeps from a grid.

    Each field is declared once, with its help, group and flag (chunky_utils.options): the command lines and
    the notebooks' parameters cells are generated from these declarations.
    """

    target_subset: str = option(help="subset to steer toward (key 0..18 or a prompt file)", group="steering")
    baseline_subset: str = option(help="subset to steer away from (key 0..18 or a prompt file)", group="steering")
    layer: int = option(help="decoder layer to read and steer", group="steering")
    scale: float = option(1.0, help="steering multiplier; negative reverses", group="steering")
    n_samples: int = option(100, help="prompts per subset for the vector (-1: all)", group="steering")
    model: str = option(
        EMBEDDED_MODEL_ID,
        help="hub id, local folder, embedded model or tiny-random:<arch>",
        group="model and data",
    )
    inference_dataset: str | None = option(
        None, help="subset for test prompts (None: the 5 built-in prompts)", group="inference"
    )
    inference_n_samples: int = option(10, help="test prompts to draw (-1: all)", group="inference")
    include_vector_prompts: bool = option(
        False, help="let vector prompts be drawn as test prompts too (the seed did)", group="inference"
    )
    max_tokens: int = option(100, help="new tokens per answer", group="inference")
    temperature: float = option(0.7, help="sampling temperature (0: greedy)", group="inference")
    seed: int = option(0, help="seed for prompt draws and sampling", group="inference")
    top_k: int = option(0, help="sample among the k likeliest tokens (0: off)", group="inference")
    top_p: float = option(
        1.0, help="nucleus sampling: the smallest set holding this mass (1.0: off)", group="inference"
    )
    min_tokens: int = option(
        0, help="answers at least this many tokens long (EOS held back until then)", group="inference"
    )
    data_source: str = option(
        "auto",
        help="hub, bundled offline sample, or auto (hub when reachable)",
        group="model and data",
        choices=DATA_SOURCES,
    )
    read_position: str = option(
        "generation_prompt",
        help="read after the assistant header or at the end of the user turn",
        group="model and data",
        choices=READ_POSITIONS,
    )
    steer_positions: str = option(
        "all",
        help="add the vector at every position (the seed) or where tokens are generated",
        group="inference",
        choices=STEER_POSITIONS,
    )
    capture: str = option(
        "all",
        help="extract every layer in one pass, or only up to --layer",
        group="model and data",
        choices=CAPTURE_MODES,
        in_hash=False,
    )
    output_dir: str = option("results", help="results root", group="output", in_hash=False)
    cache_dir: str | None = option(
        None,
        help="activation and baseline cache (default: cache/, or OUTPUT_DIR/dataset_cache)",
        group="output",
        in_hash=False,
    )
    batch_size: int = option(BATCH_ROWS, help="rows per forward/generate batch", group="model and data", in_hash=False)
    device: str = option("auto", help="auto, cpu, cuda or cuda:N", group="model and data", in_hash=False)
    dtype: str = option("auto", help="auto, float32, bfloat16 or float16", group="model and data")
    tensor_parallel_size: int = option(
        1, help="spread the model over this many GPUs (accelerate device_map)", group="model and data", in_hash=False
    )
    trust_remote_code: bool = option(
        False, help="allow model repositories to run their own code", group="model and data"
    )
    overwrite: bool = option(
        False, help="replace an existing result made with other settings", group="output", in_hash=False
    )
    progress: bool = option(True, help="progress bars", group="output", in_hash=False, cli=False)
    metrics: bool = option(
        True,
        help="skip scoring the texts (concept, perplexity, distinct-2, relevance, overall)",
        group="output",
        flag="--no-metrics",
    )
    reuse_baselines: bool = option(
        True,
        help="generate unsteered answers again instead of reusing cached ones (chunky_utils.baselines)",
        group="inference",
        flag="--no-baseline-cache",
        in_hash=False,
    )

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
        from chunky_utils.generation import GenerationSettings

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


NON_RESULT_FIELDS = non_result_fields(RunConfig)
"""Fields that do not change what a run writes: left out of the settings hash."""


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
