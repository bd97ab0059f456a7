"""Sampling with common random numbers: a row's noise depends only on (seed, prompt, step).

Gumbel-max sampling: `argmax(logits / T + g)` with `g = -log(-log(u))` draws from `softmax(logits / T)`.
The uniforms `u` come from a counter-based hash of (seed, prompt key, step, token id), so they do not
depend on batch size, batch composition, padding, the other scales in the batch, or the caller. Every
row of one prompt (baseline and each scale) sees the same noise: a zero vector gives identical texts at
any temperature, and a steered row differs from its baseline only through the steering.
Top-k and top-p remove tokens before the noise is added, so they work unchanged.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

_MASK32 = 0xFFFFFFFF
# odd multipliers below 2**31, so a 32-bit value times one stays inside int64 on every device
_MULTIPLIER_A = 0x7FEB352D
_MULTIPLIER_B = 0x2C1B3C6D
_TOKEN_STRIDE = 0x61C88647

SAMPLER_NAME = "gumbel-max shared stream v1"
"""Recorded with results and in the baseline cache key: another sampler gives other draws."""


@dataclass(frozen=True)
class SamplingSettings:
    """Temperature 0 is greedy; top_k 0 and top_p 1.0 keep every token."""

    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def prompt_key(prompt: str) -> int:
    """A stable 31-bit key for a prompt's text (the same in every process and on every machine)."""
    return int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:4], "little") & 0x7FFFFFFF


def _mix32(values: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) on int64 tensors holding values in [0, 2**32)."""
    values = values ^ (values >> 16)
    values = (values * _MULTIPLIER_A) & _MASK32
    values = values ^ (values >> 15)
    values = (values * _MULTIPLIER_B) & _MASK32
    return values ^ (values >> 16)


def row_states(seed: int, keys: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """One 32-bit state per row from (seed, prompt key, step); `step` may be a tensor (a captured graph's buffer)."""
    seed_state = _mix32(torch.tensor(int(seed) & _MASK32, dtype=torch.int64))
    states = _mix32((keys.to(torch.int64) & _MASK32) ^ seed_state.to(keys.device))
    step_values = step.to(torch.int64) if isinstance(step, torch.Tensor) else torch.tensor(int(step))
    step_state = _mix32((step_values.to(keys.device) + _TOKEN_STRIDE) & _MASK32)
    return _mix32(states ^ step_state)


def _token_offsets(tokens: torch.Tensor) -> torch.Tensor:
    return _mix32((tokens.to(torch.int64) * _TOKEN_STRIDE) & _MASK32)


def _uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    # 23 bits: (b + 0.5) / 2**23 lies in [2**-24, 1 - 2**-24], all exact in float32, so u is never 0 or 1
    return ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def _gumbel_from_bits(bits: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(_uniform_from_bits(bits)))


# Every Gumbel value lies in [-2.81, 16.63] (the extremes of the uniforms above): a token more than this
# below the row's best score cannot win the argmax, so the noise is computed only where it can matter.
_GUMBEL_SPAN = 20.0


def uniform_noise(seed: int, keys: torch.Tensor, step: int | torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniforms in (0, 1), shape [rows, vocab]: a pure function of (seed, key, step, token id)."""
    states = row_states(seed, keys, step)
    bits = _mix32(states[:, None] ^ _token_offsets(torch.arange(vocab_size, device=keys.device))[None, :])
    return _uniform_from_bits(bits)


def gumbel_noise(seed: int, keys: torch.Tensor, step: int | torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Standard Gumbel noise, shape [rows, vocab], from `uniform_noise` (static shapes: fit for captured graphs)."""
    return -torch.log(-torch.log(uniform_noise(seed, keys, step, vocab_size)))


def add_gumbel_noise(
    scores: torch.Tensor, seed: int, keys: torch.Tensor, step: int | torch.Tensor, dense: bool = False
) -> torch.Tensor:
    """`scores + gumbel_noise`, where tokens that cannot win stay as they are unless `dense`.

    The argmax is the same either way; the sparse form draws noise for a few hundred tokens a row
    instead of the whole vocabulary (what makes it cheap on a CPU).
    """
    if dense:
        return scores + gumbel_noise(seed, keys, step, scores.shape[-1])
    best = scores.max(dim=-1, keepdim=True).values
    rows, tokens = torch.nonzero(scores >= best - _GUMBEL_SPAN, as_tuple=True)
    states = row_states(seed, keys, step)
    noise = _gumbel_from_bits(_mix32(states[rows] ^ _token_offsets(tokens)))
    perturbed = scores.clone()
    perturbed[rows, tokens] += noise
    return perturbed


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits with tokens outside the top k, or outside the smallest set holding `top_p` of the mass, at -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        mass_before = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1) - torch.softmax(sorted_logits, dim=-1)
        drop_sorted = mass_before >= top_p  # the most likely token always stays (mass before it is 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def perturbed_scores(
    logits: torch.Tensor, settings: SamplingSettings, keys: torch.Tensor, step: int | torch.Tensor
) -> torch.Tensor:
    """Scores whose argmax is the sampled token (or the greedy token at temperature 0)."""
    scores = logits.float()
    if settings.greedy:
        return scores
    scores = filter_logits(scores / settings.temperature, settings.top_k, settings.top_p)
    return add_gumbel_noise(scores, settings.seed, keys, step, dense=scores.is_cuda)


def sample_tokens(
    logits: torch.Tensor, settings: SamplingSettings, keys: torch.Tensor, step: int | torch.Tensor
) -> torch.Tensor:
    """The next token of every row, [rows]."""
    return perturbed_scores(logits, settings, keys, step).argmax(dim=-1)


class SharedStreamProcessor(LogitsProcessor):
    """A transformers logits processor: with greedy decoding, `generate` then samples from the shared stream.

    `row_keys[i]` is the prompt key of batch row i (rows with the same key get the same noise);
    `prompt_width` is the width of the `input_ids` given to `generate`, so the step is the number of
    tokens generated so far.
    """

    def __init__(self, settings: SamplingSettings, row_keys: Sequence[int], prompt_width: int) -> None:
        self.settings = settings
        self.row_keys = torch.tensor(list(row_keys), dtype=torch.int64)
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_width
        return perturbed_scores(scores, self.settings, self.row_keys.to(scores.device), step)
