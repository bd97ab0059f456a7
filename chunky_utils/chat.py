"""Chat templates and tokenisation: prompts as single user turns, token ids, left padding."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chat_template_hash(tokenizer: Any) -> str:
    """Short hash of the tokenizer's chat template (empty template when it has none)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return hashlib.sha256(str(template).encode()).hexdigest()[:12]


def format_prompts(tokenizer: Any, prompts: Sequence[str], add_generation_prompt: bool = True) -> list[str]:
    """Wrap each prompt as a single user turn through the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        log.warning("tokenizer has no chat template: prompts are used as plain text")
        return list(prompts)
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=add_generation_prompt
        )
        for prompt in prompts
    ]


def tokenize_prompts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids per text; chat-formatted texts carry their own special tokens."""
    add_special = not getattr(tokenizer, "chat_template", None)
    encoded = tokenizer(list(texts), add_special_tokens=add_special)["input_ids"]
    return [list(ids) for ids in encoded]


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad with: pad, else EOS, else UNK, else 0."""
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def left_pad(batch: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Left-padded input_ids, attention_mask and matching position_ids."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "position_ids": position_ids.to(device),
    }
