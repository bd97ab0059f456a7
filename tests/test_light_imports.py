"""The modules split out of models, tables, plots and metric_views keep their heavy imports lazy."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO_ROOT

MODEL_MODULES = ("models", "chat", "embedded_model")
VIEW_MODULES = (
    "tables",
    "html_blocks",
    "comparison_html",
    "instrument_html",
    "plots",
    "activation_plots",
    "sweep_overview",
)
PANDAS_MODULES = ("metric_views", "layer_scale_heatmaps")
NOTEBOOK_PACKAGES = ("plotly", "ipywidgets", "papermill", "nbformat", "nbclient", "IPython", "jupyterlab", "datasets")


def imported_after(modules: tuple[str, ...], watched: tuple[str, ...], blocked: tuple[str, ...] = ()) -> list[str]:
    """The `watched` top-level packages loaded after importing `chunky_utils.<module>` for each module, in a fresh
    interpreter where the `blocked` packages cannot be imported at all."""
    code = f"""
import importlib, importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {set(blocked)!r}:
            raise ImportError(f"blocked {{name}}")
sys.meta_path.insert(0, Block())
for module in {list(modules)!r}:
    importlib.import_module("chunky_utils." + module)
print(",".join(sorted(m for m in {list(watched)!r} if m in sys.modules)))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    return [name for name in result.stdout.strip().split(",") if name]


def test_every_split_module_imports_without_notebook_packages() -> None:
    modules = MODEL_MODULES + VIEW_MODULES + PANDAS_MODULES
    assert imported_after(modules, NOTEBOOK_PACKAGES, blocked=NOTEBOOK_PACKAGES) == []


def test_model_modules_import_neither_transformers_nor_table_libraries() -> None:
    assert imported_after(MODEL_MODULES, ("transformers", "gguf", "pandas", *NOTEBOOK_PACKAGES)) == []


def test_view_modules_import_pandas_and_plotly_only_when_drawing() -> None:
    assert imported_after(VIEW_MODULES, ("pandas", "plotly", "ipywidgets", "datasets")) == []
