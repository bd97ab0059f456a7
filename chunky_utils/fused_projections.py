"""A decoder layer's step with its q/k/v and gate/up products fused: two matrix products where there were five.

Decoding reads every weight once per step, and five skinny products (q, k, v, gate, up) run further from
the memory bandwidth than two wide ones (q|k|v, gate|up). `fuse_layers` concatenates each layer's
weights once (a copy: the model itself is left as it is), and `fused_layer_step` runs the layer as
transformers' Llama, Mistral, Qwen2 and Qwen3 layers do, with the concatenated weights.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as functional
from torch import nn

log = logging.getLogger(__name__)

FUSE_ENVIRONMENT = "CHUNKY_FUSED_PROJECTIONS"
MEMORY_HEADROOM = 2.0  # fuse only if free device memory is at least this many times the copies' size


@dataclass
class FusedLayer:
    """One layer's concatenated weights, and how its q|k|v product splits."""

    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    gate_up_weight: torch.Tensor
    q_size: int
    kv_size: int

    @property
    def nbytes(self) -> int:
        tensors = [self.qkv_weight, self.gate_up_weight] + ([self.qkv_bias] if self.qkv_bias is not None else [])
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def fusion_reason(layers: Sequence[nn.Module]) -> str | None:
    """Why these layers cannot be fused (None = they can)."""
    for layer in layers:
        attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        linears = [getattr(attention, name, None) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
        linears += [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(linear, nn.Linear) for linear in linears):
            return "a layer lacks linear q/k/v/o and gate/up/down projections"
        if len({linear.bias is None for linear in linears[:3]}) > 1 or linears[3].bias is not None:
            return "q/k/v biases are mixed"
        if linears[4].bias is not None or linears[5].bias is not None:
            return "the MLP has biases"
        if not all(hasattr(layer, name) for name in ("input_layernorm", "post_attention_layernorm")):
            return "a layer lacks input/post-attention norms"
    return None


def _fuse(layer: nn.Module) -> FusedLayer:
    attention, mlp = layer.self_attn, layer.mlp
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    biases = [projection.bias for projection in projections]
    return FusedLayer(
        qkv_weight=torch.cat([projection.weight for projection in projections]).detach(),
        qkv_bias=None if biases[0] is None else torch.cat(biases).detach(),
        gate_up_weight=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
        q_size=int(attention.q_proj.out_features),
        kv_size=int(attention.k_proj.out_features),
    )


def fuse_layers(layers: Sequence[nn.Module], force: bool = False) -> list[FusedLayer] | None:
    """Every layer's concatenated weights, or None (and why, in the log) to step through the modules.

    Without `force`, only on a CUDA device with room for the copies; CHUNKY_FUSED_PROJECTIONS=0 turns it off.
    """
    reason = fusion_reason(layers)
    weight = layers[0].self_attn.q_proj.weight
    if reason is None and not force:
        if os.environ.get(FUSE_ENVIRONMENT, "1") == "0":
            reason = f"switched off by {FUSE_ENVIRONMENT}=0"
        elif weight.device.type != "cuda":
            reason = "fusing pays on a GPU only"
        else:
            needed = sum(
                (p.q_proj.weight.numel() + 2 * p.k_proj.weight.numel()) * weight.element_size()
                for p in (layer.self_attn for layer in layers)
            ) + sum(2 * layer.mlp.gate_proj.weight.numel() * weight.element_size() for layer in layers)
            free, _ = torch.cuda.mem_get_info(weight.device)
            if free < MEMORY_HEADROOM * needed:
                reason = (
                    f"{needed / 2**30:.1f} GiB of fused copies would leave too little of {free / 2**30:.1f} GiB free"
                )
    if reason is not None:
        log.info("fast decode: q/k/v and gate/up products not fused (%s)", reason)
        return None
    fused = [_fuse(layer) for layer in layers]
    log.info("fast decode: q/k/v and gate/up fused (%.2f GiB of copies)", sum(f.nbytes for f in fused) / 2**30)
    return fused


def rotary_function(layer: nn.Module) -> Callable[..., Any]:
    """The modeling module's `apply_rotary_pos_emb` for this layer's architecture."""
    return sys.modules[type(layer.self_attn).__module__].apply_rotary_pos_emb


def fused_layer_step(
    attention_function: Callable[..., Any],
    rotate: Callable[..., Any],
    layer: nn.Module,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    gate_up_weight: torch.Tensor,
    sizes: tuple[int, int],
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    reads: dict[str, Any],
    cache: Any,
    delta: torch.Tensor,
) -> torch.Tensor:
    """One decoder layer on one token per row with fused products, then its steering delta."""
    attention, mlp = layer.self_attn, layer.mlp
    q_size, kv_size = sizes
    rows = hidden.shape[0]
    head_dim = int(attention.head_dim)
    projected = functional.linear(layer.input_layernorm(hidden), qkv_weight, qkv_bias)
    query, key, value = projected.split([q_size, kv_size, kv_size], dim=-1)
    query, key = query.view(rows, 1, -1, head_dim), key.view(rows, 1, -1, head_dim)
    if hasattr(attention, "q_norm"):  # Qwen3 normalises each head's query and key
        query, key = attention.q_norm(query), attention.k_norm(key)
    query, key = rotate(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
    value = value.view(rows, 1, -1, head_dim).transpose(1, 2)
    keys, values = cache.update(key, value)
    output, _ = attention_function(attention, query, keys, values, scaling=attention.scaling, **reads)
    hidden = hidden + attention.o_proj(output.reshape(rows, 1, -1))
    gate, up = functional.linear(layer.post_attention_layernorm(hidden), gate_up_weight).chunk(2, dim=-1)
    return hidden + mlp.down_proj(mlp.act_fn(gate) * up) + delta
