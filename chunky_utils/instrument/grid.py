"""A layer x scale grid: every prompt at every (layer, scale), plus its baseline, in one batched generation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from chunky_utils.collapse import collapse_reason
from chunky_utils.generation import GenerationSettings, generate_rows
from chunky_utils.models import LoadedModel
from chunky_utils.steering import SteeringVector


@dataclass(frozen=True)
class GridCell:
    """One steered answer of the grid (layer None: the unsteered baseline)."""

    prompt_index: int
    layer: int | None
    scale: float
    text: str
    collapse: str | None


@dataclass(frozen=True)
class GridResult:
    prompts: list[str]
    layers: list[int]
    scales: list[float]
    cells: list[GridCell]
    seconds: float

    def cell(self, prompt_index: int, layer: int | None, scale: float) -> GridCell:
        for cell in self.cells:
            if cell.prompt_index == prompt_index and cell.layer == layer and (layer is None or cell.scale == scale):
                return cell
        raise KeyError((prompt_index, layer, scale))


def grid_rows(
    vector: SteeringVector, n_prompts: int, layers: Sequence[int], scales: Sequence[float]
) -> tuple[list[int], list[tuple[int | None, float]], dict[int, torch.Tensor]]:
    """Rows for a layer x scale grid: per prompt a baseline row then one row per (layer, scale); the delta of a
    row sits at its own layer, zeros at the other hooked layers. Returns (row prompts, row cells, deltas)."""
    cells: list[tuple[int | None, float]] = [(None, 0.0)] + [(layer, float(s)) for layer in layers for s in scales]
    row_prompts = [p for p in range(n_prompts) for _ in cells]
    row_cells = [cell for _ in range(n_prompts) for cell in cells]
    hidden = vector.at(layers[0]).numel()
    deltas = {layer: torch.zeros(len(row_cells), hidden) for layer in layers}
    for row, (layer, scale) in enumerate(row_cells):
        if layer is not None:
            deltas[layer][row] = vector.at(layer).detach().float().cpu() * scale
    return row_prompts, row_cells, deltas


def generate_grid(
    loaded: LoadedModel,
    vector: SteeringVector,
    prompts: Sequence[str],
    layers: Sequence[int],
    scales: Sequence[float],
    settings: GenerationSettings,
) -> GridResult:
    """Every prompt at every (layer, scale), plus its baseline, in one batched `generate_rows` call."""
    if not prompts or not layers or not scales:
        raise ValueError("a grid needs at least one prompt, one layer and one scale")
    layers = sorted({int(layer) for layer in layers})
    scales = sorted({float(scale) for scale in scales})
    row_prompts, row_cells, deltas = grid_rows(vector, len(prompts), layers, scales)
    output = generate_rows(loaded, prompts, row_prompts, deltas, settings, progress=False)
    cells = []
    for prompt, (layer, scale), text in zip(row_prompts, row_cells, output.texts, strict=True):
        tokens = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        cells.append(GridCell(prompt, layer, scale, text, collapse_reason(tokens)))
    return GridResult(list(prompts), layers, scales, cells, output.seconds)
