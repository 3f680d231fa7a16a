"""Labs 01, 03, 04, 05 and 08 in a real browser, as a learner uses them: JupyterLab and
headless Chromium in a 1280x800 window, the file browser open.

Each lab: Run All (small parameters, injected as papermill does), then its widgets. Every error
shows beside the widget that hit it, never only in the Log Console; the figures, legends,
labels and tables fit the output area; no rank process is left after the notebook's last cell.
Then each notebook, saved with its widgets' state, becomes a handout (``scripts/handouts.py``)
that opens with the network blocked and shows every figure, the dashboard's last state too.

Needs Debian's chromium (``apt-get install -y chromium``: /usr/bin/chromium); Playwright
drives it, but never downloads a browser of its own. Screenshots land in ``test-output/browser/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import nbformat
import pytest

from pdlab.lab.dashboard import PLOTTED_RUNS
from tests.conftest import descendants, worker_pids

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import handouts  # noqa: E402 (scripts/ is no package)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1280, "height": 800}
LABS = {
    "01_data_parallel": {
        "world_size": 2, "steps": 4, "use_solutions": True, "article_epochs": 1,
        "scaling_world_sizes": [2],
    },
    "03_pipeline_parallel": {
        "world_size": 2, "steps": 1, "micro_batches": 2, "model": "mlp", "batch_size": 16,
        "use_solutions": True,
    },
    "04_sharded": {"world_size": 2, "steps": 1, "use_solutions": True},
    "05_strategy_explorer": {"world_size": 2, "steps": 3, "strategies": ["dp"]},
    "08_long_context_and_experts": {
        "world_size": 2, "seq_lens": [32, 64], "budget_mb": 5.0, "moe_steps": 2,
        "use_solutions": True,
    },
}  # fmt: skip
IDLE = "Python 3 (ipykernel) | Idle"
SAVED: dict[str, Path] = {}  # lab -> the notebook as the browser saved it
SHOWN: dict[str, list] = {}  # lab -> its figures' data in JupyterLab when it was saved

# In lab 05's page (the dashboard is its only figure): its traces on one axis, as [name, points].
TRACES = """([axis]) => {
    const plot = document.querySelector('.js-plotly-plot');
    return plot && plot.data ? plot.data.filter(t => (t.xaxis || 'x') === axis).map(t => [t.name, t.x ? t.x.length : 0]) : [];
}"""
DASHBOARD_DATA = """() => document.querySelector('.js-plotly-plot').data
    .map(t => ({name: t.name, axis: t.xaxis, y: t.y ? Array.from(t.y) : [], color: t.marker && t.marker.color}))"""
# Each figure's traces (name, x, y), in page order, of the figures a selector picks: in
# JupyterLab, PLAIN are the figures a cell output, LIVE those of widgets; in a handout, all.
# Arrays come as lists, typed arrays or plotly's base64 ``{dtype, bdata}``: all as lists.
FIGURES = """([selector]) => {
    const types = {f8: Float64Array, f4: Float32Array, i8: BigInt64Array, i4: Int32Array,
        i2: Int16Array, i1: Int8Array, u8: BigUint64Array, u4: Uint32Array, u2: Uint16Array,
        u1: Uint8Array};
    const list = v => {
        if (v == null) return [];
        if (v.bdata !== undefined) {
            const bytes = Uint8Array.from(atob(v.bdata), c => c.charCodeAt(0));
            return Array.from(new types[v.dtype](bytes.buffer), Number);
        }
        return Array.from(v, x => typeof x === 'bigint' ? Number(x) : x);
    };
    return [...document.querySelectorAll(selector)]
        .map(p => (p.data || []).map(t => [t.name ?? null, list(t.x), list(t.y)]));
}"""
PLAIN, LIVE = ".js-plotly-plot.jp-RenderedPlotly", ".js-plotly-plot:not(.jp-RenderedPlotly)"
# Everything that could be cut: each figure's svg and its legends against the output area,
# widget labels against their own box, tables against the output area.
OVERFLOW = """() => {
    const cut = [];
    for (const out of document.querySelectorAll('.jp-OutputArea-output')) {
        const area = out.getBoundingClientRect();
        if (area.width === 0) continue;
        for (const svg of out.querySelectorAll('.js-plotly-plot .main-svg')) {
            const r = svg.getBoundingClientRect();
            if (r.right > area.right + 1) cut.push(`figure ${r.width}px in an output of ${area.width}px`);
            for (const legend of out.querySelectorAll('.legend')) {
                const l = legend.getBoundingClientRect();
                if (l.width && l.right > r.right + 1) cut.push(`legend "${legend.textContent.slice(0, 30)}" ends at ${l.right}, its figure at ${r.right}`);
            }
        }
        for (const label of out.querySelectorAll('.widget-label')) {
            if (label.scrollWidth > label.clientWidth + 1) cut.push(`label "${label.textContent}" cut`);
        }
        for (const table of out.querySelectorAll('table')) {
            if (table.getBoundingClientRect().right > area.right + 1) cut.push(`table of ${table.getBoundingClientRect().width}px`);
        }
    }
    return cut;
}"""
# Plotly bar labels drawn wider than their bar (smeared into the next one).
# Legends that cover one another, or an axis title (a legend's right edge past its plot's
# margin ran into the next plot's title): pairs of overlapping boxes, named.
CROWDED = """() => {
    const plot = document.querySelector('.js-plotly-plot');
    const boxes = [...plot.querySelectorAll('g.legend')].map(g => ['legend ' + g.textContent.slice(0, 20), g.getBoundingClientRect()])
        .concat([...plot.querySelectorAll('.g-ytitle, .g-y2title, .g-y3title, .g-y4title')].map(g => ['title ' + g.textContent, g.getBoundingClientRect()]));
    const meet = (a, b) => a.left < b.right - 1 && b.left < a.right - 1 && a.top < b.bottom - 1 && b.top < a.bottom - 1;
    const crowded = [];
    boxes.forEach(([na, a], i) => boxes.slice(i + 1).forEach(([nb, b]) => {
        if (a.width && b.width && meet(a, b) && na.startsWith('legend')) crowded.push(`${na} / ${nb}`);
    }));
    return crowded;
}"""
SMEARED = """() => {
    const smeared = [];
    for (const point of document.querySelectorAll('.js-plotly-plot .bars .point')) {
        const bar = point.querySelector('path'), text = point.querySelector('text');
        if (bar && text && text.textContent && text.getBBox().width > bar.getBBox().width + 1) smeared.push(text.textContent);
    }
    return smeared;
}"""

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason=f"{CHROMIUM} is missing: install it with `apt-get install -y chromium`",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_parameters(notebook: Path, parameters: dict, to: Path) -> None:
    """A copy of ``notebook`` at ``to`` with ``parameters`` in a cell after its parameters cell."""
    nb = nbformat.read(notebook, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    values = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(values))  # as papermill injects them
    nbformat.write(nb, to)


def user_settings(config: Path, plugin: str, settings: dict) -> None:
    path = config / "lab" / "user-settings" / f"{plugin}.jupyterlab-settings"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings))


@contextlib.contextmanager
def jupyterlab(root: Path, notebooks: dict[str, tuple[Path, dict]]) -> Iterator[dict]:
    """A private JupyterLab on 127.0.0.1 serving, from ``root``, a copy of each notebook
    ``{name: (path, parameters)}`` as ``name.ipynb``. Yields its ``url`` (``.format(name)``
    opens one), ``root`` and ``pid``."""
    for name, (notebook, parameters) in notebooks.items():
        with_parameters(notebook, parameters, root / f"{name}.ipynb")
    config = root / ".jupyter"
    # The news pop-up would cover the notebook's output; saved notebooks keep widget state.
    news_off = {"fetchNews": "false", "checkForUpdates": False}
    user_settings(config, "@jupyterlab/apputils-extension/notification", news_off)
    user_settings(config, "@jupyter-widgets/jupyterlab-manager/plugin", {"saveState": True})
    # Every cell stays in the page (by default cells scrolled out of view are not drawn).
    user_settings(config, "@jupyterlab/notebook-extension/tracker", {"windowingMode": "none"})
    env = dict(
        os.environ,
        JUPYTER_CONFIG_DIR=str(config),
        JUPYTER_RUNTIME_DIR=str(root / ".runtime"),
        IPYTHONDIR=str(root / ".ipython"),
    )
    port, token = free_port(), secrets.token_hex(16)
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1",
        f"--port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
    ]  # fmt: skip
    if os.geteuid() == 0:
        command.append("--allow-root")
    log = open(root / "jupyter.log", "wb")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                assert process.poll() is None, (root / "jupyter.log").read_text()
                assert time.monotonic() < deadline, "JupyterLab did not start in 60 s"
                time.sleep(0.3)
        yield {
            "url": f"{base}/lab/workspaces/{{0}}/tree/{{0}}.ipynb?token={token}",
            "root": root,
            "pid": process.pid,
        }
    finally:
        stop_with_children(process)
        log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """JupyterLab serving copies of the labs (small parameters)."""
    labs = {lab: (ROOT / "labs" / f"{lab}.ipynb", values) for lab, values in LABS.items()}
    with jupyterlab(tmp_path_factory.mktemp("lab"), labs) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


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


def open_lab(browser, server, lab: str):
    """A page with ``lab`` open, in a workspace of its own (JupyterLab reopens a workspace's
    tabs, and another lab's tab would start its kernel too)."""
    page = browser.new_page(viewport=VIEWPORT)
    page.goto(server["url"].format(lab))
    # Idle shows before a kernel session exists; Run All then would be dropped.
    page.get_by_text(IDLE).wait_for(timeout=120_000)
    return page


def command(page, name: str) -> None:
    page.evaluate(f"window.jupyterapp.commands.execute('{name}')")


def run_all(page, seconds: float = 240) -> None:
    """Run All, and wait until every code cell has run (failing at the first error)."""
    command(page, "notebook:run-all-cells")
    prompts = "() => [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].map(p => p.textContent)"
    deadline = time.monotonic() + seconds
    while True:
        errors = page.locator(
            ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
        )
        traceback = [t for t in errors.all_text_contents() if "Traceback" in t or "Error" in t]
        assert not traceback, traceback
        if all(re.fullmatch(r"\[\d+\]:", p) for p in page.evaluate(prompts)):
            break
        if time.monotonic() > deadline:
            screenshot(page, "run-all-timeout")
            raise AssertionError(
                f"Run All not done in {seconds} s: prompts {page.evaluate(prompts)}"
            )
        time.sleep(0.5)
    page.get_by_text(IDLE).wait_for(timeout=60_000)


def wait_until(condition, seconds: float = 120, what: str | Callable[[], str] = "") -> None:
    """Wait for ``condition()``; ``what`` (or what it returns) names it if it never comes."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, (
            f"timed out waiting for {what() if callable(what) else what}"
        )
        time.sleep(0.25)


def difference(figures: list, others: list) -> str:
    """Where two lists of ``FIGURES`` first differ, in words."""
    if len(figures) != len(others):
        return f"{len(figures)} figures, not {len(others)}"
    for i, (traces, other) in enumerate(zip(figures, others, strict=True)):
        if [t[0] for t in traces] != [t[0] for t in other]:
            return f"figure {i}: traces {[t[0] for t in traces]}, not {[t[0] for t in other]}"
        for trace, wanted in zip(traces, other, strict=True):
            if trace != wanted:
                return f"figure {i}, trace {trace[0]}: {trace[1:]}, not {wanted[1:]}"
    return "none"


def assert_no_ranks(server, after: str) -> None:
    # Ranks exit within a second of a shutdown.
    wait_until(lambda: not worker_pids(server["pid"]), 10, f"no rank process after {after}")


def assert_log_console_clean(page) -> None:
    """No error went to JupyterLab's Log Console (where a widget callback's errors go if
    nobody shows them)."""
    command(page, "logconsole:open")
    panel = page.locator(".jp-LogConsolePanel")
    panel.wait_for(timeout=10_000)
    text = panel.inner_text()
    assert "Traceback" not in text and "Error" not in text, text


def save_and_close(page, server, lab: str) -> None:
    """Save the notebook (with its widgets' state), remember where it is, stop its kernel."""
    path = server["root"] / f"{lab}.ipynb"
    SHOWN[lab] = page.evaluate(FIGURES, [PLAIN])
    unsaved = path.stat().st_mtime
    command(page, "docmanager:save")
    wait_until(lambda: path.stat().st_mtime != unsaved, 30, f"{lab} saved")
    SAVED[lab] = path
    page.evaluate("window.jupyterapp.serviceManager.sessions.shutdownAll()")
    page.close()


def screenshot(shown, name: str) -> None:
    """A picture of ``shown`` (a page, or a locator: its whole element) for people to look at."""
    out = ROOT / "test-output" / "browser"
    out.mkdir(parents=True, exist_ok=True)
    shown.screenshot(path=out / f"{name}.png")


# ---- the labs ---------------------------------------------------------------------------------


def test_lab_01_shows_the_one_process_line_under_ddps(browser, server):
    page = open_lab(browser, server, "01_data_parallel")
    run_all(page)
    assert_no_ranks(server, "lab 01's last cell")
    styles = page.evaluate(
        """() => [...document.querySelectorAll('.js-plotly-plot')].map(p => p.data)
            .filter(d => d && d.some(t => t.name === 'DDP'))[0]
            .map(t => [t.name, t.line.dash, t.marker.symbol])"""
    )
    (_, dash_one, symbol_one), (_, dash_ddp, symbol_ddp) = styles
    assert dash_one != dash_ddp and symbol_one != symbol_ddp, styles
    assert page.evaluate(OVERFLOW) == []
    assert_log_console_clean(page)
    save_and_close(page, server, "01_data_parallel")


def test_lab_03_slider_works_after_run_all_and_shows_its_errors(browser, server):
    page = open_lab(browser, server, "03_pipeline_parallel")
    run_all(page)
    assert_no_ranks(server, "lab 03's last cell")
    slider = page.locator(".jp-OutputArea-output", has=page.locator(".widget-slider"))
    title = slider.locator(".gtitle")

    def choose(m: int) -> None:
        readout = slider.locator(".widget-readout")
        readout.click()
        page.keyboard.press("Control+A")
        page.keyboard.type(str(m))
        page.keyboard.press("Enter")

    before = title.text_content()
    choose(7)  # does not split a batch of 16: the error shows beside the slider
    slider.locator("b", has_text="ValueError: 7 micro-batches do not split a batch of 16").wait_for(
        timeout=30_000
    )
    assert title.text_content() == before  # the figure keeps its last good state
    choose(16)  # the notebook's ranks are gone: the slider starts its own
    wait_until(lambda: "m=16" in (title.text_content() or ""), 120, "the m=16 timeline")
    assert slider.locator(".widget-html").inner_text().strip() == ""  # the error cleared
    assert page.evaluate(SMEARED) == []  # 32 bars: only the labels that fit
    assert page.evaluate(OVERFLOW) == []
    assert_no_ranks(server, "the slider's run")
    assert_log_console_clean(page)
    screenshot(slider, "lab03-slider")
    save_and_close(page, server, "03_pipeline_parallel")


@pytest.mark.parametrize(
    ("lab", "passes"),
    [
        ("04_sharded", ["PASS ZeRO-1 update", "PASS make it fit"]),
        ("08_long_context_and_experts", ["PASS ring-attention step", "PASS MoE dispatch"]),
    ],
)
def test_lab_runs_all_with_its_exercises_passing_and_its_outputs_fitting(
    browser, server, lab, passes
):
    page = open_lab(browser, server, lab)
    run_all(page)
    assert_no_ranks(server, f"lab {lab[:2]}'s last cell")
    for check in passes:  # the exercises passed on the ranks, in the page
        assert page.get_by_text(check).count() >= 1, check
    assert page.evaluate(OVERFLOW) == []
    assert_log_console_clean(page)
    save_and_close(page, server, lab)


def test_lab_05_dashboard_after_run_all(browser, server):
    page = open_lab(browser, server, "05_strategy_explorer")
    run_all(page)
    assert_no_ranks(server, "lab 05's last cell")
    assert page.get_by_text("status: stopped").count() == 1
    assert page.evaluate(OVERFLOW) == []  # the dashboard and dashboard.table() fit
    before = dict(page.evaluate(TRACES, ["x"]))
    assert before, "the loss plot shows no run after Run All"

    dashboard = page.locator(".jp-OutputArea-output", has=page.locator(".js-plotly-plot"))
    message = dashboard.locator(".widget-html").first
    start = dashboard.locator("button.jupyter-button", has_text="Start")

    def control(name: str):
        return dashboard.locator(".widget-inline-hbox", has_text=name).locator("select, input")

    def set_value(name: str, value: str) -> None:
        box = control(name)
        box.fill(value)
        box.press("Enter")  # a text box sends its value to the kernel on Enter

    # The defaults leave time to watch and to stop; close() stopped the ranks: Start starts some.
    start.click()
    running = re.compile(r"running: step [1-9]\d* of \d+")
    wait_until(lambda: running.search(message.inner_text()), 120, "a running status line")
    dashboard.locator("button.jupyter-button", has_text="Stop").click()
    wait_until(lambda: "stopped after" in message.inner_text(), 60, "the stop")

    # A choice that can't work shows red; correcting the control clears it.
    control("strategy").select_option(label="pipeline 1F1B")
    set_value("micro-batches", "3")
    set_value("steps", "5")
    start.click()
    wait_until(lambda: "does not split" in message.inner_text(), 30, "the error")
    set_value("micro-batches", "2")
    wait_until(lambda: message.inner_text().strip() == "", 30, "the error to clear")

    # On a slow link: the ranks emulate it, and each step is predicted there too.
    emulate = dashboard.locator(".widget-checkbox input")
    assert emulate.is_disabled()  # this machine: nothing to emulate
    control("cluster").select_option(label="100 Mbit/s link")
    wait_until(emulate.is_enabled, 30, "the emulate box to come on")
    assert emulate.is_checked()
    start.click()
    done = "pp-1f1b/scratch gpt w2 @100Mbit/s done after 5 step(s)"
    wait_until(
        lambda: done in message.inner_text(), 180, lambda: f"{done}: {message.text_content()}"
    )
    after = dict(page.evaluate(TRACES, ["x"]))
    new = {name: n for name, n in after.items() if name not in before}
    (run,) = [name for name in new if "pp-1f1b" in name]
    assert new[run] == 5 and run.endswith("@100Mbit/s"), after
    throughput = dict(page.evaluate(TRACES, ["x2"]))
    (predicted,) = [name for name in throughput if name.startswith(f"{run}, predicted on")]
    assert throughput[predicted] == 5, throughput  # dotted beside the measured
    where = [t for t in page.evaluate(DASHBOARD_DATA) if t["axis"] == "x6"]
    assert [t["name"] for t in where] == [
        "compute",
        "exposed communication",
        "waiting for other ranks (bubble)",
    ]
    assert all(run in t["y"] for t in where), where
    # Earlier runs stay on the plot, the latest PLOTTED_RUNS of them (a repaint redraws each).
    kept = [name for name in before if name in after]
    assert len(after) <= PLOTTED_RUNS and len(kept) == len(after) - len(new), (before, after)
    assert {name: after[name] for name in kept} == {name: before[name] for name in kept}
    assert [name for name, _ in page.evaluate(TRACES, ["x5"])] == ["forward", "backward"]
    traces = page.evaluate(DASHBOARD_DATA)
    memory = [(t["name"], t["color"]) for t in traces if t["axis"] == "x4"]
    assert memory == [
        ("parameters", "#4C78A8"),
        ("gradients", "#F58518"),
        ("optimizer state", "#54A24B"),
    ]
    comm = {t["name"]: t["y"] for t in traces if t["axis"] == "x3"}
    assert comm["send@pp"] and all(y > 0 for y in comm["send@pp"]), comm  # no empty bars
    assert not any(name.startswith("recv") for name in comm), comm
    # The run's last repaint may still be laying out its labels: awaited, not sampled.
    wait_until(lambda: page.evaluate(SMEARED) == [], 15, lambda: f"labels wider than their bars: {page.evaluate(SMEARED)}")  # fmt: skip
    assert page.evaluate(OVERFLOW) == [] and page.evaluate(CROWDED) == []
    screenshot(dashboard, "dashboard")

    last = page.locator(".jp-CodeCell").last
    last.click()
    command(page, "notebook:run-cell")  # dashboard.close(); cluster.shutdown(); .snapshot()
    assert_no_ranks(server, "lab 05's last cell, run again")
    page.get_by_text(IDLE).wait_for(timeout=60_000)
    (dashboard_now,) = page.evaluate(FIGURES, [LIVE])
    wait_until(
        lambda: page.evaluate(FIGURES, [PLAIN])[-1:] == [dashboard_now],
        30,
        lambda: (
            f"the snapshot: {difference(page.evaluate(FIGURES, [PLAIN])[-1:], [dashboard_now])}"
        ),
    )
    assert_log_console_clean(page)
    save_and_close(page, server, "05_strategy_explorer")


# ---- the handouts -----------------------------------------------------------------------------


@pytest.mark.parametrize("lab", sorted(LABS))
def test_handouts_show_every_figure_without_a_network(browser, tmp_path, lab):
    assert lab in SAVED, f"{lab} was not saved by its browser test"
    page_path = handouts.export(SAVED[lab], tmp_path / f"{lab}.html")
    context = browser.new_context(viewport=VIEWPORT)
    asked = []

    def no_network(route):
        asked.append(route.request.url)
        route.abort()

    context.route(re.compile(r"^(?!file:).*"), no_network)
    page = context.new_page()
    page.goto(page_path.as_uri())
    want = len(SHOWN[lab])
    wait_until(lambda: page.locator(".js-plotly-plot .main-svg").count() >= want, 30, "figures")
    # The same figures, in the same order, with the same data as JupyterLab showed (lab 05's
    # last one is the dashboard in its last state).
    handout = page.evaluate(FIGURES, [".js-plotly-plot"])
    assert handout == SHOWN[lab], difference(handout, SHOWN[lab])
    assert all(any(trace[2] for trace in figure) for figure in handout if figure)  # real data
    drawn = page.evaluate(
        "() => [...document.querySelectorAll('.js-plotly-plot')].filter(p => p.querySelector('.main-svg')).length"
    )
    assert drawn == want
    assert page.locator("text=Loading widget").count() == 0
    # A note where a widget was (labs 03, 05), for it needs a kernel.
    nb = nbformat.read(SAVED[lab], as_version=4)
    outputs = [o.get("data", {}) for cell in nb.cells for o in cell.get("outputs", [])]
    widgets = sum(handouts.WIDGET_VIEW in data for data in outputs)
    assert page.get_by_text("An interactive widget was here").count() == widgets
    # Nothing was asked of a network: no plotly.js, no widget manager, no MathJax, no require.js.
    assert asked == []
    # Every formula is drawn, as MathML: none left as TeX source, none lost.
    markdown = "".join(cell.source for cell in nb.cells if cell.cell_type == "markdown")
    formulas = [m for m in handouts.CODE_OR_MATH.finditer(markdown) if not m.group(1)]
    assert page.locator("math").count() == len(formulas)
    if formulas:  # MathML laid out: a fraction is taller than a line of text
        assert page.locator("math").first.bounding_box()["height"] > 0
    prose = page.evaluate(
        """() => [...document.querySelectorAll('.jp-MarkdownOutput')].map(cell => {
            const copy = cell.cloneNode(true);
            copy.querySelectorAll('code, math').forEach(e => e.remove());
            return copy.textContent;
        }).join(' ')"""
    )
    assert "$" not in prose
    screenshot(page, f"handout-{lab}")
    context.close()
