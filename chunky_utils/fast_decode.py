"""A decode loop at the hardware's pace: static KV cache, the one-token step captured as a CUDA graph.

On a CUDA GPU:
- prefill: every row's prompt but its last token runs packed (prompts end to end, block-diagonal flash
  attention, no padding); layers up to the first steered one run once per prompt, later ones once per
  row, and each layer's keys and values go straight into the decode cache;
- the KV cache is a fixed block per layer, [rows, cache length, kv heads, head dim]; row r's prompt fills
  slots from 0 and the token at step s goes to slot len(prompt) - 1 + s, its position id;
- attention reads the cache in place, the query heads of a key/value head acting as that head's queries,
  and reads only each row's filled slots: the fastest, timed inside a CUDA graph, of the kernels with
  per-row key lengths that agree with masked SDPA here (split-key Triton kernel, memory-efficient, flash);
  masked SDPA where none works;
- every layer adds its row of steering deltas (zeros where a row is unsteered) from a buffer;
- the next token comes from the shared random stream (chunky_utils.sampling: dense Gumbel noise from a
  table of per-step row states), and the step's counters move on inside the step;
- the step (prologue, each decoder layer through one compiled function shared by all layers, head and
  sampling) is captured once into a CUDA graph; the host loop only replays it and reads the all-finished
  flag every `FINISHED_CHECK_EVERY` steps.

Rows and cache lengths snap to buckets (`bucket_rows`, `bucket_length`), so a session compiles a few
times and captures one graph per bucket and sampling kind (`last_run_info` says what a call cost). On a
CPU the same step runs eagerly (no compile, no graph): the tests check there that it gives exactly the
token ids of transformers' `generate` with the same steering hooks and logits processor.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from chunky_utils.chat import pad_token_id
from chunky_utils.decode_prefill import prefill_rows, routed_attention_function
from chunky_utils.decode_runner import RunInfo, release, runner_for
from chunky_utils.decode_step import DecodeState
from chunky_utils.layers import user_hooks
from chunky_utils.models import LoadedModel, find_decoder_layers
from chunky_utils.options import STEER_POSITIONS
from chunky_utils.packed_extraction import packing_reason, routed_attention
from chunky_utils.sampling import SamplingSettings, row_states

log = logging.getLogger(__name__)

__all__ = [
    "ROW_BUCKETS",
    "RunInfo",
    "bucket_length",
    "bucket_rows",
    "fast_generate",
    "fast_path_reason",
    "last_run_info",
    "release",
    "structure_reason",
]

FAST_ATTENTION = "chunky_fast_decode"
ROW_BUCKETS: tuple[int, ...] = (
    1,
    2,
    4,
    8,
    16,
    24,
    32,
    48,
    64,
    80,
    96,
    112,
    128,
    160,
    192,
    224,
    256,
    320,
    384,
    448,
    512,
)
FINISHED_CHECK_EVERY = 8


def bucket_rows(rows: int) -> int:
    """The batch size a call of `rows` rows runs at: the next of ROW_BUCKETS, then multiples of 128."""
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    for bucket in ROW_BUCKETS:
        if rows <= bucket:
            return bucket
    return -(-rows // 128) * 128


def bucket_length(length: int) -> int:
    """The cache length for `length` slots: multiples of 128 up to 1024, then of 512."""
    if length < 1:
        raise ValueError(f"length must be at least 1, got {length}")
    step = 128 if length <= 1024 else 512
    return -(-length // step) * step


# ---------------------------------------------------------------- when the fast path applies


def structure_reason(model: nn.Module) -> str | None:
    """Why the model's layout rules the fast step out (None = it fits), whatever the device."""
    reason = packing_reason(model)
    if reason is not None:
        return reason
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        return "the model is quantized"
    body = model.model
    if not hasattr(body, "norm") or not isinstance(getattr(model, "lm_head", None), nn.Linear):
        return "the model has no final norm and linear lm_head"
    layers = find_decoder_layers(model)
    hooked = [index for index, layer in enumerate(layers) if user_hooks(layer) or user_hooks(layer.self_attn)]
    if hooked or user_hooks(body):
        return f"forward hooks are on the model (layers {hooked}); a captured step would freeze them"
    return None


def fast_path_reason(loaded: LoadedModel, settings: Any = None) -> str | None:
    """None when `fast_generate` can serve these settings on this model, else why not (for the log).

    `settings` is a GenerationSettings-like object (read: `fast_decode`, `cache_implementation`,
    `positions`); the environment variable CHUNKY_FAST_DECODE=0 switches the fast path off.
    """
    if os.environ.get("CHUNKY_FAST_DECODE", "1") == "0":
        return "switched off by CHUNKY_FAST_DECODE=0"
    if settings is not None:
        if getattr(settings, "fast_decode", True) is False:
            return "switched off in the settings"
        cache = getattr(settings, "cache_implementation", None)
        if cache is not None:
            return f"cache_implementation={cache!r} asks for transformers' own cache"
        if getattr(settings, "positions", "all") not in STEER_POSITIONS:
            return f"positions must be one of {STEER_POSITIONS}"
    devices = {parameter.device for parameter in loaded.model.parameters()}
    if len(devices) > 1:
        return "the model is spread over several devices"
    device = next(iter(devices))
    if device.type != "cuda":
        return f"the model is on {device.type}: the captured decode step needs a CUDA GPU"
    return structure_reason(loaded.model)


# ---------------------------------------------------------------- the loop


_LAST = RunInfo()


def last_run_info() -> RunInfo:
    """Timings and buckets of the most recent `fast_generate` call."""
    return _LAST


def _eos_list(eos_token_ids: int | Iterable[int] | None) -> list[int]:
    if eos_token_ids is None:
        return []
    if isinstance(eos_token_ids, int):
        return [eos_token_ids]
    return [int(token) for token in eos_token_ids]


def _load(
    state: DecodeState,
    prompt_lengths: list[int],
    last_tokens: list[int],
    layer_deltas: Mapping[int, torch.Tensor],
    keys: Sequence[int],
    sampling: SamplingSettings,
    min_new_tokens: int,
    eos: list[int],
    pad_id: int,
) -> None:
    """Fill the bucket's buffers for this call (rows past the real ones are finished padding)."""
    rows = len(last_tokens)
    device = state.deltas.device

    def padded(values: list[int], fill: int) -> torch.Tensor:
        return torch.tensor(values + [fill] * (state.rows - rows), dtype=torch.int64).to(device)

    b = state.buffers
    b["tokens"].copy_(padded(last_tokens, pad_id))
    b["positions"].copy_(padded([length - 1 for length in prompt_lengths], 0))
    b["step"].zero_()
    b["min_new"].fill_(min_new_tokens)
    b["temperature"].fill_(sampling.temperature if sampling.temperature > 0 else 1.0)
    b["finished"].copy_(torch.arange(state.rows, device=device) >= rows)
    b["eos_mask"].zero_()
    if eos:
        b["eos_mask"][torch.tensor(eos, device=device)] = True
    state.deltas.zero_()
    for layer, deltas in layer_deltas.items():
        state.deltas[layer, :rows, 0].copy_(deltas)
    steps = torch.arange(state.length, device=device)[:, None]
    b["row_states"].copy_(row_states(sampling.seed, padded(list(keys), 0), steps))


@torch.inference_mode()
def fast_generate(
    loaded: LoadedModel,
    prompt_token_ids: Sequence[Sequence[int]],
    row_prompts: Sequence[int],
    row_keys: Sequence[int],
    layer_deltas: Mapping[int, torch.Tensor],
    positions: str,
    sampling: SamplingSettings,
    max_new_tokens: int,
    min_new_tokens: int,
    eos_token_ids: int | Iterable[int] | None,
    progress: bool = False,
    stop_event: threading.Event | None = None,
    max_batch_tokens: int = 16384,
    on_step: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Each row's generated token ids, up to and including its first EOS.

    Row r continues prompt `row_prompts[r]` (token ids, chat template applied) with sampling key
    `row_keys[r]`; `layer_deltas[layer]` ([rows, hidden]) is added to that layer's output, at prompt and
    generated positions ('all') or at the last prompt token and every decoding step ('generated'), as
    steering.RowDeltaHook does. A set `stop_event` ends the loop before the next step; `on_step(steps done,
    rows)` is called after each step (on the host, without waiting for the GPU).
    """
    global _LAST
    model = loaded.model
    reason = structure_reason(model)
    if reason is not None:
        raise ValueError(f"fast decoding cannot run this model: {reason}")
    if positions not in STEER_POSITIONS:
        raise ValueError(f"positions must be one of {STEER_POSITIONS}, got {positions!r}")
    n_rows = len(row_prompts)
    if len(row_keys) != n_rows:
        raise ValueError(f"{len(row_keys)} row keys for {n_rows} rows")
    if n_rows == 0 or max_new_tokens < 1:
        return [[] for _ in range(n_rows)]
    prompt_lengths = [len(prompt_token_ids[p]) for p in row_prompts]
    if min(prompt_lengths) < 1:
        raise ValueError("every prompt needs at least one token")
    window = getattr(model.config, "sliding_window", None) if model.config.model_type == "mistral" else None
    if window and max(prompt_lengths) + max_new_tokens > window:
        raise ValueError(f"prompt and answer ({max(prompt_lengths) + max_new_tokens} tokens) exceed the sliding window")
    runner = runner_for(model)
    parts = runner.parts
    for layer, deltas in layer_deltas.items():
        if not 0 <= layer < len(parts.layers):
            raise ValueError(f"layer {layer} is out of range: the model has layers 0..{len(parts.layers) - 1}")
        if tuple(deltas.shape) != (n_rows, parts.hidden):
            raise ValueError(
                f"layer {layer} deltas have shape {tuple(deltas.shape)}, expected ({n_rows}, {parts.hidden})"
            )
    info = RunInfo(rows=n_rows, width=max(prompt_lengths) - 1)
    layer_deltas = {layer: deltas.detach().float().cpu() for layer, deltas in layer_deltas.items()}
    kind = (sampling.greedy, 0 if sampling.greedy else sampling.top_k, 1.0 if sampling.greedy else sampling.top_p)
    eos = _eos_list(eos_token_ids)
    with runner.lock, routed_attention(model, FAST_ATTENTION, routed_attention_function):
        state = runner.state(bucket_rows(n_rows), bucket_length(info.width + max_new_tokens))
        info.bucket_rows, info.bucket_length = state.rows, state.length
        graph = runner.ensure_graph(state, kind, info)  # before the buffers are loaded: its warm-up writes them
        clock = _Clock(parts.device)
        last_tokens = [int(prompt_token_ids[p][-1]) for p in row_prompts]
        pad_id = pad_token_id(loaded.tokenizer)
        _load(state, prompt_lengths, last_tokens, layer_deltas, row_keys, sampling, min_new_tokens, eos, pad_id)
        clock.mark()
        prefill_rows(model, state, prompt_token_ids, row_prompts, layer_deltas, positions, max_batch_tokens)
        clock.mark()
        info.mode = runner.mode() if graph is not None else "eager"
        steps = 0
        for _ in tqdm(range(max_new_tokens), desc="decode", unit="step", disable=not progress, leave=False):
            if stop_event is not None and stop_event.is_set():
                break
            if graph is not None:
                graph.replay()
            else:
                runner.run_step(state, kind)
            steps += 1
            if on_step is not None:
                on_step(steps, n_rows)
            if steps % FINISHED_CHECK_EVERY == 0 and bool(state.buffers["finished"].all()):
                break
        clock.mark()
        generated = state.buffers["out_tokens"][:n_rows, :steps].tolist()
        info.setup_s, info.prefill_s, info.decode_s = clock.seconds()
    info.steps = steps
    _LAST = info
    log.info(
        "fast decode: %d rows (bucket %d x %d slots), %d steps in %.2f s (%.2f ms/step, %s), prefill %.2f s",
        n_rows,
        info.bucket_rows,
        info.bucket_length,
        steps,
        info.decode_s,
        info.step_ms,
        info.mode,
        info.prefill_s,
    )
    eos_set = set(eos)
    return [_until_eos(row, eos_set) for row in generated]


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in eos:
            return tokens[: index + 1]
    return tokens


class _Clock:
    """Marks on the GPU's stream (CUDA events, so the host never waits for them) or the host clock on a CPU;
    `seconds` gives the spans between marks, the first from the clock's creation."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []
        self.mark()

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        if self.cuda:
            self.marks[-1].synchronize()
            return [begin.elapsed_time(end) / 1000 for begin, end in itertools.pairwise(self.marks)]
        return [end - begin for begin, end in itertools.pairwise(self.marks)]
