"""Real-browser check of the steering playground: JupyterLab headless, Debian's Chromium driven by Playwright.

    .venv/bin/python scripts/browser_check_playground.py --out results/browser_check

Starts JupyterLab on a free port with a random token in a scratch folder holding a copy of
notebooks/02_steering_playground.ipynb (parameters injected as papermill would), opens it in /usr/bin/chromium,
runs every cell, drags the scale slider, clicks Generate and waits for the steered column to change. Writes
OUT/playground_before.png, OUT/playground_after.png and OUT/report.json; exits 0 only when the steered texts
in the page changed (and the baseline texts did not). Every wait is bounded; the whole run takes about a minute.
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
        from chunky_utils.models import convert_embedded_model

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


def check_in_browser(url: str, out: Path, timeout_s: float, fraction: float) -> dict[str, Any]:
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
            report["scale_before"] = page.locator(".chunky-scale .widget-readout").first.inner_text().strip()
            playground.screenshot(path=str(out / "playground_before.png"))

            report["scale_after"] = drag_scale_slider(page, fraction)
            if report["scale_after"] == report["scale_before"]:
                raise CheckFailed(f"dragging the scale slider left it at {report['scale_before']}")
            page.locator(".chunky-playground .chunky-generate").click(timeout=remaining_ms())
            mark("slider moved, Generate clicked")
            page.wait_for_function(
                """([selector, scale]) => {
                    const status = document.querySelector(selector);
                    return status && status.innerText.includes('Generated:') && status.innerText.includes(scale);
                }""",
                arg=[".chunky-playground .chunky-status", f"scale {float(report['scale_after']):g}"],
                timeout=remaining_ms(),
            )
            mark("generated")
            report["status_after"] = page.locator(".chunky-playground .chunky-status").first.inner_text().strip()
            report["steered_after"] = texts(page, STEERED_CELLS)
            report["baseline_after"] = texts(page, BASELINE_CELLS)
            report["highlighted_words_after"] = page.locator(".chunky-playground .chunky-added").count()
            playground.scroll_into_view_if_needed()
            playground.screenshot(path=str(out / "playground_after.png"))
            page.screenshot(path=str(out / "page_after.png"))
        finally:
            browser.close()
    report["steered_changed"] = report["steered_after"] != report["steered_before"]
    report["baseline_unchanged"] = report["baseline_after"] == report["baseline_before"]
    report["browser_seconds"] = round(time.monotonic() - started, 1)
    return report


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
    parser.add_argument("--timeout", type=float, default=140.0, help="seconds for everything in the browser")
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
        report.update(check_in_browser(url, out, args.timeout, args.drag_to))
    except Exception as exc:
        report["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    finally:
        if process is not None:
            stop_lab(process, base_url, token)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report["screenshots"] = sorted(str(p) for p in out.glob("*.png"))
    from chunky_utils.cache import atomic_write_json

    atomic_write_json(out / "report.json", report)
    passed = "error" not in report and report.get("steered_changed") and report.get("baseline_unchanged")
    print(json.dumps({k: report.get(k) for k in ("scale_before", "scale_after", "steered_changed", "error")}))
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
