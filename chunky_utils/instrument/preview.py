"""The next-token preview: the likeliest next tokens unsteered and steered, from one batched forward."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from chunky_utils.chat import format_prompts, tokenize_prompts
from chunky_utils.models import LoadedModel
from chunky_utils.steering import add_to_layers


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
