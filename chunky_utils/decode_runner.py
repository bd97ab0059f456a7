"""Per-model state of the fast decode path: buffers per bucket, captured graphs, the attention kernel chosen.

The step is tried compiled with a length-aware attention kernel, then compiled with masked SDPA, then
eager; on a GPU each (rows bucket, cache-length bucket, sampling kind) is captured once as a CUDA graph.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from chunky_utils.decode_step import EAGER_STEP, DecodeState, StepFunctions, StepParts, cache_attention, compiled_step

log = logging.getLogger(__name__)

MAX_STATES_PER_MODEL = 3


@dataclass
class RunInfo:
    """What the last `fast_generate` call did and cost (seconds)."""

    rows: int = 0
    bucket_rows: int = 0
    bucket_length: int = 0
    width: int = 0
    steps: int = 0
    prefill_s: float = 0.0
    setup_s: float = 0.0
    decode_s: float = 0.0
    compile_s: float = 0.0
    capture_s: float = 0.0
    mode: str = ""

    @property
    def step_ms(self) -> float:
        return 1000 * self.decode_s / self.steps if self.steps else 0.0


@dataclass
class Runner:
    """Per-model fast-decoding state: buckets' buffers (least recently used dropped), graphs, costs.

    On a GPU the step is tried, in this order, compiled with a length-aware attention kernel (`kernel`,
    the faster of those that agree with SDPA here), compiled with masked SDPA, then eager with masked
    SDPA: the first that runs is kept for the model.
    """

    parts: StepParts
    capture: bool
    compile: bool
    kernel: str
    kernel_ms: dict[str, float] = field(default_factory=dict)
    states: OrderedDict[tuple[int, int], DecodeState] = field(default_factory=OrderedDict)
    pool: Any = None
    compile_s: float = 0.0
    captures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def state(self, rows: int, length: int) -> DecodeState:
        key = (rows, length)
        if key in self.states:
            self.states.move_to_end(key)
            return self.states[key]
        while len(self.states) >= MAX_STATES_PER_MODEL:
            self.states.popitem(last=False)
        self.states[key] = DecodeState.allocate(self.parts, rows, length)
        return self.states[key]

    def functions(self) -> StepFunctions:
        return compiled_step() if self.compile else EAGER_STEP

    def run_step(self, state: DecodeState, kind: tuple[bool, int, float]) -> None:
        state.step(self.parts, self.functions(), kind, self.kernel)

    def mode(self) -> str:
        return ", ".join(
            part
            for part, used in (
                ("graph", self.capture),
                ("compiled", self.compile),
                ("fused q|k|v, gate|up", self.parts.fused is not None),
                (f"{self.kernel} attention", self.kernel),
            )
            if used
        )

    def _first_step(self, state: DecodeState, kind: tuple[bool, int, float]) -> None:
        """Run one step, stepping down the ladder of configurations until one works."""
        while True:
            try:
                self.run_step(state, kind)
                return
            except Exception as exc:
                if self.parts.fused is not None:
                    log.warning("fast decode: the fused step failed (%s); stepping through the modules", exc)
                    self.parts.fused = None
                elif self.kernel:
                    log.warning("fast decode: %s attention failed (%s); using masked SDPA", self.kernel, exc)
                    self.kernel = ""
                elif self.compile:
                    log.warning("fast decode: torch.compile failed (%s); capturing the eager step", exc)
                    self.compile = False
                else:
                    raise
                state.graphs.clear()

    def ensure_graph(self, state: DecodeState, kind: tuple[bool, int, float], info: RunInfo) -> Any:
        """The captured graph of this bucket and sampling kind, compiled and captured on first use."""
        if not self.capture:
            return None
        graph = state.graphs.get(kind)
        if graph is not None:
            return graph
        device = self.parts.device
        started = time.perf_counter()
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self._first_step(state, kind)  # compiles on the first sight of a shape
            torch.cuda.synchronize(device)
            warm = time.perf_counter()
            self.run_step(state, kind)
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                self.run_step(state, kind)
            torch.cuda.synchronize(device)
        except Exception as exc:  # stepping without a graph is slower but gives the same tokens
            log.warning("fast decode: CUDA graph capture failed (%s); stepping without a graph", exc)
            self.capture = False
            return None
        done = time.perf_counter()
        state.graphs[kind] = graph
        self.captures += 1
        self.compile_s += warm - started
        info.compile_s += warm - started
        info.capture_s += done - warm
        log.info(
            "fast decode: step for %d rows x %d slots (%s; %s) ready in %.1f s (compile %.1f s, capture %.2f s)",
            state.rows,
            state.length,
            "greedy" if kind[0] else f"sampling top_k={kind[1]} top_p={kind[2]}",
            self.mode(),
            done - started,
            warm - started,
            done - warm,
        )
        return graph


_RUNNERS: weakref.WeakKeyDictionary[nn.Module, Runner] = weakref.WeakKeyDictionary()


def runner_for(model: nn.Module) -> Runner:
    runner = _RUNNERS.get(model)
    if runner is None:
        parts = StepParts.of(model)
        on_gpu = parts.device.type == "cuda"
        compile_wanted = on_gpu and os.environ.get("CHUNKY_FAST_DECODE_COMPILE", "1") != "0"
        dynamo_config = torch._dynamo.config
        limit_name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
        if compile_wanted and getattr(dynamo_config, limit_name) < 32:
            setattr(dynamo_config, limit_name, 32)  # buckets and sampling kinds: a few compiles each
        timings = _decode_kernel_timings(parts) if on_gpu else {}
        kernel = min(timings, key=lambda name: timings[name]) if timings else ""
        runner = Runner(parts=parts, capture=on_gpu, compile=compile_wanted, kernel=kernel, kernel_ms=timings)
        _RUNNERS[model] = runner
    return runner


def captured_ms(call: Callable[[], Any], repeats: int = 20) -> float:
    """GPU milliseconds per call, `repeats` calls captured in one CUDA graph (no Python launch cost, as the
    captured decode step runs them)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            call()
    graph.replay()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    graph.replay()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / repeats


def _decode_kernel_timings(parts: StepParts) -> dict[str, float]:
    """Milliseconds per call of each length-aware attention kernel that agrees with masked SDPA here
    (64 rows, 512 slots, random data and lengths); kernels that fail or disagree are left out."""
    rows, length, device = 64, 512, parts.device
    generator = torch.Generator(device=device).manual_seed(0)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(shape, device=device, dtype=parts.dtype, generator=generator)

    query = draw(rows, parts.kv_heads * parts.groups, 1, parts.head_dim)
    key, value = draw(rows, length, parts.kv_heads, parts.head_dim), draw(rows, length, parts.kv_heads, parts.head_dim)
    lengths = torch.randint(1, length + 1, (rows,), device=device, generator=generator)
    lengths[0] = length
    starts = torch.arange(rows + 1, dtype=torch.int32, device=device)
    mask = (torch.arange(length, device=device)[None, :] < lengths[:, None])[:, None, None, :]
    reference, _ = cache_attention(nn.Module(), query, key, value, mask, scaling=parts.head_dim**-0.5)
    timings: dict[str, float] = {}
    for kernel, cu_queries in (("flash", starts), ("efficient", starts * parts.groups), ("split", starts)):

        def call(kernel: str = kernel, cu_queries: torch.Tensor = cu_queries) -> torch.Tensor:
            reads = {"kv_lengths": lengths.to(torch.int32), "cu_queries": cu_queries, "cu_keys": starts * length}
            return cache_attention(
                nn.Module(), query, key, value, None, scaling=parts.head_dim**-0.5, kernel=kernel, **reads
            )[0]

        try:
            error = float((call().float() - reference.float()).norm() / reference.float().norm())
        except Exception as exc:  # an older torch without per-row key lengths, or no Triton for 'split'
            log.info("fast decode: %s attention unavailable (%s)", kernel, str(exc).splitlines()[0][:200])
            continue
        if error > 1e-2:
            log.warning("fast decode: %s attention disagrees with SDPA (relative error %.3g): not used", kernel, error)
            continue
        try:
            timings[kernel] = captured_ms(call)
        except Exception as exc:  # the decode step is captured, so a kernel must be capturable
            log.info("fast decode: %s attention cannot be captured (%s)", kernel, str(exc).splitlines()[0][:200])
    log.info(
        "fast decode: length-aware attention kernels, ms per call at %d rows x %d slots: %s", rows, length, timings
    )
    return timings


def release(model: nn.Module) -> None:
    """Drop the model's static buffers and captured graphs (they are rebuilt on the next call)."""
    _RUNNERS.pop(model, None)
