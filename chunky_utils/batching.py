"""Greedy batching of ordered indices: the one loop behind padded extraction batches and generation rows."""

from __future__ import annotations

from collections.abc import Callable, Iterable


def greedy_batches(order: Iterable[int], closes: Callable[[list[int], int], bool]) -> list[list[int]]:
    """`order` cut into consecutive batches: the open batch closes before `index` when `closes(batch, index)`."""
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        if current and closes(current, index):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches
