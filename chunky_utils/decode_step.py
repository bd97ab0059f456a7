"""The fast path's one-token decoding step: its static buffers, attention over the cache, and its pieces.

`DecodeState.step` runs the prologue (embeddings, rotary, what attention may read), each decoder layer
through one function shared by all layers (compiled once on a GPU), then the head and the shared-stream
choice of the next token; a CUDA graph captures it (`chunky_utils.decode_runner`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as functional
from torch import nn

from chunky_utils.fused_projections import FusedLayer, fuse_layers, fused_layer_step, rotary_function
from chunky_utils.layers import output_hidden
from chunky_utils.models import find_decoder_layers
from chunky_utils.prefill import cache_argument_name
from chunky_utils.sampling import _gumbel_from_bits, _mix32, _token_offsets, filter_logits
from chunky_utils.split_attention import split_decode_attention


class RowCache:
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
    native, `cu_queries` = r), 'efficient' (the memory-efficient kernel; the query heads sharing a
    key/value head act as its queries, `cu_queries` = r * groups) or 'split' (chunky_utils.split_attention,
    several programs per row's keys). Otherwise SDPA with the boolean
    `attention_mask` ([rows, 1, 1, length]), the grouped queries again standing in for query positions.
    """
    rows, heads, _, dim = query.shape
    length, kv_heads = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    grouped = query.reshape(rows, kv_heads, groups, dim)
    if kv_lengths is not None and kernel == "split":
        scale = scaling if scaling is not None else dim**-0.5
        output = split_decode_attention(query.reshape(rows, heads, dim), key, value, kv_lengths, scale)
        return output.view(rows, 1, heads, dim), None
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
    cache: RowCache,
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
class StepFunctions:
    prologue: Callable[..., Any]
    layer: Callable[..., Any]
    epilogue: Callable[..., Any]
    fused_layer: Callable[..., Any]


EAGER_STEP = StepFunctions(_prologue, _layer_step, _epilogue, fused_layer_step)
_COMPILED: StepFunctions | None = None


def compiled_step() -> StepFunctions:
    """The pieces through torch.compile (one compiled layer serves every decoder layer)."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = StepFunctions(
            *(torch.compile(piece) for piece in (_prologue, _layer_step, _epilogue, fused_layer_step))
        )
    return _COMPILED


@dataclass
class StepParts:
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
    fused: list[FusedLayer] | None = None  # q|k|v and gate|up concatenated (chunky_utils.fused_projections)
    rotate: Callable[..., Any] | None = None

    @classmethod
    def of(cls, model: nn.Module, fuse: bool | None = None) -> StepParts:
        """The model's parts; `fuse` None fuses products where it pays (a GPU with room), True always, False never."""
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
            fused=None if fuse is False else fuse_layers(layers, force=bool(fuse)),
            rotate=rotary_function(layers[0]),
        )


@dataclass
class DecodeState:
    """Static buffers of one (rows, cache length) bucket and the graphs captured over them."""

    rows: int
    length: int
    caches: list[RowCache]
    deltas: torch.Tensor  # [layers, rows, 1, hidden]
    buffers: dict[str, torch.Tensor]
    graphs: dict[tuple[bool, int, float], Any] = field(default_factory=dict)

    @classmethod
    def allocate(cls, parts: StepParts, rows: int, length: int) -> DecodeState:
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
            RowCache(
                torch.zeros(shape, dtype=parts.dtype, device=device),
                torch.zeros(shape, dtype=parts.dtype, device=device),
                buffers["rows"],
                buffers["positions"],
            )
            for _ in parts.layers
        ]
        deltas = torch.zeros(len(parts.layers), rows, 1, parts.hidden, dtype=parts.dtype, device=device)
        return cls(rows=rows, length=length, caches=caches, deltas=deltas, buffers=buffers)

    def step(self, parts: StepParts, functions: StepFunctions, kind: tuple[bool, int, float], kernel: str) -> None:
        """One decoding step for every row (what a graph captures)."""
        b = self.buffers
        hidden, cos, sin, reads = functions.prologue(parts.embed, parts.rotary, b, kernel)
        for index, layer in enumerate(parts.layers):
            cache, delta = self.caches[index], self.deltas[index]
            if parts.fused is None:
                hidden = functions.layer(parts.cache_keyword, layer, hidden, cos, sin, reads, cache, delta)
                continue
            fused = parts.fused[index]
            hidden = functions.fused_layer(
                cache_attention,
                parts.rotate,
                layer,
                fused.qkv_weight,
                fused.qkv_bias,
                fused.gate_up_weight,
                (fused.q_size, fused.kv_size),
                hidden,
                cos,
                sin,
                reads,
                cache,
                delta,
            )
        functions.epilogue(parts.norm, parts.lm_head, hidden, b, kind)
