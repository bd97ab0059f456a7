"""Last-token activations from packed prompts: no padded position is ever computed.

Prompts are laid end to end in chunks of at most `max_batch_tokens` tokens (one sequence per chunk,
position ids restarting at each prompt), and attention is block-diagonal: on a CUDA GPU one variable-length
flash-attention call per layer (`cu_seqlens`, grouped-query heads read as they are), elsewhere one causal
SDPA call per prompt. The layers run one by one up to the deepest one read; that last layer computes its
queries, attention output and MLP only on each prompt's last token, since nothing else of it is read.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as functional
from torch import nn

from chunky_utils.layers import output_hidden
from chunky_utils.models import find_decoder_layers

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")
"""Architectures whose body is embed -> rotary -> decoder layers (-> norm -> lm_head), full attention."""
VARLEN_ATTENTION = "chunky_varlen"
_FLASH_OK: dict[tuple[str, torch.dtype], bool] = {}  # flash_works' verdicts
_COMPILED: dict[str, Any] = {}  # the compiled packed layer, once made
COMPILE_SECONDS: dict[str, float] = {}  # first call of each compiled variant (compile included), for reports


def packing_reason(model: nn.Module) -> str | None:
    """Why the packed path cannot run this model (None = it can); the padded path serves the rest."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not one packing knows ({', '.join(SUPPORTED_MODEL_TYPES)})"
    body = getattr(model, "model", None)
    if body is None or not all(hasattr(body, name) for name in ("embed_tokens", "layers", "rotary_emb")):
        return "the model body lacks embed_tokens/layers/rotary_emb"
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return "the model has sliding-window attention layers"
    if getattr(body.rotary_emb, "rope_type", "default") in ("dynamic", "longrope"):
        return "its rotary embedding changes with the sequence length"
    if len({parameter.device for parameter in model.parameters()}) > 1:
        return "the model is spread over several devices"
    return None


@contextmanager
def routed_attention(model: nn.Module, name: str, function: Callable[..., Any]) -> Iterator[None]:
    """Route the model's attention through `function` (registered with transformers as `name`) in the block."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, sdpa_mask)
    previous = model.config._attn_implementation
    switch = _switch_attention(model)
    switch(name)
    try:
        yield
    finally:
        switch(previous)


_ONE_CONFIG: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _switch_attention(model: nn.Module) -> Callable[[str], None]:
    """How to set the model's attention implementation: where every submodel shares the model's config (the
    Llama-style bodies packing knows), on that config; else through `set_attn_implementation`, which walks
    every module on each call (about 1 ms for an 8B model)."""
    from transformers import PreTrainedModel

    if model not in _ONE_CONFIG:
        _ONE_CONFIG[model] = all(
            module.config is model.config for module in model.modules() if isinstance(module, PreTrainedModel)
        ) and not getattr(model.config, "sub_configs", None)
    if _ONE_CONFIG[model]:

        def on_config(name: str) -> None:
            model.config._attn_implementation = name

        return on_config
    return model.set_attn_implementation  # type: ignore[return-value]


def pack_chunks(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices in order, in chunks whose lengths sum to at most `max_tokens` (a longer one gets its own chunk)."""
    chunks: list[list[int]] = []
    current: list[int] = []
    filled = 0
    for index, length in enumerate(lengths):
        if current and filled + length > max_tokens:
            chunks.append(current)
            current, filled = [], 0
        current.append(index)
        filled += length
    if current:
        chunks.append(current)
    return chunks


def packed_positions(lengths: torch.Tensor) -> torch.Tensor:
    """Position ids of sequences of `lengths` laid end to end, each counting from 0."""
    starts = lengths.cumsum(0) - lengths
    return torch.arange(int(lengths.sum())) - starts.repeat_interleave(lengths)


def sequence_bounds(lengths: torch.Tensor) -> torch.Tensor:
    """Where each of the sequences of `lengths` starts, then the total: [0, l0, l0 + l1, ...]."""
    return torch.cat([torch.zeros(1, dtype=lengths.dtype), lengths.cumsum(0)])


def to_device_at_once(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Int64 CPU tensors to the device in one copy. A copy from pageable host memory waits until the GPU has
    finished its queue, so copying each chunk's indices when it is reached would leave the GPU idle while the
    host builds them; from pinned memory (on CUDA) the copy is queued without a wait."""
    joined = torch.cat(list(tensors))
    sent = joined.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else joined.to(device)
    return list(sent.split([tensor.numel() for tensor in tensors]))


def flash_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether variable-length flash attention runs and agrees with the per-prompt loop here (probed once)."""
    key = (str(device), dtype)
    if key not in _FLASH_OK:
        works = False
        if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
            generator = torch.Generator(device=device).manual_seed(0)
            query, key_, value = (
                torch.randn(9, heads, 64, device=device, dtype=dtype, generator=generator) for heads in (4, 2, 2)
            )
            bounds = [0, 3, 9]
            cu = torch.tensor(bounds, dtype=torch.int32, device=device)
            try:
                fast = torch.ops.aten._flash_attention_forward(query, key_, value, cu, cu, 6, 6, 0.0, True, False)[0]
                reference = _per_prompt(query, key_, value, bounds, bounds, None)
                works = bool((fast.float() - reference.float()).norm() <= 1e-2 * reference.float().norm())
            except Exception as exc:  # an older torch or a build without flash kernels
                log.warning("variable-length flash attention unavailable (%s): one SDPA call per prompt", exc)
        _FLASH_OK[key] = works
    return _FLASH_OK[key]


def _per_prompt(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_q: list[int],
    cu_k: list[int],
    scale: float | None,
) -> torch.Tensor:
    """The same attention, one SDPA call per prompt (queries aligned to the end of their prompt's keys)."""
    groups = query.shape[1] // key.shape[1]
    outputs = []
    for index in range(len(cu_q) - 1):
        q = query[cu_q[index] : cu_q[index + 1]].transpose(0, 1)
        k = key[cu_k[index] : cu_k[index + 1]].transpose(0, 1).repeat_interleave(groups, dim=0)
        v = value[cu_k[index] : cu_k[index + 1]].transpose(0, 1).repeat_interleave(groups, dim=0)
        n_q, n_k = q.shape[1], k.shape[1]
        visible = torch.arange(n_k, device=q.device)[None, :] <= torch.arange(n_q, device=q.device)[:, None] + n_k - n_q
        outputs.append(functional.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale).transpose(0, 1))
    return torch.cat(outputs)


def varlen_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function for one packed sequence.

    Takes [1, heads, tokens, dim] and `cu_seq_lens_*` (prompt boundaries); returns [1, tokens, heads, dim].
    """
    if cu_seq_lens_q is None or cu_seq_lens_k is None:
        raise ValueError("varlen attention needs cu_seq_lens_q and cu_seq_lens_k")
    q, k, v = (tensor[0].transpose(0, 1).contiguous() for tensor in (query, key, value))
    if _FLASH_OK.get((str(q.device), q.dtype), False):
        output = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, 0.0, True, False, scale=scaling
        )[0]
    else:
        output = _per_prompt(q, k, v, cu_seq_lens_q.tolist(), cu_seq_lens_k.tolist(), scaling)
    return output[None], None


def _packed_layer(
    layer: nn.Module,
    hidden: torch.Tensor,
    position_ids: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    packing: dict[str, Any],
) -> torch.Tensor:
    output = layer(hidden, attention_mask=None, position_ids=position_ids, position_embeddings=(cos, sin), **packing)
    return output_hidden(output)


def run_packed_layer(
    layer: nn.Module,
    hidden: torch.Tensor,
    position_ids: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    packing: dict[str, Any],
) -> torch.Tensor:
    """One decoder layer over a packed sequence: compiled once for every layer and length on a CUDA GPU
    where variable-length flash attention works (fused norms and elementwise work; CHUNKY_PACKED_COMPILE=0
    keeps it eager), eager elsewhere."""
    # without variable-length flash attention (fp32, say) attention loops over prompts by their bounds,
    # which would recompile for every chunk: that layer runs eagerly
    flash = _FLASH_OK.get((str(hidden.device), hidden.dtype), False)
    wanted = hidden.is_cuda and flash and os.environ.get("CHUNKY_PACKED_COMPILE", "1") != "0"
    if not wanted or _COMPILED.get("failed"):
        return _packed_layer(layer, hidden, position_ids, cos, sin, packing)
    if "layer" not in _COMPILED:
        _COMPILED["layer"] = torch.compile(_packed_layer, dynamic=True)
    variant = "packed layer" + (" writing the decode cache" if "kv_sink" in packing else "")
    started = time.perf_counter()
    try:
        hidden = _COMPILED["layer"](layer, hidden, position_ids, cos, sin, packing)
    except Exception as exc:  # no working compiler here: the eager layer gives the same numbers
        log.warning("packed layers: torch.compile failed (%s); running them eagerly", exc)
        _COMPILED["failed"] = True
        return _packed_layer(layer, hidden, position_ids, cos, sin, packing)
    if variant not in COMPILE_SECONDS:
        torch.cuda.synchronize(hidden.device)
        COMPILE_SECONDS[variant] = time.perf_counter() - started
        log.info("packed layers: %s compiled in %.1f s", variant, COMPILE_SECONDS[variant])
    return hidden


def _rotary_function(attention: nn.Module) -> Callable[..., Any]:
    return sys.modules[type(attention).__module__].apply_rotary_pos_emb


def layer_keys_values(
    layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decoder layer's normed input and its rotated keys and values ([1, kv heads, tokens, dim]), as the
    layer's attention computes them, without the rest of the layer."""
    attention = layer.self_attn
    normed = layer.input_layernorm(hidden)
    key = attention.k_proj(normed).view(1, hidden.shape[1], -1, attention.head_dim)
    value = attention.v_proj(normed).view(1, hidden.shape[1], -1, attention.head_dim)
    if hasattr(attention, "k_norm"):
        key = attention.k_norm(key)
    key, _ = _rotary_function(attention)(key.transpose(1, 2), key.transpose(1, 2), cos, sin)
    return normed, key, value.transpose(1, 2)


def _last_tokens_only(
    layer: nn.Module,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cu: torch.Tensor,
    last: torch.Tensor,
    longest: int,
) -> torch.Tensor:
    """A decoder layer's output at each prompt's last token ([prompts, hidden]); keys and values from every token."""
    attention = layer.self_attn
    normed, key, value = layer_keys_values(layer, hidden, cos, sin)
    n_prompts = last.shape[0]
    query = attention.q_proj(normed[:, last]).view(1, n_prompts, -1, attention.head_dim)
    if hasattr(attention, "q_norm"):
        query = attention.q_norm(query)
    query = query.transpose(1, 2)
    query, _ = _rotary_function(attention)(query, query, cos[:, last], sin[:, last])
    cu_q = torch.arange(n_prompts + 1, dtype=cu.dtype, device=cu.device)
    output, _ = varlen_attention(
        attention,
        query,
        key,
        value,
        None,
        scaling=attention.scaling,
        cu_seq_lens_q=cu_q,
        cu_seq_lens_k=cu,
        max_length_q=1,
        max_length_k=longest,
    )
    residual = hidden[:, last] + attention.o_proj(output.reshape(1, n_prompts, -1))
    return (residual + layer.mlp(layer.post_attention_layernorm(residual)))[0]


def _queue_set(
    model: nn.Module, token_ids: Sequence[Sequence[int]], wanted: list[int], max_batch_tokens: int
) -> list[torch.Tensor]:
    """One set's chunks queued on the device; their reads come back as CPU tensors (pinned, filled without a
    wait on CUDA: valid once the device has synchronised)."""
    body = model.model
    decoder_layers = find_decoder_layers(model)
    device = body.embed_tokens.weight.device
    deepest = wanted[-1]
    chunks = pack_chunks([len(ids) for ids in token_ids], max_batch_tokens)
    lengths = [torch.tensor([len(token_ids[i]) for i in chunk]) for chunk in chunks]
    host: list[torch.Tensor] = []
    for chunk, sizes in zip(chunks, lengths, strict=True):
        host += [torch.tensor([token for i in chunk for token in token_ids[i]]), packed_positions(sizes)]
        host.append(sequence_bounds(sizes))
    sent = to_device_at_once(host, device)
    read_chunks: list[torch.Tensor] = []
    for index, sizes in enumerate(lengths):
        ids, positions, bounds = sent[3 * index : 3 * index + 3]
        ids, positions, cu = ids[None], positions[None], bounds.to(torch.int32)
        last = bounds[1:] - 1
        longest = int(sizes.max())
        hidden = body.embed_tokens(ids)
        cos, sin = body.rotary_emb(hidden, positions)
        packing = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
        read: dict[int, torch.Tensor] = {}
        for layer_index in range(deepest + 1):
            layer = decoder_layers[layer_index]
            if layer_index == deepest:
                read[layer_index] = _last_tokens_only(layer, hidden, cos, sin, cu, last, longest).float()
                break
            hidden = run_packed_layer(layer, hidden, positions, cos, sin, packing)
            if layer_index in wanted:
                read[layer_index] = hidden[0, last].float()
        stacked = torch.stack([read[layer_index] for layer_index in wanted], dim=1)
        read_chunks.append(stacked.to("cpu", non_blocking=device.type == "cuda"))  # pinned: no wait here
    return read_chunks


@torch.inference_mode()
def extract_packed_sets(
    model: nn.Module,
    token_id_sets: Iterable[Sequence[Sequence[int]]],
    layers: Sequence[int],
    max_batch_tokens: int,
) -> list[torch.Tensor]:
    """Activations [prompts, len(layers), hidden] (float32, CPU) on each prompt's last token, one per set.

    Each set is queued on the device as soon as the iterable yields its token ids, and nothing waits for the
    device before every set is queued: an iterable that tokenizes lazily prepares set k + 1 on the host while
    the GPU runs set k.
    """
    wanted = sorted(set(layers))
    body = model.model
    device = body.embed_tokens.weight.device
    flash_works(device, body.embed_tokens.weight.dtype)
    hidden_size = body.embed_tokens.weight.shape[1]
    queued: list[list[torch.Tensor]] = []
    with routed_attention(model, VARLEN_ATTENTION, varlen_attention):
        for token_ids in token_id_sets:
            queued.append(_queue_set(model, token_ids, wanted, max_batch_tokens) if token_ids else [])
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    empty = torch.empty(0, len(wanted), hidden_size)
    return [torch.cat(chunks) if chunks else empty for chunks in queued]  # pack_chunks keeps the prompts' order


def extract_packed(
    model: nn.Module, token_ids: Sequence[Sequence[int]], layers: Sequence[int], max_batch_tokens: int
) -> torch.Tensor:
    """Activations [prompts, len(layers), hidden] (float32, CPU) on each prompt's last token."""
    return extract_packed_sets(model, [token_ids], layers, max_batch_tokens)[0]
