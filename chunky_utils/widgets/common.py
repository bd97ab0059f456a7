"""Pieces every view shares: subset dropdown options, dimmed stale output, number lists typed in a box, the
guarded push button and the pager."""

from __future__ import annotations

import functools
import html
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from chunky_utils.data import TULU_SET_MAP
from chunky_utils.errors import UsageError
from chunky_utils.html_blocks import page_slice
from chunky_utils.tables import subset_title

PAGE_SIZE = 10


def subset_options(extra: Sequence[str | None] = ()) -> list[tuple[str, str]]:
    """Dropdown options for every Tulu key ('12 CoCoNot'), plus any other subset given (e.g. a prompt file)."""
    options = [(subset_title(key), key) for key in TULU_SET_MAP]
    for value in extra:
        if value is not None and value not in TULU_SET_MAP and value not in [v for _, v in options]:
            options.append((Path(str(value)).name, str(value)))
    return options


def dimmed(fragment: str, note: str) -> str:
    """An HTML fragment greyed out under a note, while a new one is made."""
    if not fragment:
        return f'<div class="chunky-stale" style="color:#777">{html.escape(note)}</div>'
    return (
        f'<div class="chunky-stale"><div style="color:#777;font-style:italic">{html.escape(note)}</div>'
        f'<div style="opacity:0.35;pointer-events:none">{fragment}</div></div>'
    )


def parse_numbers(text: str, kind: type, what: str) -> list[Any]:
    """'8, 16 24' -> [8, 16, 24] (ints or floats); a UsageError naming `what` on anything else."""
    values = []
    for part in text.replace(",", " ").split():
        try:
            values.append(kind(part))
        except ValueError:
            raise UsageError(f"{what}: {part!r} is not a number") from None
    if not values:
        raise UsageError(f"{what}: give at least one value, e.g. 8, 16")
    return list(dict.fromkeys(values))


GUARD_CSS = (
    "<style>.chunky-guarded.mod-active{pointer-events:none;opacity:0.55;cursor:progress}"
    ".chunky-guarded.mod-active::after{content:' (running)'}</style>"
)
"""Makes a pressed guarded button inert in the browser at once: a ToggleButton gets `mod-active` on the
click itself, before any message reaches the kernel, so a second click of a double click goes nowhere."""


@functools.cache
def guarded_button_class() -> type:
    """A ToggleButton used as a push button that turns inert in the browser the moment it is pressed (its
    `mod-active` class and GUARD_CSS), so a double click cannot start a second run before the kernel hears
    of the first; the kernel also ignores presses while a run is going on, and calls `release()` after it."""
    import ipywidgets as widgets

    class GuardedButton(widgets.ToggleButton):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(value=False, **kwargs)
            self._handlers: list[Callable[[Any], None]] = []
            self.add_class("chunky-guarded")
            self.observe(self._pressed, names="value")

        def on_click(self, handler: Callable[[Any], None]) -> None:
            self._handlers.append(handler)

        def click(self) -> None:
            """Press it, as a click in the browser does (nothing while it is disabled or pressed)."""
            if not self.disabled and not self.value:
                self.value = True

        def release(self) -> None:
            self.value = False
            self.disabled = False

        def _pressed(self, change: dict[str, Any]) -> None:
            if change["new"]:
                for handler in self._handlers:
                    handler(self)

    return GuardedButton


class Pager:
    """Previous / next buttons and a 'page 2 of 5' label; `on_change(page)` redraws."""

    def __init__(self, on_change: Callable[[int], None], page_size: int = PAGE_SIZE) -> None:
        import ipywidgets as widgets

        self.page = 0
        self.n_pages = 1
        self.page_size = page_size
        self.on_change = on_change
        self.previous = widgets.Button(description="previous", icon="chevron-left", layout={"width": "110px"})
        self.next = widgets.Button(description="next", icon="chevron-right", layout={"width": "110px"})
        self.label = widgets.HTML()
        self.previous.on_click(lambda _b: self.go(self.page - 1))
        self.next.on_click(lambda _b: self.go(self.page + 1))
        self.view = widgets.HBox([self.previous, self.label, self.next])
        self.view.add_class("chunky-pager")
        self.set_rows(0)

    def set_rows(self, n_rows: int) -> None:
        _, _, self.page, self.n_pages = page_slice(n_rows, self.page, self.page_size)
        self.label.value = f'<span style="padding:0 8px">page {self.page + 1} of {self.n_pages}</span>'
        self.previous.disabled = self.page == 0
        self.next.disabled = self.page >= self.n_pages - 1
        self.view.layout.display = "flex" if self.n_pages > 1 else "none"

    def go(self, page: int) -> None:
        self.page = min(max(0, page), self.n_pages - 1)
        self.on_change(self.page)


class PagedView:
    """A table shown a page at a time under its `pager`: a changed choice starts again at page one, and
    Jupyter displays `view`. Subclasses build both and define `render()`."""

    pager: Pager
    view: Any

    def render(self) -> str:
        raise NotImplementedError

    def _on_change(self, _change: dict[str, Any]) -> None:
        self.pager.page = 0
        self.render()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.view._repr_mimebundle_(**kwargs)
