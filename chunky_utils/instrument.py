"""The playground's instruments around a run: stop and progress, per-token readings taken while `generate`
runs, a layer x scale grid in one batched generation, and a next-token preview.

Everything here works through forward hooks on the loaded model, so the run itself stays the library's
(`pipeline.Runner`, `generation.generate_rows`): a hook on the first decoder layer sees every forward step
(extraction, prefill, each decoding step, scoring), checks a stop flag there and counts steps; a hook on
the steered layer reads the residual stream of the position fed at each decoding step, before the
steering delta is added (that reading depends only on the tokens, so baseline and steered rows are read
on one footing).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from chunky_utils.activations import SubsetMeans, cache_key_for, output_hidden
from chunky_utils.cache import ActivationCache
from chunky_utils.collapse import collapse_reason
from chunky_utils.generation import GenerationSettings, generate_rows
from chunky_utils.models import LoadedModel, find_decoder_layers, format_prompts, tokenize_prompts
from chunky_utils.steering import RowDeltaHook, SteeringVector, active_hook_count, add_to_layers, contrastive_vector

STAGES: tuple[str, ...] = ("extracting", "generating", "scoring")
FAST_DECODE_SWITCH = "CHUNKY_FAST_DECODE"
"""The environment switch `chunky_utils.fast_decode` reads; '0' keeps generation on hookable `generate`."""


class StopRequested(Exception):
    """The user asked to stop: raised inside the next forward step, so the run ends within one step."""


# ---------------------------------------------------------------- watching a run


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
        """The hooks, on the model while the block runs; always removed. While attached, generation takes
        transformers' `generate` (CHUNKY_FAST_DECODE=0): the captured GPU decode loop runs no module hooks,
        so it could neither be stopped nor read step by step."""
        model = self.loaded.model
        layers = find_decoder_layers(model)
        previous = os.environ.get(FAST_DECODE_SWITCH)
        os.environ[FAST_DECODE_SWITCH] = "0"
        handles = [
            layers[0].register_forward_pre_hook(self._on_any_forward, with_kwargs=True),
            model.register_forward_pre_hook(self._on_model_call, with_kwargs=True),
        ]
        if self.read_layer is not None:
            handles.append(layers[self.read_layer].register_forward_hook(self._on_read_layer))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            if previous is None:
                os.environ.pop(FAST_DECODE_SWITCH, None)
            else:
                os.environ[FAST_DECODE_SWITCH] = previous

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


def eos_token_ids(loaded: LoadedModel) -> list[int]:
    """Token ids that end an answer (generation config and tokenizer), plus the pad id fed after the end."""
    found: list[int] = []
    config = getattr(loaded.model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), loaded.tokenizer.eos_token_id, loaded.tokenizer.pad_token_id):
        if isinstance(value, int):
            found.append(value)
        elif isinstance(value, list | tuple):
            found += [int(v) for v in value]
    return list(dict.fromkeys(found))


# ---------------------------------------------------------------- readings on the answers


@dataclass(frozen=True)
class TokenReading:
    """An answer cut into token pieces, each with its reading at the steered layer (None: not read)."""

    pieces: list[str]
    values: list[float | None]
    ids: list[int] = field(default_factory=list)  # the read tokens (fed back during generation)


def token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The text each token adds to the decoded whole: a character split over several tokens (bytes of one
    UTF-8 character) lands on the token that completes it; the pieces join to the whole decode."""
    whole = tokenizer.decode(list(ids), skip_special_tokens=True)
    pieces, emitted = [], 0
    for end in range(1, len(ids) + 1):
        prefix = tokenizer.decode(list(ids[:end]), skip_special_tokens=True)
        stable = len(prefix) if end == len(ids) else _common_prefix(prefix, whole)
        pieces.append(whole[emitted : max(emitted, stable)])
        emitted = max(emitted, stable)
    return pieces


def _common_prefix(left: str, right: str) -> int:
    size = min(len(left), len(right))
    for index in range(size):
        if left[index] != right[index]:
            return index
    return size


def reading_for_text(tokenizer: Any, reading: RowReading, text: str) -> TokenReading | None:
    """`text` (a generated answer, stripped as the library strips it) split into read token pieces and the
    unread rest; None when the read tokens are not how `text` begins."""
    pieces = token_pieces(tokenizer, reading.ids)
    values: list[float | None] = list(reading.values)
    while pieces and not pieces[0].strip():  # leading whitespace is stripped from answers
        pieces.pop(0)
        values.pop(0)
    if pieces:
        pieces[0] = pieces[0].lstrip()
    joined = "".join(pieces)
    while not text.startswith(joined) and pieces and pieces[-1].endswith("\ufffd"):
        pieces.pop()  # a character the unread last token completes
        values.pop()
        joined = "".join(pieces)
    if not text.startswith(joined):
        if not (joined.startswith(text) and joined[len(text) :].isspace()):
            return None
        pieces, values = _cut(pieces, values, len(text))  # trailing whitespace is stripped too
        joined = text
    rest = text[len(joined) :]
    if rest:
        pieces.append(rest)
        values.append(None)
    return TokenReading(pieces, values, list(reading.ids))


def _cut(pieces: list[str], values: list[float | None], size: int) -> tuple[list[str], list[float | None]]:
    """The pieces (and their values) holding the first `size` characters."""
    kept_pieces, kept_values, used = [], [], 0
    for piece, value in zip(pieces, values, strict=True):
        if used >= size:
            break
        kept_pieces.append(piece[: size - used])
        kept_values.append(value)
        used += len(kept_pieces[-1])
    return kept_pieces, kept_values


def match_readings(
    tokenizer: Any, rows: Sequence[Mapping[str, Any]], readings: Sequence[RowReading]
) -> dict[tuple[int, str], TokenReading]:
    """Readings assigned to result rows: {(row index, 'baseline'|'steered'): TokenReading}.

    A reading goes to the side its steering says (none: baseline), to a row whose chat-formatted prompt has
    the reading's prompt length (read from the attention mask), and among those to the row whose text it
    explains best (the most text read); rows whose answer was not generated in this run (e.g. a cached
    baseline) get none.
    """
    formatted = format_prompts(tokenizer, [str(row.get("prompt") or "") for row in rows], add_generation_prompt=True)
    lengths = [len(ids) for ids in tokenize_prompts(tokenizer, formatted)] if rows else []
    found: dict[tuple[int, str], TokenReading] = {}
    for reading in readings:
        side = "baseline" if abs(reading.steering) < 1e-6 else "steered"
        best: tuple[int, int, TokenReading] | None = None
        for index, row in enumerate(rows):
            if (index, side) in found:
                continue
            if reading.prompt_length is not None and reading.prompt_length != lengths[index]:
                continue
            matched = reading_for_text(tokenizer, reading, str(row.get(side) or ""))
            if matched is None:
                continue
            pairs = zip(matched.pieces, matched.values, strict=True)
            read = sum(len(piece) for piece, value in pairs if value is not None)
            if best is None or read > best[0]:
                best = (read, index, matched)
        if best is not None:
            found[(best[1], side)] = best[2]
    return found


# ---------------------------------------------------------------- vectors without extraction


def cached_means(
    loaded: LoadedModel, prompts: Any, cache_root: Any, read_position: str, layers: Sequence[int]
) -> tuple[SubsetMeans, SubsetMeans] | None:
    """Target and baseline means at `layers` when the activation cache holds both, else None (no extraction)."""
    found = []
    for prompt_set in (prompts.target, prompts.baseline):
        cache = ActivationCache(cache_root, cache_key_for(loaded, read_position, prompt_set.data_source))
        means = cache.load_means(prompt_set.subset, len(prompt_set.rows), layers, prompt_set.content_hash)
        if means is None:
            return None
        found.append(SubsetMeans(prompt_set, means, True, None))
    return found[0], found[1]


def cached_vector(loaded: LoadedModel, prompts: Any, cache_root: Any, read_position: str) -> SteeringVector | None:
    """The contrastive vector at every layer from the cache alone, or None when any layer is missing."""
    means = cached_means(loaded, prompts, cache_root, read_position, range(loaded.n_layers))
    return None if means is None else contrastive_vector(*means)


def relative_magnitude(vector: SteeringVector, layer: int, scale: float) -> float:
    """|scale| x vector norm as a share of the layer's mean residual norm (mean of the two subset means' norms)."""
    meta = vector.metadata
    mean_norm = (float(meta["target_norms"][layer]) + float(meta["baseline_norms"][layer])) / 2
    return abs(float(scale)) * vector.norm(layer) / mean_norm if mean_norm > 0 else math.inf


# ---------------------------------------------------------------- grid


@dataclass(frozen=True)
class GridCell:
    """One steered answer of the grid (layer None: the unsteered baseline)."""

    prompt_index: int
    layer: int | None
    scale: float
    text: str
    collapse: str | None


@dataclass(frozen=True)
class GridResult:
    prompts: list[str]
    layers: list[int]
    scales: list[float]
    cells: list[GridCell]
    seconds: float

    def cell(self, prompt_index: int, layer: int | None, scale: float) -> GridCell:
        for cell in self.cells:
            if cell.prompt_index == prompt_index and cell.layer == layer and (layer is None or cell.scale == scale):
                return cell
        raise KeyError((prompt_index, layer, scale))


def grid_rows(
    vector: SteeringVector, n_prompts: int, layers: Sequence[int], scales: Sequence[float]
) -> tuple[list[int], list[tuple[int | None, float]], dict[int, torch.Tensor]]:
    """Rows for a layer x scale grid: per prompt a baseline row then one row per (layer, scale); the delta of a
    row sits at its own layer, zeros at the other hooked layers. Returns (row prompts, row cells, deltas)."""
    cells: list[tuple[int | None, float]] = [(None, 0.0)] + [(layer, float(s)) for layer in layers for s in scales]
    row_prompts = [p for p in range(n_prompts) for _ in cells]
    row_cells = [cell for _ in range(n_prompts) for cell in cells]
    hidden = vector.at(layers[0]).numel()
    deltas = {layer: torch.zeros(len(row_cells), hidden) for layer in layers}
    for row, (layer, scale) in enumerate(row_cells):
        if layer is not None:
            deltas[layer][row] = vector.at(layer).detach().float().cpu() * scale
    return row_prompts, row_cells, deltas


def generate_grid(
    loaded: LoadedModel,
    vector: SteeringVector,
    prompts: Sequence[str],
    layers: Sequence[int],
    scales: Sequence[float],
    settings: GenerationSettings,
) -> GridResult:
    """Every prompt at every (layer, scale), plus its baseline, in one batched `generate_rows` call."""
    if not prompts or not layers or not scales:
        raise ValueError("a grid needs at least one prompt, one layer and one scale")
    layers = sorted({int(layer) for layer in layers})
    scales = sorted({float(scale) for scale in scales})
    row_prompts, row_cells, deltas = grid_rows(vector, len(prompts), layers, scales)
    output = generate_rows(loaded, prompts, row_prompts, deltas, settings, progress=False)
    cells = []
    for prompt, (layer, scale), text in zip(row_prompts, row_cells, output.texts, strict=True):
        tokens = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        cells.append(GridCell(prompt, layer, scale, text, collapse_reason(tokens)))
    return GridResult(list(prompts), layers, scales, cells, output.seconds)


# ---------------------------------------------------------------- next-token preview


@dataclass(frozen=True)
class NextTokenPreview:
    """The likeliest next tokens unsteered and steered, and KL(steered || unsteered) in nats."""

    prompt: str
    tokens: list[str]
    unsteered: list[float]
    steered: list[float]
    kl: float
    seconds: float


@torch.inference_mode()
def next_token_preview(
    loaded: LoadedModel, prompt: str, layer: int, delta: torch.Tensor, top: int = 8, positions: str = "all"
) -> NextTokenPreview:
    """One forward of the chat-formatted prompt, twice in a batch (unsteered, steered by `delta` at `layer`):
    the union of both top-`top` next tokens with their probabilities, and the KL divergence."""
    started = time.perf_counter()
    model, tokenizer = loaded.model, loaded.tokenizer
    (ids,) = tokenize_prompts(tokenizer, format_prompts(tokenizer, [prompt], add_generation_prompt=True))
    input_ids = torch.tensor([ids, ids], device=loaded.device)
    deltas = torch.stack([torch.zeros_like(delta.float().cpu()), delta.float().cpu()])
    with add_to_layers(model, {layer: deltas}, positions):
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits[:, -1, :].float()
    log_probs = torch.log_softmax(logits, dim=-1)
    probs = log_probs.exp()
    kl = float((probs[1] * (log_probs[1] - log_probs[0])).sum())
    picked = torch.cat([probs[0].topk(top).indices, probs[1].topk(top).indices]).unique()
    order = picked[torch.argsort(torch.maximum(probs[0, picked], probs[1, picked]), descending=True)]
    return NextTokenPreview(
        prompt,
        [tokenizer.decode([int(token)]) for token in order],
        [float(probs[0, token]) for token in order],
        [float(probs[1, token]) for token in order],
        max(0.0, kl),
        time.perf_counter() - started,
    )
