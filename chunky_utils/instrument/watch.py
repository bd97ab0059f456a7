"""Watching one run through forward hooks: stop within one step, progress per stage, and the residual
stream at the steered layer read on every decoding step (before the steering delta is added)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from chunky_utils.activations import output_hidden
from chunky_utils.errors import StopRequested
from chunky_utils.generation import DecodeControls, decode_controls
from chunky_utils.layers import observer
from chunky_utils.models import LoadedModel, find_decoder_layers
from chunky_utils.steering import RowDeltaHook, active_hook_count

STAGES: tuple[str, ...] = ("extracting", "generating", "scoring")
READINGS_NEED_HOOKS = "per-step token readings need module hooks, which the captured decode loop does not run"


@dataclass
class RunProgress:
    """Where a watched run stands: its stage, steps done of those expected, and an estimate of the time left."""

    stage: str
    done: int = 0
    total: int | None = None
    elapsed_s: float = 0.0
    remaining_s: float | None = None
    detail: str = ""

    @property
    def fraction(self) -> float | None:
        return None if not self.total else min(1.0, self.done / self.total)

    def describe(self) -> str:
        """'generating: token 37 of 100 (rows 1-10 of 10), about 4 s left'."""
        parts = [self.stage]
        if self.detail:
            parts[0] += f": {self.detail}"
        parts.append(f"{self.elapsed_s:.0f} s so far")
        if self.remaining_s is not None and math.isfinite(self.remaining_s):
            parts.append(f"at most ~{_seconds(self.remaining_s)} left")
        return ", ".join(parts)


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min"


@dataclass
class _DecodeStep:
    ids: torch.Tensor  # [rows] the token fed at this step
    readings: torch.Tensor | None = None  # [rows] projection before steering
    steering: torch.Tensor | None = None  # [rows] the steering delta's projection on the unit vector


@dataclass
class _Group:
    """One `generate` call's decoding steps; `offset` 1 when its first step feeds the prompt's last token."""

    offset: int
    steps: list[_DecodeStep] = field(default_factory=list)
    prompt_lengths: list[int] | None = None  # each row's prompt tokens (from the attention mask), when known


@dataclass
class RowReading:
    """One generated row as read during generation: fed token ids and their readings at the steered layer."""

    ids: list[int]
    values: list[float]
    steering: float
    prompt_length: int | None = None


class RunWatch:
    """Hooks following one run on `loaded`: stop within one forward step, progress per stage, and (with
    `read_layer` and `unit`) the residual stream at the steered layer on every decoding step.

    `expected` gives totals for the progress bar: {"extracting": prompts, "generating": rows,
    "scoring": texts, "max_new_tokens": n}. Call `phase(...)` as the run moves on; progress goes to
    `on_progress` at most every `every_s` seconds.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        stop: threading.Event | None = None,
        on_progress: Callable[[RunProgress], None] | None = None,
        read_layer: int | None = None,
        unit: torch.Tensor | None = None,
        expected: Mapping[str, int] | None = None,
        every_s: float = 0.25,
    ) -> None:
        self.loaded = loaded
        self.stop = stop or threading.Event()
        self.on_progress = on_progress
        self.read_layer = read_layer
        self.unit = None if unit is None else unit.detach().float().flatten()
        self.expected = dict(expected or {})
        self.every_s = every_s
        self.started = time.perf_counter()
        self.stage = "extracting"
        self.counts = dict.fromkeys(STAGES, 0)
        self.decode_steps = 0
        self.rows_decoded = 0
        self.groups: list[_Group] = []
        self._fresh_prefill = True
        self._prefill_in_generate = False
        self._last_report = 0.0
        self._step_times: list[float] = []
        self._last_step_at: float | None = None
        self._pending: _DecodeStep | None = None
        self.stopped_at: RunProgress | None = None

    # ------------------------------------------------------------ hooks

    def _steering_active(self) -> bool:
        return active_hook_count(self.loaded.model) > 0

    def _on_any_forward(self, _module: nn.Module, args: Any, kwargs: Any) -> None:
        if self.stop.is_set():
            self.stopped_at = self.progress()
            raise StopRequested("stopped by the user")
        hidden = args[0] if args else kwargs.get("hidden_states")
        if hidden is None or hidden.dim() < 2:
            return
        rows, width = int(hidden.shape[0]), int(hidden.shape[1])
        if self.stage == "generating":
            if width == 1:
                now = time.perf_counter()
                if self._last_step_at is not None:
                    self._step_times.append(now - self._last_step_at)
                self._last_step_at = now
            else:
                self._last_step_at = None
        elif self.stage in ("extracting", "scoring"):
            self.counts[self.stage] += rows
        self._report()

    def _on_model_call(self, _module: nn.Module, args: Any, kwargs: Any) -> None:
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor):
            ids = args[0]
        if ids is None or ids.dim() != 2:
            return
        steering = self._steering_active()
        if self.stage == "generating" and not steering and self.decode_steps:
            self.stage = "scoring"
        elif self.stage == "extracting" and steering:
            self.stage = "generating"
        if not steering:
            return
        if ids.shape[1] > 1:  # generate fills the prompt cache itself
            self._fresh_prefill = True
            self._prefill_in_generate = True
            return
        if self._fresh_prefill or not self.groups:
            offset = 0 if self._prefill_in_generate else 1
            mask = kwargs.get("attention_mask")
            lengths = None
            if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == ids.shape[0]:
                # the first step feeds the prompt's last token (offset 1) or the first new token (offset 0)
                lengths = [int(n) - (1 - offset) for n in mask.sum(dim=-1).tolist()]
            self.groups.append(_Group(offset=offset, prompt_lengths=lengths))
            self.rows_decoded += int(ids.shape[0])
            self._fresh_prefill = self._prefill_in_generate = False
        self.decode_steps += 1
        self.counts["generating"] += 1
        self._pending = _DecodeStep(ids=ids[:, 0].detach().cpu())
        self.groups[-1].steps.append(self._pending)

    def _on_read_layer(self, module: nn.Module, _args: Any, output: Any) -> None:
        hidden = output_hidden(output)
        if hidden.shape[1] != 1:
            self._fresh_prefill = True  # a prefill (packed or not) starts the next group
            return
        if self._pending is None or self.unit is None:
            return
        unit = self.unit.to(hidden.device)
        self._pending.readings = (hidden[:, 0, :].float() @ unit).cpu()
        deltas = [hook.delta for hook in module._forward_hooks.values() if isinstance(hook, RowDeltaHook)]
        if deltas:
            delta = deltas[0].float().to(unit.device)
            projected = delta @ unit
            self._pending.steering = (projected.expand(hidden.shape[0]) if projected.dim() == 0 else projected).cpu()
        self._pending = None

    @contextmanager
    def attached(self) -> Iterator[RunWatch]:
        """The hooks, on the model while the block runs; always removed. The GPU decode loop runs no module
        hooks, so it is told the stop flag and reports its steps through `generation.decode_controls`; with
        per-step readings (`read_layer`) generation keeps to transformers' `generate`, where they are read."""
        model = self.loaded.model
        layers = find_decoder_layers(model)
        handles = [
            layers[0].register_forward_pre_hook(observer(self._on_any_forward), with_kwargs=True),
            model.register_forward_pre_hook(observer(self._on_model_call), with_kwargs=True),
        ]
        if self.read_layer is not None:
            handles.append(layers[self.read_layer].register_forward_hook(self._on_read_layer))
        controls = DecodeControls(
            stop=self.stop,
            on_step=self._on_fast_step,
            no_fast_decode=READINGS_NEED_HOOKS if self.read_layer is not None else None,
        )
        try:
            with decode_controls(controls):
                yield self
        finally:
            for handle in handles:
                handle.remove()

    def _on_fast_step(self, steps: int, rows: int) -> None:
        """A step of the GPU decode loop (no hooks run there): progress and step timing, as the hooks give them."""
        now = time.perf_counter()
        if steps == 1:
            self.groups.append(_Group(offset=0))
            self.rows_decoded += rows
            self._last_step_at = None
        elif self._last_step_at is not None:
            self._step_times.append(now - self._last_step_at)
        self._last_step_at = now
        # token ids stay on the GPU until the loop ends: the step records only how many rows it decoded
        self.groups[-1].steps.append(_DecodeStep(ids=torch.zeros(rows, dtype=torch.long)))
        self.decode_steps += 1
        self.counts["generating"] += 1
        self._report()

    # ------------------------------------------------------------ progress

    def phase(self, stage: str) -> None:
        """Say which stage the caller is entering (extracting, generating or scoring)."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.stage = stage
        self._report(force=True)

    def progress(self) -> RunProgress:
        """The run's current stage with counts and an estimate of the time left in this stage."""
        elapsed = time.perf_counter() - self.started
        if self.stage == "generating":
            max_tokens = self.expected.get("max_new_tokens") or 0
            group = self.groups[-1] if self.groups else None
            step = len(group.steps) - group.offset if group else 0
            rows_total = self.expected.get("generating")
            batches_left = 0
            if rows_total and group and group.steps:
                rows_per_batch = int(group.steps[0].ids.shape[0])
                batches_left = max(0, math.ceil((rows_total - self.rows_decoded) / max(1, rows_per_batch)))
            step_s = sorted(self._step_times[-20:])[len(self._step_times[-20:]) // 2] if self._step_times else None
            remaining = None
            if step_s is not None and max_tokens:
                remaining = step_s * (max(0, max_tokens - step) + batches_left * max_tokens)
            rows_note = f", {self.rows_decoded} of {rows_total} rows started" if rows_total else ""
            detail = f"token {max(0, step)} of {max_tokens}{rows_note}" if max_tokens else f"step {step}"
            return RunProgress("generating", max(0, step), max_tokens or None, elapsed, remaining, detail)
        total = self.expected.get(self.stage)
        done = self.counts[self.stage]
        what = "prompts" if self.stage == "extracting" else "texts"
        remaining = None
        if total and done:
            stage_elapsed = elapsed  # rough: the stage's rate since the run began
            remaining = stage_elapsed / done * max(0, total - done)
        detail = f"{min(done, total)} of {total} {what}" if total else f"{done} {what}"
        return RunProgress(self.stage, done, total, elapsed, remaining, detail)

    def _report(self, force: bool = False) -> None:
        if self.on_progress is None:
            return
        now = time.perf_counter()
        if force or now - self._last_report >= self.every_s:
            self._last_report = now
            self.on_progress(self.progress())

    # ------------------------------------------------------------ readings

    def row_readings(self, eos_ids: Sequence[int] = ()) -> list[RowReading]:
        """Every decoded row: the generated tokens fed back at each step (up to the first end token) and the
        reading taken at that step. The last generated token is never fed back, so it has no reading."""
        stops = set(eos_ids)
        rows: list[RowReading] = []
        for group in self.groups:
            steps = [step for step in group.steps[group.offset :] if step.readings is not None]
            if not steps:
                continue
            ids = torch.stack([step.ids for step in steps], dim=1)
            values = torch.stack([step.readings for step in steps], dim=1)  # type: ignore[misc]
            steering = steps[0].steering if steps[0].steering is not None else torch.zeros(ids.shape[0])
            for row in range(ids.shape[0]):
                row_ids = ids[row].tolist()
                cut = next((i for i, token in enumerate(row_ids) if token in stops), len(row_ids))
                length = group.prompt_lengths[row] if group.prompt_lengths else None
                rows.append(RowReading(row_ids[:cut], values[row, :cut].tolist(), float(steering[row]), length))
        return rows
