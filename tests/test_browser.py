"""Lab 05 in a real browser: JupyterLab + headless Chromium, Run All, then Start from the widgets.

Needs Debian's chromium (``apt-get install -y chromium``: /usr/bin/chromium); Playwright
drives it, but never downloads a browser of its own. A screenshot of the dashboard lands in
``test-output/browser/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from tests.conftest import descendants

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
NOTEBOOK = "05_strategy_explorer.ipynb"
PARAMETERS = {"world_size": 2, "steps": 3, "strategies": ["dp"]}
IDLE = "Python 3 (ipykernel) | Idle"
LOSS_TRACES = """() => {
    const plot = document.querySelector('.js-plotly-plot');
    return plot && plot.data ? plot.data.filter(t => t.xaxis === 'x').map(t => [t.name, t.x.length]) : [];
}"""

GANTT_TRACES = """() => document.querySelector('.js-plotly-plot').data
    .filter(t => t.xaxis === 'x5').map(t => t.name)"""

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason=f"{CHROMIUM} is missing: install it with `apt-get install -y chromium`",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyter(tmp_path):
    """A private JupyterLab on 127.0.0.1 serving a copy of lab 05 (small parameters)."""
    nb = nbformat.read(ROOT / "labs" / NOTEBOOK, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    values = "\n".join(f"{name} = {value!r}" for name, value in PARAMETERS.items())
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(values))  # as papermill injects them
    nbformat.write(nb, tmp_path / NOTEBOOK)
    config = tmp_path / ".jupyter"
    settings = config / "lab/user-settings/@jupyterlab/apputils-extension"
    settings.mkdir(parents=True)
    # The news pop-up would cover the notebook's output.
    news_off = {"fetchNews": "false", "checkForUpdates": False}
    (settings / "notification.jupyterlab-settings").write_text(json.dumps(news_off))
    env = dict(
        os.environ,
        JUPYTER_CONFIG_DIR=str(config),
        JUPYTER_RUNTIME_DIR=str(tmp_path / ".runtime"),
        IPYTHONDIR=str(tmp_path / ".ipython"),
    )
    port, token = free_port(), secrets.token_hex(16)
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1",
        f"--port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={tmp_path}", "--LabApp.expose_app_in_browser=True",
    ]  # fmt: skip
    if os.geteuid() == 0:
        command.append("--allow-root")
    log = open(tmp_path / "jupyter.log", "wb")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "jupyter.log").read_text()
                assert time.monotonic() < deadline, "JupyterLab did not start in 60 s"
                time.sleep(0.3)
        yield f"{base}/lab/tree/{NOTEBOOK}?token={token}"
    finally:
        stop_with_children(server)
        log.close()


def stop_with_children(server: subprocess.Popen) -> None:
    """Stop JupyterLab (it shuts its kernels down), then anything of ours still left, by PID."""
    children = descendants(server.pid)
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(20)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    deadline = time.monotonic() + 5  # ranks exit within a second of their kernel
    while (left := [p for p in children if Path(f"/proc/{p}").exists()]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def all_cells_run(url: str, height: int = 1800):
    """A headless Chromium page on the notebook at ``url``, Run All started."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": height})
            page.goto(url)
            # Idle shows before a kernel session exists; Run All then would be dropped.
            page.get_by_text(IDLE).wait_for(timeout=120_000)
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
            yield page
        finally:
            browser.close()


def test_dashboard_runs_in_jupyterlab(jupyter):
    out = ROOT / "test-output" / "browser"
    out.mkdir(parents=True, exist_ok=True)
    with all_cells_run(jupyter) as page:
        page.get_by_text("status: stopped").wait_for(timeout=240_000)
        page.get_by_text(IDLE).wait_for(timeout=60_000)
        before = dict(page.evaluate(LOSS_TRACES))
        assert before, "the loss plot shows no run after Run All"

        dashboard = page.locator(".jp-OutputArea-output", has=page.locator(".js-plotly-plot"))
        strategy = dashboard.locator(".widget-dropdown", has_text="strategy").locator("select")
        strategy.select_option(label="pipeline 1F1B")
        for name, value in {"micro-batches": "2", "steps": "5"}.items():
            box = dashboard.locator(".widget-inline-hbox", has_text=name).locator("input")
            box.fill(value)
            box.press("Enter")  # a text box sends its value to the kernel on Enter
        dashboard.locator("button.jupyter-button", has_text="Start").click()
        page.wait_for_function(
            f"() => ({LOSS_TRACES})().some(([name, n]) => name.includes('pp-1f1b') && n === 5)",
            timeout=180_000,
        )
        page.get_by_text("pp-1f1b/scratch gpt w2 done after 5 step(s)").wait_for(timeout=60_000)
        after = dict(page.evaluate(LOSS_TRACES))
        gantt = page.evaluate(GANTT_TRACES)
        dashboard.screenshot(path=out / "dashboard.png")
    new = {name: n for name, n in after.items() if name not in before}
    assert list(new.values()) == [5] and "pp-1f1b" in next(iter(new)), after
    assert gantt == ["forward", "backward"]
    assert {name: after[name] for name in before} == before  # earlier runs stay on the plot
