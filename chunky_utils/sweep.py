"""Sweeps: run `notebooks/04_sweep_point.ipynb` through papermill over pairs x layers x scales.

Points that differ only in scale form a group: one notebook run, one model load, one cached vector and one
`generate` call (`run_experiment(config, scales=[...])`). Finished points are skipped, failures are recorded in
`status.json` while the rest go on, and every result is gathered into `summary.csv` plus a layer x scale figure.
papermill, plotly, submitit and yaml are imported only where they are used.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from itertools import product
from pathlib import Path
from typing import Any

from chunky_utils.cache import atomic_write_json, atomic_write_text
from chunky_utils.cli import OneLineParser, finite_float, guarded, setup_logging
from chunky_utils.config import CAPTURE_MODES, NON_RESULT_FIELDS, RunConfig
from chunky_utils.data import DATA_SOURCES, TULU_SET_MAP, USER_FILE_SUFFIXES
from chunky_utils.errors import UsageError
from chunky_utils.pipeline import result_path_for
from chunky_utils.results import existing_status, iter_results_files, read_results

log = logging.getLogger(__name__)

DEFAULT_ROOT = "results/sweeps"
POINT_NOTEBOOK = "04_sweep_point.ipynb"
EXECUTORS: tuple[str, ...] = ("local", "submitit")
SUBMITIT_CLUSTERS: tuple[str, ...] = ("auto", "slurm", "local")
GRID_KEYS: tuple[str, ...] = ("pairs", "layers", "scales", "inference_datasets", "inference_n_samples")
OPTION_KEYS: tuple[str, ...] = ("workers", "executor", "submitit", "notebook", "kernel")
POINT_FIELDS = frozenset(
    {"target_subset", "baseline_subset", "layer", "scale", "inference_dataset", "inference_n_samples"}
)
SETTING_FIELDS: tuple[str, ...] = tuple(
    name for name in RunConfig.field_names() if name not in POINT_FIELDS | {"output_dir", "progress"}
)
NOTEBOOK_PARAMETERS: tuple[str, ...] = tuple(
    name for name in RunConfig.field_names() if name not in {"scale", "progress"}
)
"""What the driver injects into the notebook's `parameters` cell, besides `scales`."""
SIDES: tuple[str, ...] = ("baseline", "steered")
NONE_WORDS = frozenset({"none", "null", "builtin", "built-in", ""})
SUMMARY_FILE = "summary.csv"
FIGURE_FILE = "overview.html"
STATUS_FILE = "status.json"
SPEC_FILE = "sweep.yaml"


# ---------------------------------------------------------------- the grid


@dataclass(frozen=True)
class SweepSpec:
    """A grid of points and the RunConfig settings they share; `name` defaults to a hash of both."""

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
        return {"name": self.sweep_name, "output_root": self.output_root, **self.grid(), **dict(self.settings)}

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
        return result_path_for(config).relative_to(self.folder).with_suffix("").as_posix()

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
        return existing_status(result_path_for(config), config.settings_hash)

    def parameters(self, scales: Sequence[float]) -> dict[str, Any]:
        """The notebook's parameters for the given scales of this group."""
        return {
            **{name: getattr(self.base, name) for name in NOTEBOOK_PARAMETERS},
            "scales": [float(s) for s in scales],
        }


# ---------------------------------------------------------------- reading a spec


def _as_list(key: str, value: Any) -> list[Any]:
    values = list(value) if isinstance(value, list | tuple) else [value]
    if not values:
        raise UsageError(f"{key} needs at least one value")
    return values


def _unique(values: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(dict.fromkeys(values))


def _subset_arg(value: Any, what: str) -> str:
    """A Tulu key as text, or a prompt file as an absolute path (so every worker reads the same file)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise UsageError(f"{what} must be a Tulu key or a prompt file, got {value!r}")
    text = str(value).strip()
    if text not in TULU_SET_MAP and Path(text).suffix.lower() in USER_FILE_SUFFIXES:
        return str(Path(text).expanduser().resolve())
    return text


def _integer(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise UsageError(f"{what} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    raise UsageError(f"{what} must be an integer, got {value!r}")


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise UsageError(f"{what} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise UsageError(f"{what} must be finite, got {value!r}")
    return number


def parse_pair(value: Any) -> tuple[str, str]:
    """'12:0', [12, 0] or {target: 12, baseline: 0} -> ('12', '0')."""
    if isinstance(value, Mapping):
        if set(value) != {"target", "baseline"}:
            raise UsageError(f"a pair mapping needs exactly 'target' and 'baseline', got {sorted(value)}")
        parts = [value["target"], value["baseline"]]
    elif isinstance(value, list | tuple):
        parts = list(value)
    else:
        parts = str(value).split(":")
    if len(parts) != 2 or any(str(part).strip() == "" for part in parts):
        raise UsageError(f"a pair is TARGET:BASELINE (e.g. 12:0), got {value!r}")
    return _subset_arg(parts[0], "a pair's target"), _subset_arg(parts[1], "a pair's baseline")


def _inference_dataset(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS):
        return None
    return _subset_arg(value, "--inference-datasets")


_FIELD_TYPES = {f.name: str(f.type) for f in fields(RunConfig)}


def coerce_setting(name: str, value: Any) -> Any:
    """A RunConfig setting in its field's type, so YAML `temperature: 0` and the flag `0.0` hash alike."""
    kind = _FIELD_TYPES[name]
    flag = "--" + name.replace("_", "-")
    if value is None and "None" in kind:
        return None
    if kind.startswith("bool"):
        if not isinstance(value, bool):
            raise UsageError(f"{flag} must be true or false, got {value!r}")
        return value
    if kind.startswith("int"):
        return _integer(value, flag)
    if kind.startswith("float"):
        return _number(value, flag)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise UsageError(f"{flag} must be text, got {value!r}")
    return str(value)


def check_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name):
        raise UsageError(
            f"--name must be letters, digits, '.', '_' or '-' (starting with a letter or digit), got {name!r}"
        )
    return name


def load_sweep(mapping: Mapping[str, Any]) -> tuple[SweepSpec, SweepOptions]:
    """Build a spec and run options from a YAML mapping (flags already merged in); UsageError on bad input."""
    known = {"name", "output_root", *GRID_KEYS, *OPTION_KEYS, *SETTING_FIELDS}
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise UsageError(f"unknown sweep key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
    missing = [key for key in ("pairs", "layers", "scales") if mapping.get(key) in (None, [], ())]
    if missing:
        flags = ", ".join("--" + key for key in missing)
        raise UsageError(f"a sweep needs {flags} (as flags or in a --config file)")
    pairs = _unique(parse_pair(value) for value in _as_list("--pairs", mapping["pairs"]))
    layers = _unique(_integer(value, "--layers") for value in _as_list("--layers", mapping["layers"]))
    if any(layer < 0 for layer in layers):
        raise UsageError(f"--layers must be non-negative, got {list(layers)}")
    scales = _unique(_number(value, "--scales") for value in _as_list("--scales", mapping["scales"]))
    datasets = _unique(
        _inference_dataset(v) for v in _as_list("--inference-datasets", mapping.get("inference_datasets"))
    )
    counts = _unique(
        _integer(value, "--inference-n-samples")
        for value in _as_list("--inference-n-samples", mapping.get("inference_n_samples", 10))
    )
    settings = {key: coerce_setting(key, mapping[key]) for key in SETTING_FIELDS if key in mapping}
    if (
        settings.get("model") and Path(settings["model"]).expanduser().is_dir()
    ):  # a local folder: as every worker sees it
        settings["model"] = str(Path(settings["model"]).expanduser().resolve())
    name = mapping.get("name")
    spec = SweepSpec(
        pairs=pairs,
        layers=layers,
        scales=scales,
        inference_datasets=datasets,
        inference_n_samples=counts,
        settings=settings,
        name=check_name(str(name)) if name is not None else None,
        output_root=str(mapping.get("output_root") or DEFAULT_ROOT),
    )
    workers = _integer(mapping.get("workers", 1), "--workers")
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    executor = str(mapping.get("executor", "local"))
    if executor not in EXECUTORS:
        raise UsageError(f"--executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    submitit_params = mapping.get("submitit") or {}
    if not isinstance(submitit_params, Mapping):
        raise UsageError(f"'submitit' must be a mapping of executor parameters, got {submitit_params!r}")
    cluster = submitit_params.get("cluster", "auto")
    if cluster not in SUBMITIT_CLUSTERS:
        raise UsageError(f"submitit cluster must be one of {', '.join(SUBMITIT_CLUSTERS)}, got {cluster!r}")
    options = SweepOptions(
        workers=workers,
        executor=executor,
        submitit=dict(submitit_params),
        notebook=str(mapping["notebook"]) if mapping.get("notebook") else None,
        kernel=str(mapping.get("kernel") or "python3"),
    )
    return spec, options


def read_sweep_file(path: Path | str) -> dict[str, Any]:
    """A `--config` YAML file as a mapping."""
    import yaml

    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read --config {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"--config {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise UsageError(f"--config {path} must hold a mapping of sweep keys, got {type(loaded).__name__}")
    return {str(key).replace("-", "_"): value for key, value in loaded.items()}


# ---------------------------------------------------------------- one group, in a worker


@dataclass(frozen=True)
class GroupJob:
    """What a worker needs to run one group's notebook (picklable for process pools and submitit)."""

    group_id: str
    notebook: str
    output_notebook: str
    parameters: dict[str, Any]
    kernel: str
    cwd: str
    gpu: str | None = None


@dataclass(frozen=True)
class GroupResult:
    """How one notebook run ended."""

    group_id: str
    error: str | None
    seconds: float
    started_at: float
    finished_at: float
    worker: dict[str, Any]


def one_line(text: str, limit: int = 500) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def describe_error(exc: BaseException) -> str:
    """One line: the notebook's exception when papermill reports one, else the exception itself."""
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    if ename:
        return one_line(f"{ename}: {evalue}")
    return one_line(f"{type(exc).__name__}: {exc}")


def running_path(notebook: Path) -> Path:
    return notebook.with_name(f".{notebook.stem}.running.ipynb")


def execute_group(job: GroupJob) -> GroupResult:
    """Run one group's notebook through papermill; the executed notebook lands at `job.output_notebook`.

    Never raises for a failing notebook: the error comes back in the result. The notebook is written to a
    hidden `.running` file first and renamed at the end, so a finished name is always a finished run.
    """
    if job.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = job.gpu
    started = time.time()
    output = Path(job.output_notebook)
    running = running_path(output)
    error = None
    try:
        import papermill

        output.parent.mkdir(parents=True, exist_ok=True)
        papermill.execute_notebook(
            job.notebook,
            str(running),
            parameters=job.parameters,
            kernel_name=job.kernel,
            progress_bar=False,
            cwd=job.cwd,
        )
    except Exception as exc:  # a failing point is recorded, never fatal to the sweep
        error = describe_error(exc)
    finally:
        if running.exists():
            os.replace(running, output)
    finished = time.time()
    worker = {"pid": os.getpid(), "host": socket.gethostname(), "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}
    return GroupResult(job.group_id, error, round(finished - started, 3), started, finished, worker)


# ---------------------------------------------------------------- executors


def visible_gpus() -> tuple[str, ...]:
    """GPU ids to hand out, one per worker: CUDA_VISIBLE_DEVICES if set, else every device; () on CPU."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return ()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return tuple(item.strip() for item in listed.split(",") if item.strip())[:count]
    return tuple(str(i) for i in range(count))


def gpu_for_slot(slot: int, gpus: Sequence[str]) -> str | None:
    return gpus[slot % len(gpus)] if gpus else None


def _run_windowed(
    jobs: Sequence[GroupJob],
    slots: int,
    gpus: Sequence[str],
    submit: Callable[[GroupJob], Any],
    is_done: Callable[[Any], bool],
    collect: Callable[[Any], GroupResult],
    on_start: Callable[[GroupJob], None],
    poll_s: float = 0.2,
) -> Iterator[GroupResult]:
    """Keep up to `slots` jobs in flight, each slot with its own GPU; yield results as they finish."""
    pending = list(jobs)
    running: dict[int, tuple[Any, GroupJob]] = {}
    free = list(range(slots))
    while pending or running:
        while pending and free:
            slot = free.pop(0)
            job = replace(pending.pop(0), gpu=gpu_for_slot(slot, gpus))
            on_start(job)
            running[slot] = (submit(job), job)
        finished = [slot for slot, (handle, _job) in running.items() if is_done(handle)]
        if not finished:
            time.sleep(poll_s)
            continue
        for slot in finished:
            handle, job = running.pop(slot)
            free.append(slot)
            try:
                yield collect(handle)
            except Exception as exc:  # the worker itself died: record it like a failing notebook
                now = time.time()
                yield GroupResult(job.group_id, describe_error(exc), 0.0, now, now, {"gpu": job.gpu})


def run_local(
    jobs: Sequence[GroupJob], workers: int, gpus: Sequence[str], on_start: Callable[[GroupJob], None]
) -> Iterator[GroupResult]:
    """One group at a time in this process, or a pool of `workers` processes (one GPU each where GPUs exist)."""
    if workers == 1 or len(jobs) == 1:
        for job in jobs:
            job = replace(job, gpu=gpu_for_slot(0, gpus))
            on_start(job)
            yield execute_group(job)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    slots = min(workers, len(jobs))
    if gpus and slots > len(gpus):
        log.warning("%d workers share %d GPU(s)", slots, len(gpus))
    pool = ProcessPoolExecutor(max_workers=slots, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield from _run_windowed(
            jobs,
            slots,
            gpus,
            submit=lambda job: pool.submit(execute_group, job),
            is_done=lambda future: future.done(),
            collect=lambda future: future.result(),
            on_start=on_start,
        )
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_submitit(
    jobs: Sequence[GroupJob],
    workers: int,
    folder: Path,
    params: Mapping[str, Any],
    gpus: Sequence[str],
    on_start: Callable[[GroupJob], None],
) -> Iterator[GroupResult]:
    """Each group as a submitit job (SLURM where `sbatch` exists, else local processes), `workers` at a time."""
    import submitit

    params = dict(params)
    cluster = params.pop("cluster", "auto")
    executor = submitit.AutoExecutor(folder=folder, cluster=None if cluster == "auto" else cluster)
    params.setdefault("timeout_min", 240)
    params.setdefault("name", "chunky-sweep")
    try:
        executor.update_parameters(**params)
    except (NameError, AssertionError, ValueError) as exc:
        raise UsageError(f"bad submitit parameters {params}: {one_line(str(exc))}") from None
    log.info("submitit executor: %s, folder %s", executor.cluster, folder)
    # On a cluster the scheduler gives each job its GPUs; on this machine the slots do, as for local workers.
    slot_gpus = gpus if executor.cluster == "local" else ()
    submitted: list[Any] = []

    def submit(job: GroupJob) -> Any:
        handle = executor.submit(execute_group, job)
        submitted.append(handle)
        return handle

    try:
        yield from _run_windowed(
            jobs,
            min(workers, len(jobs)),
            slot_gpus,
            submit=submit,
            is_done=lambda handle: handle.done(),
            collect=lambda handle: handle.result(),
            on_start=on_start,
            poll_s=0.5,
        )
    finally:
        for handle in submitted:
            if not handle.done():
                handle.cancel(check=False)


# ---------------------------------------------------------------- status


class SweepStatus:
    """`status.json`: one entry per point (state, files, error, timing); written atomically after each group."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.name = name
        self.path = folder / STATUS_FILE
        self.points: dict[str, dict[str, Any]] = {}
        self.previous = self._read_points()

    def _read_points(self) -> dict[str, dict[str, Any]]:
        try:
            return dict(json.loads(self.path.read_text(encoding="utf-8"))["points"])
        except (OSError, ValueError, KeyError, TypeError):
            return {}

    def add(self, group: PointGroup, config: RunConfig, state: str) -> None:
        """Register a point; a skipped one keeps the timing and worker of the run that made it."""
        point = group.point_id(config)
        earlier = self.previous.get(point, {}) if state == "skipped" else {}
        kept = {key: earlier[key] for key in ("seconds", "started_at", "finished_at", "worker") if key in earlier}
        self.points[point] = {
            "state": state,
            "group": group.id,
            "target_subset": config.target_subset,
            "baseline_subset": config.baseline_subset,
            "layer": config.layer,
            "scale": config.scale,
            "inference_dataset": config.inference_dataset,
            "inference_n_samples": config.inference_n_samples,
            "result": result_path_for(config).relative_to(self.folder).as_posix(),
            "notebook": group.notebook_path.relative_to(self.folder).as_posix(),
            "error": None,
            **kept,
        }

    def update(self, point_id: str, **values: Any) -> None:
        self.points[point_id].update(values)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for entry in self.points.values():
            counts[entry["state"]] = counts.get(entry["state"], 0) + 1
        return counts

    def save(self) -> Path:
        return atomic_write_json(
            self.path,
            {
                "name": self.name,
                "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "counts": self.counts(),
                "points": self.points,
            },
        )


@dataclass
class SweepReport:
    """What one call of `run_sweep` did."""

    folder: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    summary: Path | None = None
    figure: Path | None = None

    @property
    def status(self) -> Path:
        return self.folder / STATUS_FILE


# ---------------------------------------------------------------- the driver


def find_notebook(notebook: str | None) -> Path:
    """The point notebook: the one given, else notebooks/04_sweep_point.ipynb of this checkout or the cwd."""
    if notebook:
        candidates = [Path(notebook)]
    else:
        candidates = [
            Path(__file__).resolve().parents[1] / "notebooks" / POINT_NOTEBOOK,
            Path("notebooks") / POINT_NOTEBOOK,
        ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise UsageError(f"sweep notebook not found: {candidates[0]} (pass --notebook)")


def require(module: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise UsageError(f"chunky-sweep needs {module} here: {install}")


def check_kernel(kernel: str) -> None:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(kernel)
    except NoSuchKernel:
        raise UsageError(
            f"Jupyter kernel {kernel!r} not found: register one with "
            f"{sys.executable} -m ipykernel install --sys-prefix --name {kernel}"
        ) from None


def plan_sweep(spec: SweepSpec) -> tuple[list[PointGroup], dict[str, str]]:
    """The groups and each point's state ('absent', 'same', 'different') before anything runs."""
    groups = spec.groups()
    states = {group.point_id(config): group.state_of(config) for group in groups for config in group.configs}
    return groups, states


def run_sweep(spec: SweepSpec, options: SweepOptions | None = None) -> SweepReport:
    """Run every missing point of the grid, record status, and write summary.csv and overview.html."""
    options = options or SweepOptions()
    groups, states = plan_sweep(spec)
    folder = spec.folder
    overwrite = bool(spec.settings.get("overwrite"))
    conflicts = [point for point, state in states.items() if state == "different"]
    if conflicts and not overwrite:
        raise UsageError(
            f"sweep {spec.sweep_name} already holds {len(conflicts)} result(s) made with other settings "
            f"(e.g. {folder / conflicts[0]}.json); use another --name or pass --overwrite"
        )
    status = SweepStatus(folder, spec.sweep_name)
    report = SweepReport(folder)
    pending: list[tuple[PointGroup, list[float]]] = []
    for group in groups:
        if group.running_notebook_path.exists():  # left by a killed run: keep it as that run's record
            os.replace(group.running_notebook_path, group.notebook_path)
        scales = []
        for config in group.configs:
            point = group.point_id(config)
            if states[point] == "same":
                status.add(group, config, "skipped")
                report.skipped.append(point)
            else:
                status.add(group, config, "pending")
                scales.append(config.scale)
        if scales:
            pending.append((group, scales))
    if pending:
        notebook = str(find_notebook(options.notebook))
        require("papermill", "pip install papermill ipykernel")
        if options.executor == "submitit":
            require("submitit", "pip install submitit")
        check_kernel(options.kernel)
    import yaml

    atomic_write_text(folder / SPEC_FILE, yaml.safe_dump(spec.to_mapping(), sort_keys=False))
    status.save()
    log.info(
        "sweep %s: %d points in %d groups, %d finished already, %d to run in %d notebook(s) -> %s",
        spec.sweep_name,
        len(states),
        len(groups),
        len(report.skipped),
        len(states) - len(report.skipped),
        len(pending),
        folder,
    )
    if pending:
        cwd = str(Path.cwd())
        jobs = [
            GroupJob(group.id, notebook, str(group.notebook_path), group.parameters(scales), options.kernel, cwd)
            for group, scales in pending
        ]
        _execute(jobs, {group.id: group for group in groups}, options, status, report, len(states))
    report.summary, report.figure = write_summary(folder)
    return report


def _execute(
    jobs: list[GroupJob],
    groups: Mapping[str, PointGroup],
    options: SweepOptions,
    status: SweepStatus,
    report: SweepReport,
    n_points: int,
) -> None:
    """Run the jobs with the chosen executor, recording each point as its group finishes."""
    from tqdm.auto import tqdm

    gpus = options.gpus if options.gpus is not None else visible_gpus()
    todo_ids = {job.group_id: job for job in jobs}

    def point_ids(group_id: str) -> list[str]:
        scales = todo_ids[group_id].parameters["scales"]
        group = groups[group_id]
        return [group.point_id(config) for config in group.configs if config.scale in scales]

    def on_start(job: GroupJob) -> None:
        for point in point_ids(job.group_id):
            status.update(point, state="running", worker={"gpu": job.gpu})
        status.save()

    if options.executor == "submitit":
        results = run_submitit(jobs, options.workers, status.folder / "submitit", options.submitit, gpus, on_start)
    else:
        results = run_local(jobs, options.workers, gpus, on_start)
    bar = tqdm(
        total=n_points,
        initial=len(report.skipped),
        desc=f"sweep {status.name}",
        unit="point",
        disable=not options.progress,
    )
    try:
        for result in results:
            group = groups[result.group_id]
            for config in group.configs:
                point = group.point_id(config)
                if point not in point_ids(result.group_id):
                    continue
                if group.state_of(config) == "same":
                    state, error = "done", None
                    report.ran.append(point)
                else:
                    state = "failed"
                    error = result.error or f"the notebook finished without writing {point}.json"
                    report.failed[point] = error
                    log.warning("point %s failed: %s", point, error)
                status.update(
                    point,
                    state=state,
                    error=error,
                    seconds=result.seconds,
                    started_at=_iso(result.started_at),
                    finished_at=_iso(result.finished_at),
                    worker=result.worker,
                )
                bar.update(1)
            bar.set_postfix(failed=len(report.failed), refresh=False)
            status.save()
    finally:
        bar.close()
        for entry in status.points.values():
            if entry["state"] == "running":
                entry["state"] = "pending"
        status.save()


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds")


# ---------------------------------------------------------------- aggregation


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys; lists as JSON text (one CSV cell each)."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list | tuple):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


def text_change(baseline: str, steered: str) -> float:
    """0 when the steered text equals the baseline, towards 1 the more it differs (difflib)."""
    return 1.0 - difflib.SequenceMatcher(None, baseline or "", steered or "", autojunk=False).ratio()


def row_columns(result: Mapping[str, Any]) -> dict[str, Any]:
    """One result row's columns: its own keys, then `baseline.<m>`, `steered.<m>` and `delta.<m>` per metric."""
    columns = flatten({key: value for key, value in result.items() if key != "metrics"})
    metrics = result.get("metrics") or {}
    sides = {side: metrics.get(side) or {} for side in SIDES}
    for side, values in sides.items():
        columns.update({f"{side}.{name}": value for name, value in values.items()})
    for name, steered in sides["steered"].items():
        baseline = sides["baseline"].get(name)
        if _is_number(steered) and _is_number(baseline):
            columns[f"delta.{name}"] = steered - baseline
    columns["text_change"] = text_change(str(result.get("baseline", "")), str(result.get("steered", "")))
    return columns


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def summary_rows(folder: Path | str) -> list[dict[str, Any]]:
    """One dict per result file and prompt: point id, flattened metadata, texts, metrics and text change."""
    folder = Path(folder)
    rows = []
    for path in iter_results_files(folder):
        try:
            payload = read_results(path)
        except UsageError as exc:
            log.warning("skipping %s", exc)
            continue
        point = path.relative_to(folder).with_suffix("").as_posix()
        metadata = flatten(payload["metadata"])
        for result in payload["results"]:
            row = {"point_id": point, **metadata}
            for key, value in row_columns(result).items():
                row[f"row.{key}" if key in row else key] = value
            rows.append(row)
    return rows


def summarize(folder: Path | str) -> Any:
    """Every result under a sweep folder as one pandas DataFrame (the rows of summary.csv)."""
    import pandas as pd

    return pd.DataFrame(summary_rows(folder))


def overview_measures(frame: Any) -> list[str]:
    """What the overview can show: every metric's steered-minus-baseline delta, then the text change."""
    return [column for column in frame.columns if column.startswith("delta.")] + ["text_change"]


def _group_label(value: Any) -> str:
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    return "None" if missing else str(value)


def overview_figure(frame: Any) -> Any:
    """Layer x scale heatmaps of mean values over prompts, one per pair and inference set; a menu picks the measure."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    measures = overview_measures(frame)
    keys = ["target_subset", "baseline_subset", "inference_dataset", "inference_n_samples"]
    # built-in prompts have no inference set: name them, since pandas drops missing group keys
    frame = frame.assign(**{key: frame[key].map(_group_label) for key in keys})
    panels = list(frame.groupby(keys, sort=False, dropna=False))
    titles = [
        f"{target} vs {baseline} on {'built-in prompts' if dataset == 'None' else f'{dataset} x {n}'}"
        for (target, baseline, dataset, n), _ in panels
    ]
    figure = make_subplots(rows=len(panels), cols=1, subplot_titles=titles)
    for measure in measures:
        for row, (_key, panel) in enumerate(panels, start=1):
            table = panel.pivot_table(index="layer", columns="scale", values=measure, aggfunc="mean")
            table = table.sort_index().sort_index(axis=1)
            figure.add_trace(
                go.Heatmap(
                    z=table.to_numpy(),
                    x=[f"scale {scale:g}" for scale in table.columns],
                    y=[f"layer {layer}" for layer in table.index],
                    colorscale="RdBu" if measure.startswith("delta.") else "Viridis",
                    zmid=0 if measure.startswith("delta.") else None,
                    showscale=False,
                    texttemplate="%{z:.3g}",
                    hovertemplate=f"%{{y}}, %{{x}}<br>{measure}: %{{z:.4g}}<extra></extra>",
                    visible=measure == measures[0],
                    name=measure,
                ),
                row=row,
                col=1,
            )
    buttons = [
        {
            "label": measure,
            "method": "update",
            "args": [
                {"visible": [m == measure for m in measures for _ in panels]},
                {"title.text": f"Sweep overview: mean {measure} per layer and scale"},
            ],
        }
        for measure in measures
    ]
    figure.update_layout(
        title={"text": f"Sweep overview: mean {measures[0]} per layer and scale"},
        updatemenus=[
            {
                "buttons": buttons,
                "direction": "down",
                "x": 1.0,
                "xanchor": "right",
                "y": 1.0,
                "yanchor": "bottom",
                "pad": {"b": 36},
            }
        ],
        margin={"t": 140},
        height=max(360, 300 * len(panels)),
        width=760,
    )
    return figure


def write_summary(folder: Path | str) -> tuple[Path | None, Path | None]:
    """Write summary.csv (always, if any result exists) and overview.html beside it."""
    folder = Path(folder)
    frame = summarize(folder)
    if frame.empty:
        log.warning("no finished results under %s yet: no summary written", folder)
        return None, None
    summary = atomic_write_text(folder / SUMMARY_FILE, frame.to_csv(index=False))
    log.info("summary: %s (%d rows)", summary, len(frame))
    if importlib.util.find_spec("plotly") is None:
        log.warning("plotly is not installed: no %s (pip install plotly, then rerun to redraw)", FIGURE_FILE)
        return summary, None
    html = overview_figure(frame).to_html(include_plotlyjs=True, full_html=True)
    return summary, atomic_write_text(folder / FIGURE_FILE, html)


def read_summary(folder: Path | str) -> Any:
    """A sweep's summary.csv as a DataFrame (a folder or the CSV itself)."""
    import pandas as pd

    path = Path(folder)
    path = path / SUMMARY_FILE if path.is_dir() else path
    if not path.is_file():
        raise UsageError(f"no sweep summary at {path}: run chunky-sweep first")
    return pd.read_csv(path)


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="chunky-sweep",
        description="Run notebooks/04_sweep_point.ipynb through papermill over pairs x layers x scales.",
        epilog="Flags override --config values. Outputs: results/sweeps/<name>/ (results, notebooks, status.json, "
        "summary.csv, overview.html). Rerun the same command to resume.",
    )
    parser.add_argument("--config", help="YAML file with grid keys and settings (see README 'Sweeps')")
    parser.add_argument("--name", help="sweep name (default: sweep-<hash of grid and settings>)")
    parser.add_argument("--output-root", help=f"folder holding sweeps (default: {DEFAULT_ROOT})")
    grid = parser.add_argument_group("grid")
    grid.add_argument("--pairs", nargs="+", metavar="T:B", help="target:baseline subset pairs, e.g. 12:0 8:5")
    grid.add_argument("--layers", nargs="+", type=int, metavar="L", help="decoder layers")
    grid.add_argument("--scales", nargs="+", type=finite_float, metavar="S", help="steering scales")
    grid.add_argument(
        "--inference-datasets", nargs="+", metavar="D", help="inference subsets ('none' = the 5 built-in prompts)"
    )
    grid.add_argument("--inference-n-samples", nargs="+", type=int, metavar="N", help="inference prompt counts")
    settings = parser.add_argument_group("settings shared by every point (as in test_tulu_contrastive_steering)")
    settings.add_argument("--model", help="model id (default: the embedded SmolLM2)")
    settings.add_argument("--n-samples", type=int, help="prompts per subset for the vector (default 100)")
    settings.add_argument("--max-tokens", type=int, help="new tokens per answer (default 100)")
    settings.add_argument("--temperature", type=float, help="sampling temperature (default 0.7)")
    settings.add_argument("--seed", type=int, help="seed (default 0)")
    settings.add_argument("--data-source", choices=DATA_SOURCES, help="auto, hub or bundled")
    settings.add_argument("--cache-dir", help="activation cache shared by every worker (default: cache/)")
    settings.add_argument("--read-position", choices=("generation_prompt", "user_end"))
    settings.add_argument("--steer-positions", choices=("all", "generated"))
    settings.add_argument("--capture", choices=CAPTURE_MODES)
    settings.add_argument("--batch-size", type=int)
    settings.add_argument("--device", help="auto, cpu, cuda (each local worker sees only its own GPU)")
    settings.add_argument("--dtype")
    settings.add_argument("--include-vector-prompts", action="store_true", default=None)
    settings.add_argument("--trust-remote-code", action="store_true", default=None)
    settings.add_argument(
        "--overwrite", action="store_true", default=None, help="replace results made with other settings"
    )
    run = parser.add_argument_group("running")
    run.add_argument("--workers", type=int, help="groups run at once (one GPU each where GPUs exist; default 1)")
    run.add_argument("--executor", choices=EXECUTORS, help="local processes (default) or submitit jobs")
    run.add_argument("--submitit-cluster", choices=SUBMITIT_CLUSTERS, help="auto: SLURM where sbatch exists")
    run.add_argument("--slurm-partition", help="SLURM partition for submitit jobs")
    run.add_argument("--gpus-per-job", type=int, help="GPUs per submitit job (SLURM)")
    run.add_argument("--timeout-min", type=int, help="time limit per submitit job in minutes (default 240)")
    run.add_argument("--notebook", help=f"point notebook (default notebooks/{POINT_NOTEBOOK})")
    run.add_argument("--kernel", help="Jupyter kernel name (default python3)")
    run.add_argument("--dry-run", action="store_true", help="list the groups and what would run, then stop")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar, warnings only")
    return parser


_SUBMITIT_FLAGS = {
    "submitit_cluster": "cluster",
    "slurm_partition": "slurm_partition",
    "gpus_per_job": "gpus_per_node",
    "timeout_min": "timeout_min",
}


def mapping_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The --config file's mapping with every given flag laid over it."""
    mapping = read_sweep_file(args.config) if args.config else {}
    submitit_params = dict(mapping.get("submitit") or {}) if isinstance(mapping.get("submitit"), Mapping) else {}
    skip = {"config", "dry_run", "quiet", *_SUBMITIT_FLAGS}
    for key, value in vars(args).items():
        if key in skip or value is None:
            continue
        mapping[key] = value
    for flag, param in _SUBMITIT_FLAGS.items():
        if getattr(args, flag) is not None:
            submitit_params[param] = getattr(args, flag)
    if submitit_params:
        mapping["submitit"] = submitit_params
    return mapping


def describe_plan(spec: SweepSpec) -> list[str]:
    groups, states = plan_sweep(spec)
    lines = [f"sweep {spec.sweep_name} -> {spec.folder}: {len(states)} points in {len(groups)} notebook run(s)"]
    labels = {"absent": "to run", "same": "finished", "different": "other settings"}
    for group in groups:
        marks = [f"{config.scale:g} ({labels[states[group.point_id(config)]]})" for config in group.configs]
        lines.append(f"  {group.id}: scales {', '.join(marks)}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)

    def body() -> SweepReport | None:
        spec, options = load_sweep(mapping_from_args(args))
        if args.dry_run:
            print("\n".join(describe_plan(spec)))
            return None
        return run_sweep(spec, replace(options, progress=not args.quiet))

    report = guarded(body, "interrupted: finished points are kept; rerun the same command to resume")
    if report is None:
        return 0
    if isinstance(report, int):
        return report
    print(
        f"sweep {report.folder.name}: {len(report.ran)} run, {len(report.skipped)} already finished, "
        f"{len(report.failed)} failed"
    )
    for path in (report.summary, report.figure):
        if path is not None:
            print(path)
    if report.failed:
        print(f"failed points and their errors: {report.status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
