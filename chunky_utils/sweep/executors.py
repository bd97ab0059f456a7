"""Running groups' notebooks: one papermill run per group, in local worker processes (one GPU each) or as
submitit jobs, a window of them in flight at once."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from chunky_utils.errors import UsageError
from chunky_utils.sweep.spec import running_path

log = logging.getLogger(__name__)

EXECUTORS: tuple[str, ...] = ("local", "submitit")
SUBMITIT_CLUSTERS: tuple[str, ...] = ("auto", "slurm", "local")


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
    """The first non-blank line of `text`, cut to `limit` characters."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def describe_error(exc: BaseException) -> str:
    """One line: the notebook's exception when papermill reports one, else the exception itself."""
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    if ename:
        return one_line(f"{ename}: {evalue}")
    return one_line(f"{type(exc).__name__}: {exc}")


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
    """The GPU of worker slot `slot` (round robin), None without GPUs."""
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
