"""Per-token readings matched to the answers: each answer cut into token pieces, each piece with the reading
the run watch took when that token was fed back."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from chunky_utils.chat import format_prompts, tokenize_prompts
from chunky_utils.instrument.watch import RowReading
from chunky_utils.models import LoadedModel


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
