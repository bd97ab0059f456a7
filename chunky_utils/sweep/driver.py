"""`run_sweep`: resume a sweep, skip its finished points, run the rest group by group, record failures."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from chunky_utils.cache import atomic_write_text
from chunky_utils.errors import UsageError
from chunky_utils.sweep.executors import GroupJob, run_local, run_submitit, visible_gpus
from chunky_utils.sweep.report import write_summary
from chunky_utils.sweep.spec import PointGroup, SweepOptions, SweepSpec, plan_sweep
from chunky_utils.sweep.status import STATUS_FILE, SweepStatus, iso_time

log = logging.getLogger(__name__)

POINT_NOTEBOOK = "04_sweep_point.ipynb"
SPEC_FILE = "sweep.yaml"


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


def find_notebook(notebook: str | None) -> Path:
    """The point notebook: the one given, else notebooks/04_sweep_point.ipynb of this checkout or the cwd."""
    if notebook:
        candidates = [Path(notebook)]
    else:
        candidates = [
            Path(__file__).resolve().parents[2] / "notebooks" / POINT_NOTEBOOK,
            Path("notebooks") / POINT_NOTEBOOK,
        ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise UsageError(f"sweep notebook not found: {candidates[0]} (pass --notebook)")


def require(module: str, install: str) -> None:
    """UsageError naming the install command when `module` cannot be imported."""
    if importlib.util.find_spec(module) is None:
        raise UsageError(f"chunky-sweep needs {module} here: {install}")


def check_kernel(kernel: str) -> None:
    """UsageError with the registration command when the Jupyter kernel does not exist."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(kernel)
    except NoSuchKernel:
        raise UsageError(
            f"Jupyter kernel {kernel!r} not found: register one with "
            f"{sys.executable} -m ipykernel install --sys-prefix --name {kernel}"
        ) from None


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
                    started_at=iso_time(result.started_at),
                    finished_at=iso_time(result.finished_at),
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
