"""Real-browser check of the steering playground: JupyterLab headless, Debian's Chromium driven by Playwright.

    .venv/bin/python scripts/browser_check_playground.py --out results/browser_check

Starts JupyterLab on a free port with a random token in a scratch folder holding a copy of
notebooks/02_steering_playground.ipynb (parameters injected as papermill would), opens it in /usr/bin/chromium,
runs every cell, then, as a user would:
- drags the scale slider and double-clicks Generate: the button must be disabled in the page at once, one
  generation must run, and the steered column change while the (greedy) baseline stays;
- types a prompt of its own, presses Generate, opens the Tokens tab and finds the tokens coloured;
- runs a small layer x scale grid;
- sets a long generation, presses Stop while it runs: the page must say "Stopped" within 2 s and the kernel
  be idle.
Writes OUT/*.png (playground_before, playground_after, tokens, grid, stopped, page_after) and OUT/report.json;
exits 0 only when every check held. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "notebooks" / "02_steering_playground.ipynb"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
STEERED_CELLS = ".chunky-playground .chunky-side-by-side td.steered"
BASELINE_CELLS = ".chunky-playground .chunky-side-by-side td.baseline"
STATUS = ".chunky-playground .chunky-status"
MY_PROMPT = "Name three colours of the rainbow."


class CheckFailed(RuntimeError):
    """The page did not behave as expected; the message says where."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def prepare_lab_folder(root: Path, model: str, layer: int, scale: float) -> Path:
    """A scratch folder with the playground notebook (parameters injected), lab settings and a cache."""
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    cache = root / "cache"
    cache.mkdir(parents=True)
    if model.startswith("embedded:"):
        from chunky_utils.embedded_model import convert_embedded_model

        converted = convert_embedded_model(REPO_ROOT / "cache")  # once per clone; later runs reuse it
        (cache / "models").mkdir()
        (cache / "models" / converted.name).symlink_to(converted, target_is_directory=True)
    parameters = {
        "model": model,
        "target_subset": "12",
        "baseline_subset": "0",
        "layer": layer,
        "scale": scale,
        "n_samples": 4,
        "max_tokens": 12,
        "temperature": 0.0,
        "data_source": "bundled",
        "output_dir": str(root / "results"),
        "cache_dir": str(cache),
        "device": "cpu",
        "metrics": False,  # no scoring, where RunConfig has `metrics`; the notebook ignores other names
    }
    notebook = parameterize_notebook(load_notebook_node(str(NOTEBOOK)), parameters)
    path = root / "playground.ipynb"
    nbformat.write(notebook, path)
    settings = root / ".settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}), encoding="utf-8"
    )
    return path


def start_lab(root: Path, port: int, token: str, log_path: Path) -> subprocess.Popen[bytes]:
    """JupyterLab serving `root`, in its own process group, with config, runtime and settings inside `root`."""
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(root / ".jupyter"),
        "JUPYTER_RUNTIME_DIR": str(root / ".runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(root / ".settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(root / ".workspaces"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
        *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
    ]
    log = log_path.open("wb")
    return subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_lab(base_url: str, token: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise CheckFailed(f"JupyterLab exited with status {process.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{base_url}/api/status?token={token}", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise CheckFailed(f"JupyterLab did not answer within {timeout:.0f} s")


def stop_lab(process: subprocess.Popen[bytes], base_url: str, token: str) -> None:
    """Ask the server to shut down (kernels included); end its process group if it does not."""
    try:
        request = urllib.request.Request(
            f"{base_url}/api/shutdown", method="POST", headers={"Authorization": f"token {token}"}
        )
        urllib.request.urlopen(request, timeout=5).close()
        process.wait(timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        pass
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def texts(page: Any, selector: str) -> list[str]:
    return [text.strip() for text in page.locator(selector).all_inner_texts()]


def run_all_cells(page: Any) -> None:
    """Run > Run All Cells, through the menu bar (the command palette as a fallback)."""
    try:
        page.locator("#jp-MainMenu .lm-MenuBar-itemLabel", has_text="Run").first.click(timeout=10_000)
        page.locator('.lm-Menu-item[data-command="notebook:run-all-cells"]').first.click(timeout=10_000)
    except Exception:
        page.keyboard.press("Escape")
        page.keyboard.press("Control+Shift+C")
        page.keyboard.type("Run All Cells")
        page.keyboard.press("Enter")


def drag_scale_slider(page: Any, fraction: float) -> str:
    """Drag the scale slider's handle to `fraction` of its track; return the readout afterwards."""
    slider = page.locator(".chunky-playground .chunky-scale")
    track = slider.locator(".noUi-target").first
    handle = slider.locator(".noUi-handle").first
    track.scroll_into_view_if_needed()
    track_box, handle_box = track.bounding_box(), handle.bounding_box()
    if not track_box or not handle_box:
        raise CheckFailed("the scale slider is not visible")
    page.mouse.move(handle_box["x"] + handle_box["width"] / 2, handle_box["y"] + handle_box["height"] / 2)
    page.mouse.down()
    target_x = track_box["x"] + track_box["width"] * fraction
    page.mouse.move(target_x, handle_box["y"] + handle_box["height"] / 2, steps=12)
    page.mouse.up()
    return slider.locator(".widget-readout").first.inner_text().strip()


def status_text(page: Any) -> str:
    return page.locator(STATUS).first.inner_text().strip()


def wait_for_status(page: Any, text: str, timeout_ms: float) -> None:
    page.wait_for_function(
        "([selector, text]) => { const s = document.querySelector(selector); return s && s.innerText.includes(text); }",
        arg=[STATUS, text],
        timeout=timeout_ms,
    )


def kernel_states(base_url: str, token: str) -> list[str]:
    """The execution state of every running kernel, from the server's REST API."""
    with urllib.request.urlopen(f"{base_url}/api/kernels?token={token}", timeout=5) as response:
        return [kernel.get("execution_state", "?") for kernel in json.loads(response.read())]


def set_number(page: Any, selector: str, value: int) -> None:
    box = page.locator(f"{selector} input").first
    box.fill(str(value))
    box.press("Enter")


def check_in_browser(
    url: str, out: Path, timeout_s: float, fraction: float, base_url: str, token: str
) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    started = time.monotonic()

    def remaining_ms() -> float:
        left = timeout_s - (time.monotonic() - started)
        if left <= 0:
            raise CheckFailed(f"out of time ({timeout_s:.0f} s)")
        return left * 1000

    report: dict[str, Any] = {"timeline_s": {}}

    def mark(step: str) -> None:
        report["timeline_s"][step] = round(time.monotonic() - started, 1)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.goto(url, wait_until="domcontentloaded", timeout=remaining_ms())
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=remaining_ms())
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=remaining_ms())
            mark("kernel idle")
            run_all_cells(page)
            page.wait_for_selector(STEERED_CELLS, timeout=remaining_ms())
            mark("notebook ran")
            playground = page.locator(".chunky-playground").first
            playground.scroll_into_view_if_needed()
            report["steered_before"] = texts(page, STEERED_CELLS)
            report["baseline_before"] = texts(page, BASELINE_CELLS)
            report["status_before"] = status_text(page)
            report["scale_before"] = page.locator(".chunky-scale .widget-readout").first.inner_text().strip()
            playground.screenshot(path=str(out / "playground_before.png"))

            # 1. a dragged slider and a double click on Generate: one run
            report["scale_after"] = drag_scale_slider(page, fraction)
            if report["scale_after"] == report["scale_before"]:
                raise CheckFailed(f"dragging the scale slider left it at {report['scale_before']}")
            generate = page.locator(".chunky-playground .chunky-generate").first
            box = generate.bounding_box()
            if not box:
                raise CheckFailed("the Generate button is not visible")
            page.mouse.dblclick(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            report["generate_inert_at_once"] = generate.evaluate(
                "e => e.disabled || (e.classList.contains('mod-active')"
                " && getComputedStyle(e).pointerEvents === 'none')"
            )
            mark("Generate double-clicked")
            wait_for_status(page, "Run 1: generated", remaining_ms())
            page.wait_for_timeout(2500)  # a second run, had one started, would show by now
            report["status_after"] = status_text(page)
            report["one_generation"] = "Run 1: generated" in report["status_after"] and generate.is_enabled()
            mark("generated")
            report["steered_after"] = texts(page, STEERED_CELLS)
            report["baseline_after"] = texts(page, BASELINE_CELLS)
            report["highlighted_words_after"] = page.locator(".chunky-playground .chunky-added").count()
            report["preview_after"] = page.locator(".chunky-playground .chunky-preview").first.inner_text()[:300]
            report["guidance_after"] = page.locator(".chunky-playground .chunky-guidance").first.inner_text().strip()
            playground.scroll_into_view_if_needed()
            playground.screenshot(path=str(out / "playground_after.png"))

            # 2. a prompt of one's own, and its tokens coloured
            prompts_box = page.locator(".chunky-playground .chunky-prompts-box textarea").first
            prompts_box.click()
            prompts_box.type(MY_PROMPT, delay=5)
            generate.click(timeout=remaining_ms())  # the box sends its text as it loses focus, before the click
            wait_for_status(page, "Run 2: generated", remaining_ms())
            report["prompt_source_after_typing"] = page.locator(
                ".chunky-playground .chunky-prompt-source select"
            ).first.evaluate("select => select.selectedOptions[0].textContent")
            report["my_prompt_rows"] = texts(page, ".chunky-playground .chunky-side-by-side td.prompt")
            page.locator(".chunky-playground .lm-TabBar-tab", has_text="Tokens").first.click()
            page.wait_for_selector(".chunky-playground .chunky-token", timeout=remaining_ms())
            report["coloured_tokens"] = page.locator(".chunky-playground .chunky-token[data-value]").count()
            report["token_title"] = page.locator(".chunky-playground .chunky-token[data-value]").first.get_attribute(
                "title"
            )
            page.locator(".chunky-playground .chunky-tokens").first.scroll_into_view_if_needed()
            playground.screenshot(path=str(out / "tokens.png"))
            mark("tokens coloured")

            # 3. a small grid
            page.locator(".chunky-playground .lm-TabBar-tab", has_text="Grid").first.click()
            page.locator(".chunky-playground .chunky-grid-button").first.click(timeout=remaining_ms())
            wait_for_status(page, "grid of", remaining_ms())
            report["grid_cells"] = page.locator(".chunky-playground .chunky-grid-cell").count()
            playground.screenshot(path=str(out / "grid.png"))
            mark("grid")

            # 4. Stop during a long generation
            page.locator(".chunky-playground .lm-TabBar-tab", has_text="Side by side").first.click()
            set_number(page, ".chunky-playground .chunky-max-tokens", 2000)
            page.wait_for_timeout(500)
            generate.click(timeout=remaining_ms())
            page.wait_for_function(
                """() => { const l = document.querySelector('.chunky-playground .chunky-progress-label');
                           const m = l && l.innerText.match(/token (\\d+) of 2000/); return m && +m[1] >= 5; }""",
                timeout=remaining_ms(),
            )
            report["progress_during"] = page.locator(".chunky-playground .chunky-progress-label").first.inner_text()
            report["table_dimmed_during"] = page.locator(".chunky-playground .chunky-table .chunky-stale").count() > 0
            report["kernel_during_generation"] = kernel_states(base_url, token)
            pressed = time.monotonic()
            page.locator(".chunky-playground .chunky-stop").first.click(timeout=5000)
            wait_for_status(page, "Stopped", 10_000)
            report["stop_answer_s"] = round(time.monotonic() - pressed, 2)
            page.wait_for_timeout(300)
            report["kernel_after_stop"] = kernel_states(base_url, token)
            report["status_stopped"] = status_text(page)
            playground.screenshot(path=str(out / "stopped.png"))
            page.screenshot(path=str(out / "page_after.png"))
            mark("stopped")
        except Exception:
            page.screenshot(path=str(out / "failure.png"))  # what the page showed when a check failed
            raise
        finally:
            browser.close()
    report["steered_changed"] = report["steered_after"] != report["steered_before"]
    report["baseline_unchanged"] = report["baseline_after"] == report["baseline_before"]
    report["browser_seconds"] = round(time.monotonic() - started, 1)
    return report


def failures(report: dict[str, Any]) -> list[str]:
    """What did not hold, in words (empty when the page behaved)."""
    checks = {
        "the steered column did not change": report.get("steered_changed"),
        "the greedy baseline changed": report.get("baseline_unchanged"),
        "Generate did not turn inert at once on the first click": report.get("generate_inert_at_once"),
        "a double click did not run exactly one generation": report.get("one_generation"),
        "the typed prompt is not what ran": report.get("my_prompt_rows") == [MY_PROMPT],
        "typing did not select 'your prompts'": "your prompts"
        in str(report.get("prompt_source_after_typing")).replace("\xa0", " "),
        "no coloured tokens": (report.get("coloured_tokens") or 0) > 3,
        "the grid is not 3 x 3": report.get("grid_cells") == 9,
        "the old table was not dimmed during generation": report.get("table_dimmed_during"),
        "Stop took 2 s or more": (report.get("stop_answer_s") or 99) < 2.0,
        "the kernel was not idle after Stop": report.get("kernel_after_stop") == ["idle"],
    }
    return [what for what, held in checks.items() if not held]


def interrupt_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so `finally` still stops JupyterLab and its kernel."""

    def handler(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "browser_check", help="screenshots here")
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct", help="model id for the playground")
    parser.add_argument("--layer", type=int, default=12, help="steering layer (must exist in the model)")
    parser.add_argument("--scale", type=float, default=0.0, help="scale of the first run, before the drag")
    parser.add_argument("--drag-to", type=float, default=0.8, help="where to drop the handle, 0..1 of the track")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for everything in the browser")
    parser.add_argument("--keep", action="store_true", help="keep the scratch JupyterLab folder")
    args = parser.parse_args(argv)
    if not CHROMIUM.is_file():
        print(f"skipped: {CHROMIUM} not found (apt-get install chromium)", file=sys.stderr)
        return 77
    interrupt_on_sigterm()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="chunky-lab-"))
    token = secrets.token_hex(16)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    report: dict[str, Any] = {"model": args.model, "layer": args.layer, "lab_log": str(out / "jupyterlab.log")}
    process = None
    try:
        notebook = prepare_lab_folder(root, args.model, args.layer, args.scale)
        process = start_lab(root, port, token, out / "jupyterlab.log")
        wait_for_lab(base_url, token, process, timeout=45)
        url = f"{base_url}/lab/tree/{notebook.name}?token={token}"
        report.update(check_in_browser(url, out, args.timeout, args.drag_to, base_url, token))
    except Exception as exc:
        report["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    finally:
        if process is not None:
            stop_lab(process, base_url, token)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report["screenshots"] = sorted(str(p) for p in out.glob("*.png"))
    report["failures"] = [] if "error" in report else failures(report)
    from chunky_utils.cache import atomic_write_json

    atomic_write_json(out / "report.json", report)
    passed = "error" not in report and not report["failures"]
    keys = ("scale_before", "scale_after", "stop_answer_s", "failures", "error")
    print(json.dumps({k: report.get(k) for k in keys}))
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
