"""The notebook helper packages (`notebook/`, `widgets/`, `instrument/`): short modules, light imports, and the
package paths the notebooks and the README use still offering their names."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

PACKAGES = ("notebook", "widgets", "instrument")
MAX_LINES = 400
HEAVY = ("pandas", "plotly", "ipywidgets", "papermill")


def helper_modules() -> list[str]:
    """Every module of the helper packages, as dotted names."""
    found = []
    for package in PACKAGES:
        folder = REPO_ROOT / "chunky_utils" / package
        found += [f"chunky_utils.{package}.{info.name}" for info in pkgutil.iter_modules([str(folder)])]
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_every_helper_module_is_under_the_line_limit(package: str) -> None:
    lengths = {
        path.name: len(path.read_text().splitlines()) for path in (REPO_ROOT / "chunky_utils" / package).glob("*.py")
    }
    assert lengths and {name: n for name, n in lengths.items() if n >= MAX_LINES} == {}


def test_helper_modules_import_no_table_plot_or_widget_library() -> None:
    modules = helper_modules()
    assert len(modules) >= 15
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n    importlib.import_module(name)\n"
        f"print(sorted(name for name in {HEAVY!r} if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_offers_the_names_of_its_modules(package: str) -> None:
    """`from chunky_utils.widgets import SteeringPlayground` and the like (the README's paths) keep working."""
    module = importlib.import_module(f"chunky_utils.{package}")
    assert module.__all__ and [name for name in module.__all__ if not hasattr(module, name)] == []


def test_the_names_the_readme_and_docs_use_are_offered() -> None:
    from chunky_utils.instrument import RunWatch, generate_grid, next_token_preview
    from chunky_utils.notebook import cli_command, scale_bands, use_project_root, with_typed_prompts
    from chunky_utils.widgets import ComparisonViewer, MetricCellBrowser, SteeringPlayground

    named = [RunWatch, generate_grid, next_token_preview, cli_command, scale_bands, use_project_root]
    assert all(callable(item) for item in [*named, with_typed_prompts, ComparisonViewer, MetricCellBrowser])
    assert SteeringPlayground.__module__ == "chunky_utils.widgets.playground"
