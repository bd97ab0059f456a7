"""The grid: a sweep's points, its groups of points differing only in scale, and how to run them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

from chunky_utils.config import NON_RESULT_FIELDS, RunConfig
from chunky_utils.options import GRID_OPTIONS, declared
from chunky_utils.results import existing_status

DEFAULT_ROOT = "results/sweeps"
NOTEBOOK_PARAMETERS: tuple[str, ...] = tuple(
    name for name in RunConfig.field_names() if name not in {"scale", "progress"}
)
"""What the driver injects into the notebook's `parameters` cell, besides `scales`."""
SETTING_FIELDS: tuple[str, ...] = tuple(
    option.name
    for option in declared(RunConfig)
    if option.metadata["cli"] and option.name not in GRID_OPTIONS | {"output_dir"}
)
"""Options every point of a sweep shares: its flags, and the settings keys of a YAML file."""


@dataclass(frozen=True)
class SweepSpec:
    """A grid of points and the RunConfig settings they share; `name` defaults to a hash of both.

    `output_root` is the folder holding sweeps (`--output-dir`); each point's `output_dir` is `folder`.
    """

    pairs: tuple[tuple[str, str], ...]
    layers: tuple[int, ...]
    scales: tuple[float, ...]
    inference_datasets: tuple[str | None, ...] = (None,)
    inference_n_samples: tuple[int, ...] = (10,)
    settings: Mapping[str, Any] = field(default_factory=dict)
    name: str | None = None
    output_root: str = DEFAULT_ROOT

    @property
    def sweep_name(self) -> str:
        if self.name:
            return self.name
        result_settings = {k: v for k, v in sorted(self.settings.items()) if k not in NON_RESULT_FIELDS}
        digest = hashlib.sha256(json.dumps([self.grid(), result_settings], default=str).encode()).hexdigest()
        return f"sweep-{digest[:8]}"

    @property
    def folder(self) -> Path:
        return (Path(self.output_root) / self.sweep_name).resolve()

    def grid(self) -> dict[str, list[Any]]:
        return {
            "pairs": [f"{target}:{baseline}" for target, baseline in self.pairs],
            "layers": list(self.layers),
            "scales": list(self.scales),
            "inference_datasets": list(self.inference_datasets),
            "inference_n_samples": list(self.inference_n_samples),
        }

    def to_mapping(self) -> dict[str, Any]:
        """The spec as a `--config` file would hold it."""
        return {"name": self.sweep_name, "output_dir": self.output_root, **self.grid(), **dict(self.settings)}

    def groups(self) -> list[PointGroup]:
        """Every point as a validated RunConfig, grouped by everything but scale (grid order)."""
        cache_dir = self.settings.get("cache_dir") or "cache"
        shared = {**self.settings, "cache_dir": str(Path(cache_dir).resolve())}
        groups = []
        for (target, baseline), layer, dataset, n_inference in product(
            self.pairs, self.layers, self.inference_datasets, self.inference_n_samples
        ):
            configs = tuple(
                RunConfig(
                    target_subset=target,
                    baseline_subset=baseline,
                    layer=layer,
                    scale=scale,
                    inference_dataset=dataset,
                    inference_n_samples=n_inference,
                    output_dir=str(self.folder),
                    progress=False,
                    **shared,
                ).validated()
                for scale in self.scales
            )
            groups.append(PointGroup(configs, self.folder))
        return groups


@dataclass(frozen=True)
class SweepOptions:
    """How to run a sweep (none of it changes a result)."""

    workers: int = 1
    executor: str = "local"
    submitit: Mapping[str, Any] = field(default_factory=dict)
    notebook: str | None = None
    kernel: str = "python3"
    progress: bool = True
    gpus: tuple[str, ...] | None = None
    """GPU ids handed out to local workers; None detects them (CUDA_VISIBLE_DEVICES, else every device)."""


def result_path(config: RunConfig) -> Path:
    """Where a point's JSON lands, as the CLI writes it (chunky_utils.pipeline, imported on first use)."""
    from chunky_utils.pipeline import result_path_for

    return result_path_for(config)


def running_path(notebook: Path) -> Path:
    """Where papermill writes a notebook while it runs (hidden, renamed to `notebook` when it ends)."""
    return notebook.with_name(f".{notebook.stem}.running.ipynb")


@dataclass(frozen=True)
class PointGroup:
    """Points that differ only in scale: one notebook, one model load, one generate call."""

    configs: tuple[RunConfig, ...]
    folder: Path

    @property
    def base(self) -> RunConfig:
        return self.configs[0]

    def point_id(self, config: RunConfig) -> str:
        """The result path relative to the sweep folder, without `.json`: names follow the parameters."""
        return result_path(config).relative_to(self.folder).with_suffix("").as_posix()

    @property
    def id(self) -> str:
        """`{target}_{baseline}/layer_{layer}_{out_<ds>_<n> | results}`."""
        pair, _layer_scale, stem = self.point_id(self.base).split("/")
        return f"{pair}/layer_{self.base.layer}_{stem}"

    @property
    def notebook_path(self) -> Path:
        return self.folder / f"{self.id}.ipynb"

    @property
    def running_notebook_path(self) -> Path:
        """Where papermill writes while the group runs; renamed to `notebook_path` when it ends."""
        return running_path(self.notebook_path)

    def state_of(self, config: RunConfig) -> str:
        """'absent', 'same' (finished with these settings) or 'different'."""
        return existing_status(result_path(config), config.settings_hash)

    def parameters(self, scales: Sequence[float]) -> dict[str, Any]:
        """The notebook's parameters for the given scales of this group."""
        return {
            **{name: getattr(self.base, name) for name in NOTEBOOK_PARAMETERS},
            "scales": [float(s) for s in scales],
        }


def plan_sweep(spec: SweepSpec) -> tuple[list[PointGroup], dict[str, str]]:
    """The groups and each point's state ('absent', 'same', 'different') before anything runs."""
    groups = spec.groups()
    states = {group.point_id(config): group.state_of(config) for group in groups for config in group.configs}
    return groups, states
