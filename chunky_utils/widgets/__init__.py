"""ipywidgets views: the steering playground (sliders over a loaded model) and viewers of finished results.

ipywidgets is imported inside the classes, so `import chunky_utils` works without it. Every view can be
driven from code: set a control's `.value`, call `generate_button.click()` (then `playground.wait()`: the
playground generates on a worker thread, so the kernel stays free for Stop), read `.table.value`.

Modules: `playground` (`SteeringPlayground`, assembled from `playground_controls`, `playground_callbacks`,
`playground_runs`, `playground_display` and `playground_save`), `comparison` (`ComparisonViewer`),
`cell_browser` (`MetricCellBrowser`) and `common` (the pager and paged view, the guarded button, small helpers).
"""

from chunky_utils.widgets.cell_browser import MetricCellBrowser
from chunky_utils.widgets.common import (
    GUARD_CSS,
    PAGE_SIZE,
    PagedView,
    Pager,
    dimmed,
    guarded_button_class,
    parse_numbers,
    subset_options,
)
from chunky_utils.widgets.comparison import ComparisonViewer, default_pair
from chunky_utils.widgets.playground import SteeringPlayground
from chunky_utils.widgets.playground_callbacks import ERROR_STYLE
from chunky_utils.widgets.playground_controls import (
    BUILTIN_PROMPTS,
    MAX_TOKENS_LIMIT,
    N_BUILTIN_PROMPTS,
    TYPED_PROMPTS,
)
from chunky_utils.widgets.playground_display import BAND_COLOURS

__all__ = [
    "BAND_COLOURS",
    "BUILTIN_PROMPTS",
    "ERROR_STYLE",
    "GUARD_CSS",
    "MAX_TOKENS_LIMIT",
    "N_BUILTIN_PROMPTS",
    "PAGE_SIZE",
    "TYPED_PROMPTS",
    "ComparisonViewer",
    "MetricCellBrowser",
    "PagedView",
    "Pager",
    "SteeringPlayground",
    "default_pair",
    "dimmed",
    "guarded_button_class",
    "parse_numbers",
    "subset_options",
]
