"""The playground's instruments around a run: stop and progress, per-token readings taken while `generate`
runs, a layer x scale grid in one batched generation, and a next-token preview.

Everything here works through forward hooks on the loaded model, so the run itself stays the library's
(`pipeline.Runner`, `generation.generate_rows`): a hook on the first decoder layer sees every forward step
(extraction, prefill, each decoding step, scoring), checks a stop flag there and counts steps; a hook on
the steered layer reads the residual stream of the position fed at each decoding step, before the
steering delta is added (that reading depends only on the tokens, so baseline and steered rows are read
on one footing).

Modules: `watch` (`RunWatch`: stop, progress, per-step readings), `readings` (those readings matched to the
answers, token by token), `vectors` (vectors from the activation cache alone, relative magnitude), `grid`
(`generate_grid`) and `preview` (`next_token_preview`).
"""

from chunky_utils.instrument.grid import GridCell, GridResult, generate_grid, grid_rows
from chunky_utils.instrument.preview import NextTokenPreview, next_token_preview
from chunky_utils.instrument.readings import (
    TokenReading,
    eos_token_ids,
    match_readings,
    reading_for_text,
    token_pieces,
)
from chunky_utils.instrument.vectors import cached_means, cached_vector, relative_magnitude
from chunky_utils.instrument.watch import (
    READINGS_NEED_HOOKS,
    STAGES,
    RowReading,
    RunProgress,
    RunWatch,
    StopRequested,
)

__all__ = [
    "READINGS_NEED_HOOKS",
    "STAGES",
    "GridCell",
    "GridResult",
    "NextTokenPreview",
    "RowReading",
    "RunProgress",
    "RunWatch",
    "StopRequested",
    "TokenReading",
    "cached_means",
    "cached_vector",
    "eos_token_ids",
    "generate_grid",
    "grid_rows",
    "match_readings",
    "next_token_preview",
    "reading_for_text",
    "relative_magnitude",
    "token_pieces",
]
