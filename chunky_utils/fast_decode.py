"""A decode loop at the hardware's pace: static KV cache, the one-token step captured as a CUDA graph.

On a CUDA GPU:
- prefill: every row's prompt but its last token runs packed (prompts end to end, block-diagonal flash
  attention, no padding); layers up to the first steered one run once per prompt, later ones once per
  row, and each layer's keys and values go straight into the decode cache;
- the KV cache is a fixed block per layer, [rows, cache length, kv heads, head dim]; row r's prompt fills
  slots from 0 and the token at step s goes to slot len(prompt) - 1 + s, its position id;
- attention reads the cache in place, the query heads of a key/value head acting as that head's queries,
  and reads only each row's filled slots (memory-efficient kernel with per-row key lengths; masked SDPA
  where that kernel is missing or disagrees);
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
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as functional
from torch import nn
from tqdm.auto import tqdm

from chunky_utils.chat import pad_token_id
from chunky_utils.layers import output_hidden, user_hooks
from chunky_utils.models import LoadedModel, find_decoder_layers
from chunky_utils.options import STEER_POSITIONS
from chunky_utils.packed_extraction import (
    flash_works,
    layer_keys_values,
    pack_chunks,
    packing_reason,
    routed_attention,
    run_packed_layer,
    varlen_attention,
)
from chunky_utils.prefill import cache_argument_name
from chunky_utils.sampling import SamplingSettings, _gumbel_from_bits, _mix32, _token_offsets, filter_logits, row_states

log = logging.getLogger(__name__)

FAST_ATTENTION = "chunky_fast_decode"
FAST_PREFILL = "chunky_fast_prefill"
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
MAX_STATES_PER_MODEL = 3
_UNSUPPORTED_ROPE = ("dynamic", "longrope")


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


# ---------------------------------------------------------------- the step


class _RowCache:
    """What a decoder layer's attention calls `update` on: row r's key and value go to slot `positions[r]`.

    The cache is [rows, length, kv heads, head dim]: a row's prompt from slot 0, its token at step s in
    slot len(prompt) - 1 + s, which is also that token's position id.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> None:
        self.keys, self.values, self.rows, self.positions = keys, values, rows, positions

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *_args: Any, **_kwargs: Any) -> Any:
        self.keys.index_put_((self.rows, self.positions), key_states[:, :, 0])
        self.values.index_put_((self.rows, self.positions), value_states[:, :, 0])
        return self.keys, self.values


def cache_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    kv_lengths: torch.Tensor | None = None,
    cu_queries: torch.Tensor | None = None,
    cu_keys: torch.Tensor | None = None,
    kernel: str = "",
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """One query per row against a [rows, length, kv heads, dim] cache, no copies of keys or values.

    With `kv_lengths` (int32, [rows]) a CUDA kernel reads only each row's first `kv_lengths[r]` slots, rows
    being its variable-length sequences (`cu_keys` = r * length): `kernel` 'flash' (grouped-query heads
    native, `cu_queries` = r) or 'efficient' (the memory-efficient kernel; the query heads sharing a
    key/value head act as its queries, `cu_queries` = r * groups). Otherwise SDPA with the boolean
    `attention_mask` ([rows, 1, 1, length]), the grouped queries again standing in for query positions.
    """
    rows, heads, _, dim = query.shape
    length, kv_heads = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    grouped = query.reshape(rows, kv_heads, groups, dim)
    if kv_lengths is not None and kernel == "flash":
        output = torch.ops.aten._flash_attention_forward(
            query.reshape(rows, heads, dim),
            key.view(rows * length, kv_heads, dim),
            value.view(rows * length, kv_heads, dim),
            cu_queries,
            cu_keys,
            1,
            length,
            0.0,
            False,
            False,
            scale=scaling,
            seqused_k=kv_lengths,
        )[0]
        return output.view(rows, 1, heads, dim), None
    if kv_lengths is not None:
        output = torch.ops.aten._efficient_attention_forward(
            grouped.transpose(1, 2).reshape(1, rows * groups, kv_heads, dim),
            key.view(1, rows * length, kv_heads, dim),
            value.view(1, rows * length, kv_heads, dim),
            None,
            cu_queries,
            cu_keys,
            groups,
            length,
            0.0,
            0,
            False,
            scale=scaling,
            seqlen_k=kv_lengths,
        )[0]
        return output.view(rows, groups, kv_heads, dim).transpose(1, 2).reshape(rows, 1, heads, dim), None
    output = functional.scaled_dot_product_attention(
        grouped, key.transpose(1, 2), value.transpose(1, 2), attn_mask=attention_mask, scale=scaling
    )
    return output.reshape(rows, heads, 1, dim).transpose(1, 2), None


def _prologue(
    embed: nn.Module,
    rotary: nn.Module,
    buffers: dict[str, torch.Tensor],
    kernel: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Embeddings, rotary cos/sin, and what tells attention the slots each row may read."""
    positions = buffers["positions"]
    hidden = embed(buffers["tokens"][:, None])
    cos, sin = rotary(hidden, positions[:, None])
    if kernel:
        lengths = (positions + 1).to(torch.int32)
        queries = buffers["cu_rows"] if kernel == "flash" else buffers["cu_queries"]
        reads = {"kv_lengths": lengths, "cu_queries": queries, "cu_keys": buffers["cu_keys"], "kernel": kernel}
        return hidden, cos, sin, {"attention_mask": None, **reads}
    mask = buffers["slots"][None, :] <= positions[:, None]
    return hidden, cos, sin, {"attention_mask": mask[:, None, None, :]}


def _layer_step(
    cache_keyword: str,
    layer: nn.Module,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    reads: dict[str, Any],
    cache: _RowCache,
    delta: torch.Tensor,
) -> torch.Tensor:
    """One decoder layer on one token per row, then its steering delta (as RowDeltaHook adds it)."""
    output = layer(hidden, position_embeddings=(cos, sin), use_cache=True, **reads, **{cache_keyword: cache})
    return output_hidden(output) + delta


def _epilogue(
    norm: nn.Module,
    lm_head: nn.Module,
    hidden: torch.Tensor,
    buffers: dict[str, torch.Tensor],
    kind: tuple[bool, int, float],
) -> None:
    """Logits, the shared-stream choice of the next token, and the counters' move to the next step."""
    greedy, top_k, top_p = kind
    step = buffers["step"]
    scores = lm_head(norm(hidden[:, -1])).float()
    eos_mask = buffers["eos_mask"]
    scores = scores.masked_fill(eos_mask & (step < buffers["min_new"]), float("-inf"))
    if not greedy:
        scores = filter_logits(scores / buffers["temperature"], top_k, top_p)
        states = buffers["row_states"].index_select(0, step).view(-1)
        scores = scores + _gumbel_from_bits(_mix32(states[:, None] ^ buffers["token_offsets"][None, :]))
    token = scores.argmax(dim=-1)
    buffers["out_tokens"].index_copy_(1, step, token[:, None])
    buffers["finished"].logical_or_(eos_mask[token])
    buffers["tokens"].copy_(token)
    buffers["positions"].add_(1)
    step.add_(1)


@dataclass
class _Functions:
    prologue: Callable[..., Any]
    layer: Callable[..., Any]
    epilogue: Callable[..., Any]


_EAGER = _Functions(_prologue, _layer_step, _epilogue)
_COMPILED: _Functions | None = None


def _compiled() -> _Functions:
    """The three pieces through torch.compile (one compiled layer serves every decoder layer)."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = _Functions(torch.compile(_prologue), torch.compile(_layer_step), torch.compile(_epilogue))
    return _COMPILED


@dataclass
class _Parts:
    """The modules one step touches, and the shapes its buffers take."""

    embed: nn.Module
    rotary: nn.Module
    layers: list[nn.Module]
    norm: nn.Module
    lm_head: nn.Module
    kv_heads: int
    groups: int
    head_dim: int
    hidden: int
    vocab: int
    dtype: torch.dtype
    device: torch.device
    cache_keyword: str

    @classmethod
    def of(cls, model: nn.Module) -> _Parts:
        body = model.model
        layers = list(find_decoder_layers(model))
        attention = layers[0].self_attn
        head_dim = int(attention.head_dim)
        lm_head = model.lm_head
        return cls(
            embed=body.embed_tokens,
            rotary=body.rotary_emb,
            layers=layers,
            norm=body.norm,
            lm_head=lm_head,
            kv_heads=int(attention.k_proj.out_features) // head_dim,
            groups=int(attention.q_proj.out_features) // int(attention.k_proj.out_features),
            head_dim=head_dim,
            hidden=int(body.embed_tokens.weight.shape[1]),
            vocab=int(lm_head.out_features),
            dtype=lm_head.weight.dtype,
            device=lm_head.weight.device,
            cache_keyword=cache_argument_name(layers[0]),
        )


@dataclass
class _State:
    """Static buffers of one (rows, cache length) bucket and the graphs captured over them."""

    rows: int
    length: int
    caches: list[_RowCache]
    deltas: torch.Tensor  # [layers, rows, 1, hidden]
    buffers: dict[str, torch.Tensor]
    graphs: dict[tuple[bool, int, float], Any] = field(default_factory=dict)

    @classmethod
    def allocate(cls, parts: _Parts, rows: int, length: int) -> _State:
        device = parts.device
        shape = (rows, length, parts.kv_heads, parts.head_dim)

        def longs(*size: int) -> torch.Tensor:
            return torch.zeros(size, dtype=torch.int64, device=device)

        buffers = {
            "tokens": longs(rows),
            "positions": longs(rows),
            "rows": torch.arange(rows, device=device),
            "slots": torch.arange(length, device=device),
            "cu_rows": torch.arange(rows + 1, dtype=torch.int32, device=device),
            "cu_queries": torch.arange(rows + 1, dtype=torch.int32, device=device) * parts.groups,
            "cu_keys": torch.arange(rows + 1, dtype=torch.int32, device=device) * length,
            "step": longs(1),
            "min_new": longs(1),
            "temperature": torch.ones(1, dtype=torch.float32, device=device),
            "finished": torch.ones(rows, dtype=torch.bool, device=device),
            "eos_mask": torch.zeros(parts.vocab, dtype=torch.bool, device=device),
            "out_tokens": longs(rows, length),
            "row_states": longs(length, rows),
            "token_offsets": _token_offsets(torch.arange(parts.vocab, device=device)),
        }
        caches = [
            _RowCache(
                torch.zeros(shape, dtype=parts.dtype, device=device),
                torch.zeros(shape, dtype=parts.dtype, device=device),
                buffers["rows"],
                buffers["positions"],
            )
            for _ in parts.layers
        ]
        deltas = torch.zeros(len(parts.layers), rows, 1, parts.hidden, dtype=parts.dtype, device=device)
        return cls(rows=rows, length=length, caches=caches, deltas=deltas, buffers=buffers)

    def step(self, parts: _Parts, functions: _Functions, kind: tuple[bool, int, float], kernel: str) -> None:
        """One decoding step for every row (what a graph captures)."""
        b = self.buffers
        hidden, cos, sin, reads = functions.prologue(parts.embed, parts.rotary, b, kernel)
        for index, layer in enumerate(parts.layers):
            hidden = functions.layer(
                parts.cache_keyword, layer, hidden, cos, sin, reads, self.caches[index], self.deltas[index]
            )
        functions.epilogue(parts.norm, parts.lm_head, hidden, b, kind)


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
class _Runner:
    """Per-model fast-decoding state: buckets' buffers (least recently used dropped), graphs, costs.

    On a GPU the step is tried, in this order, compiled with a length-aware attention kernel (`kernel`,
    the faster of those that agree with SDPA here), compiled with masked SDPA, then eager with masked
    SDPA: the first that runs is kept for the model.
    """

    parts: _Parts
    capture: bool
    compile: bool
    kernel: str
    kernel_ms: dict[str, float] = field(default_factory=dict)
    states: OrderedDict[tuple[int, int], _State] = field(default_factory=OrderedDict)
    pool: Any = None
    compile_s: float = 0.0
    captures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def state(self, rows: int, length: int) -> _State:
        key = (rows, length)
        if key in self.states:
            self.states.move_to_end(key)
            return self.states[key]
        while len(self.states) >= MAX_STATES_PER_MODEL:
            self.states.popitem(last=False)
        self.states[key] = _State.allocate(self.parts, rows, length)
        return self.states[key]

    def functions(self) -> _Functions:
        return _compiled() if self.compile else _EAGER

    def run_step(self, state: _State, kind: tuple[bool, int, float]) -> None:
        state.step(self.parts, self.functions(), kind, self.kernel)

    def mode(self) -> str:
        return ", ".join(
            part
            for part, used in (
                ("graph", self.capture),
                ("compiled", self.compile),
                (f"{self.kernel} attention", self.kernel),
            )
            if used
        )

    def _first_step(self, state: _State, kind: tuple[bool, int, float]) -> None:
        """Run one step, stepping down the ladder of configurations until one works."""
        while True:
            try:
                self.run_step(state, kind)
                return
            except Exception as exc:
                if self.kernel:
                    log.warning("fast decode: %s attention failed (%s); using masked SDPA", self.kernel, exc)
                    self.kernel = ""
                elif self.compile:
                    log.warning("fast decode: torch.compile failed (%s); capturing the eager step", exc)
                    self.compile = False
                else:
                    raise
                state.graphs.clear()

    def ensure_graph(self, state: _State, kind: tuple[bool, int, float], info: RunInfo) -> Any:
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


_RUNNERS: weakref.WeakKeyDictionary[nn.Module, _Runner] = weakref.WeakKeyDictionary()
_LAST = RunInfo()


def _runner(model: nn.Module) -> _Runner:
    runner = _RUNNERS.get(model)
    if runner is None:
        parts = _Parts.of(model)
        on_gpu = parts.device.type == "cuda"
        compile_wanted = on_gpu and os.environ.get("CHUNKY_FAST_DECODE_COMPILE", "1") != "0"
        dynamo_config = torch._dynamo.config
        limit_name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
        if compile_wanted and getattr(dynamo_config, limit_name) < 32:
            setattr(dynamo_config, limit_name, 32)  # buckets and sampling kinds: a few compiles each
        timings = _decode_kernel_timings(parts) if on_gpu else {}
        kernel = min(timings, key=lambda name: timings[name]) if timings else ""
        runner = _Runner(parts=parts, capture=on_gpu, compile=compile_wanted, kernel=kernel, kernel_ms=timings)
        _RUNNERS[model] = runner
    return runner


def _decode_kernel_timings(parts: _Parts) -> dict[str, float]:
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
    for kernel, cu_queries in (("flash", starts), ("efficient", starts * parts.groups)):

        def call(kernel: str = kernel, cu_queries: torch.Tensor = cu_queries) -> torch.Tensor:
            reads = {"kv_lengths": lengths.to(torch.int32), "cu_queries": cu_queries, "cu_keys": starts * length}
            return cache_attention(
                nn.Module(), query, key, value, None, scaling=parts.head_dim**-0.5, kernel=kernel, **reads
            )[0]

        try:
            error = float((call().float() - reference.float()).norm() / reference.float().norm())
        except Exception as exc:  # an older torch without per-row key lengths for this kernel
            log.info("fast decode: %s attention unavailable (%s)", kernel, str(exc).splitlines()[0][:200])
            continue
        if error > 1e-2:
            log.warning("fast decode: %s attention disagrees with SDPA (relative error %.3g): not used", kernel, error)
            continue
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(3):
            call()
        begin.record()
        for _ in range(20):
            call()
        end.record()
        end.synchronize()
        timings[kernel] = begin.elapsed_time(end) / 20
    log.info(
        "fast decode: length-aware attention kernels, ms per call at %d rows x %d slots: %s", rows, length, timings
    )
    return timings


def last_run_info() -> RunInfo:
    """Timings and buckets of the most recent `fast_generate` call."""
    return _LAST


def release(model: nn.Module) -> None:
    """Drop the model's static buffers and captured graphs (they are rebuilt on the next call)."""
    _RUNNERS.pop(model, None)


# ---------------------------------------------------------------- prefill


def _sink(cache: _RowCache, sink: tuple[torch.Tensor, ...], key: torch.Tensor, value: torch.Tensor) -> None:
    """Packed token `source[i]`'s key and value ([1, kv heads, tokens, dim]) to slot `slots[i]` of row `rows[i]`."""
    rows, slots, source = sink
    cache.keys.index_put_((rows, slots), key[0].transpose(0, 1).index_select(0, source))
    cache.values.index_put_((rows, slots), value[0].transpose(0, 1).index_select(0, source))


def _prefill_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    kv_sink: tuple[_RowCache, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Packed-sequence attention that first writes the keys and values to the decode cache.

    `kv_sink` = (cache, rows, slots, source): packed token `source[i]` goes to slot `slots[i]` of row `rows[i]`.
    """
    if kv_sink is not None:
        _sink(kv_sink[0], kv_sink[1:], key, value)
    return varlen_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)


def _run_packed(
    layers: Sequence[nn.Module],
    indices: range,
    hidden: torch.Tensor,
    position_ids: torch.Tensor,
    lengths: list[int],
    caches: list[_RowCache],
    sink: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    deltas: Mapping[int, torch.Tensor],
    rotary: nn.Module,
) -> torch.Tensor:
    """Layers `indices` over one packed sequence of `lengths`, keys and values sunk to the caches."""
    cos, sin = rotary(hidden, position_ids)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=hidden.device)
    packing = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lengths), "max_length_k": max(lengths)}
    for index in indices:
        if index == len(layers) - 1:  # the last layer's output is never read: only its keys and values
            _, keys, values = layer_keys_values(layers[index], hidden, cos, sin)
            _sink(caches[index], sink, keys, values)
            break
        hidden = run_packed_layer(
            layers[index], hidden, position_ids, cos, sin, {**packing, "kv_sink": (caches[index], *sink)}
        )
        if index in deltas:
            hidden = hidden + deltas[index]
    return hidden


def _prefill(
    model: nn.Module,
    state: _State,
    prompt_token_ids: Sequence[Sequence[int]],
    row_prompts: Sequence[int],
    layer_deltas: Mapping[int, torch.Tensor],
    positions: str,
    max_batch_tokens: int,
) -> None:
    """Every row's prompt but its last token into the cache (slots 0..), prompts packed, no padding.

    Layers up to the first steered one see the same input in every row of a prompt, so they run once per
    prompt; the later layers run once per row, from the shared output plus the row's delta. With prompt
    positions unsteered, one pass per prompt serves all its rows.
    """
    body = model.model
    layers = find_decoder_layers(model)
    device, dtype = state.deltas.device, state.deltas.dtype
    flash_works(device, dtype)
    steered = sorted(layer for layer, deltas in layer_deltas.items() if positions == "all" and bool(deltas.any()))
    split = steered[0] if steered else len(layers) - 1
    rows_of: dict[int, list[int]] = {}
    for row, prompt in enumerate(row_prompts):
        rows_of.setdefault(prompt, []).append(row)
    prompts = [prompt for prompt in rows_of if len(prompt_token_ids[prompt]) > 1]
    fan_out = [len(rows_of[prompt]) if steered else 1 for prompt in prompts]
    weights = [(len(prompt_token_ids[prompt]) - 1) * fan for prompt, fan in zip(prompts, fan_out, strict=True)]
    for chunk in pack_chunks(weights, max_batch_tokens):
        chunk_prompts = [prompts[i] for i in chunk]
        lengths = [len(prompt_token_ids[prompt]) - 1 for prompt in chunk_prompts]
        starts = [0, *itertools.accumulate(lengths)]
        flat = [token for prompt in chunk_prompts for token in prompt_token_ids[prompt][:-1]]
        ids = torch.tensor(flat, device=device)[None]
        position_ids = torch.cat([torch.arange(length) for length in lengths]).to(device)[None]
        rows, slots, source = [], [], []  # every prompt token, once for each row of its prompt
        row_lengths = []
        for prompt, start, length in zip(chunk_prompts, starts[:-1], lengths, strict=True):
            for row in rows_of[prompt]:
                rows.extend([row] * length)
                slots.extend(range(length))
                source.extend(range(start, start + length))
                row_lengths.append(length)
        rows_t, slots_t, source_t = (torch.tensor(values, device=device) for values in (rows, slots, source))
        hidden = body.embed_tokens(ids)
        trunk = range(split + 1)
        hidden = _run_packed(
            layers, trunk, hidden, position_ids, lengths, state.caches, (rows_t, slots_t, source_t), {}, body.rotary_emb
        )
        if not steered:
            continue
        row_deltas = {layer: layer_deltas[layer].to(device, dtype)[rows_t][None] for layer in steered}
        hidden = hidden[:, source_t] + row_deltas[split]
        tail = range(split + 1, len(layers))
        sink = (rows_t, slots_t, torch.arange(len(rows), device=device))
        _run_packed(
            layers,
            tail,
            hidden,
            position_ids[:, source_t],
            row_lengths,
            state.caches,
            sink,
            row_deltas,
            body.rotary_emb,
        )


# ---------------------------------------------------------------- the loop


def _eos_list(eos_token_ids: int | Iterable[int] | None) -> list[int]:
    if eos_token_ids is None:
        return []
    if isinstance(eos_token_ids, int):
        return [eos_token_ids]
    return [int(token) for token in eos_token_ids]


def _load(
    state: _State,
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
) -> list[list[int]]:
    """Each row's generated token ids, up to and including its first EOS.

    Row r continues prompt `row_prompts[r]` (token ids, chat template applied) with sampling key
    `row_keys[r]`; `layer_deltas[layer]` ([rows, hidden]) is added to that layer's output, at prompt and
    generated positions ('all') or at the last prompt token and every decoding step ('generated'), as
    steering.RowDeltaHook does. A set `stop_event` ends the loop before the next step.
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
    runner = _runner(model)
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
    with runner.lock:
        state = runner.state(bucket_rows(n_rows), bucket_length(info.width + max_new_tokens))
        info.bucket_rows, info.bucket_length = state.rows, state.length
        with routed_attention(model, FAST_ATTENTION, cache_attention):
            graph = runner.ensure_graph(state, kind, info)  # before the prefill: its warm-up writes the cache
        started = time.perf_counter()
        with routed_attention(model, FAST_PREFILL, _prefill_attention):
            _prefill(model, state, prompt_token_ids, row_prompts, layer_deltas, positions, max_batch_tokens)
        _synchronize(parts.device)
        setup_started = time.perf_counter()
        info.prefill_s = setup_started - started
        last_tokens = [int(prompt_token_ids[p][-1]) for p in row_prompts]
        pad_id = pad_token_id(loaded.tokenizer)
        _load(state, prompt_lengths, last_tokens, layer_deltas, row_keys, sampling, min_new_tokens, eos, pad_id)
        _synchronize(parts.device)
        decode_started = time.perf_counter()
        info.setup_s = decode_started - setup_started
        info.mode = runner.mode() if graph is not None else "eager"
        steps = 0
        stepping = nullcontext() if graph is not None else routed_attention(model, FAST_ATTENTION, cache_attention)
        with stepping:
            for _ in tqdm(range(max_new_tokens), desc="decode", unit="step", disable=not progress, leave=False):
                if stop_event is not None and stop_event.is_set():
                    break
                if graph is not None:
                    graph.replay()
                else:
                    runner.run_step(state, kind)
                steps += 1
                if steps % FINISHED_CHECK_EVERY == 0 and bool(state.buffers["finished"].all()):
                    break
        generated = state.buffers["out_tokens"][:n_rows, :steps].tolist()
        info.decode_s = time.perf_counter() - decode_started
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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
