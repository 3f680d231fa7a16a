"""How long a learner waits in the browser: Start to the first point on the loss plot, on the
cluster the notebook started (after a few seconds of reading) and after choosing another
number of ranks in the dashboard; then, with twenty runs behind it, the longest wait between
two repaints of a run's line.

Printed and written to ``test-output/browser/startup.json``, and asserted against issue 22's
limits (Start to the first point within 1 s on the notebook's cluster, within 2 s after a
change of ranks) and issue 17's (a repaint within 1 s with 20 runs), loosened on a loaded
machine (``limit``). Asserted too: each run finishes, its status line and its plot agree on
the steps done, the ranks of the new size were forked from the kernel's fork server, and
with 20 runs no legend covers another or an axis title.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

import pytest

from tests.conftest import descendants
from tests.test_browser import (  # noqa: F401  (the fixture and the skip condition)
    CROWDED,
    IDLE,
    OVERFLOW,
    ROOT,
    TRACES,
    browser,
    jupyterlab,
    open_lab,
    pytestmark,
)

LAB = "05_strategy_explorer"

READING_S = 8  # a learner reads the dashboard before pressing Start
STEPS = 5
RUNS = 20  # issue 17: "with ~20 runs plotted the plots refresh every 5-9 s"
REPAINT_STEPS = 60  # ~3 s of dp steps at world 2: several repaints to time
# Issue 22's limits on a quiet machine, Start to the first point on the plot, and issue 17's,
# the longest wait between two repaints of the latest run, in seconds.
LIMITS = {
    "warm ranks, 2": 1.0,
    "after a change to 4 ranks": 2.0,
    "warm ranks, 4": 1.0,
    f"repaint with {RUNS} runs": 1.0,
}
# The times (browser clock, s) at which the loss plot's line of the run named ``prefix`` gained
# points, until it has ``steps``: polled every 10 ms, in the page.
PAINTS = (
    """async ([prefix, steps]) => {
    const seen = [];
    const began = performance.now();
    let last = -1;
    while (last < steps && performance.now() - began < 180000) {
        const line = (TRACES)(['x']).find(([name]) => name.startsWith(prefix));
        const n = line ? line[1] : 0;
        if (n !== last) { seen.push(performance.now() / 1000); last = n; }
        await new Promise(resolve => setTimeout(resolve, 10));
    }
    return seen;
}"""
).replace("(TRACES)", f"({TRACES})")


def limit(label: str, load: float) -> float:
    """The bound asserted for ``label``: issue 22's limit times twice the machine's load a
    core, and at least 3 times it. CI shares these 2 cores with other jobs (load 5-20 seen),
    and the browser, JupyterLab and the kernel run beside the ranks: the issue's limits hold
    on a quiet machine only (benchmarks/README.md has the figures measured there). At load
    14.4, the notebook's first Start took 7.1 s to its first point."""
    return LIMITS[label] * max(3.0, 2 * load / (os.cpu_count() or 1))


def command_lines(pids: list[int]) -> dict[int, list[bytes]]:
    found = {}
    for pid in pids:
        try:
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
    return found


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().split()[3])


def forked_ranks() -> list[int]:
    """Rank processes below this test forked from a fork server: a rank's parent is its
    keeper (``pdlab.control.keeper``), the keeper's the server."""
    lines = command_lines(descendants(os.getpid()))
    servers = {pid for pid, args in lines.items() if b"pdlab.control.forkserver" in args}
    keepers = {pid for pid, args in lines.items() if args[0] == b"pdlab.control.keeper"}
    return [
        pid
        for pid, args in lines.items()
        if args[0] == b"pdlab.control.worker"
        and parent(pid) in keepers
        and parent(parent(pid)) in servers
    ]


@pytest.fixture(scope="module")
def lab05(tmp_path_factory):
    """test_browser's JupyterLab, serving lab 05 (small parameters)."""
    parameters = {"world_size": 2, "steps": 3, "strategies": ["dp"]}
    notebooks = {LAB: (ROOT / "labs" / f"{LAB}.ipynb", parameters)}
    with jupyterlab(tmp_path_factory.mktemp("startup"), notebooks) as server:
        yield server


def test_start_to_first_point(lab05, browser):  # noqa: F811  (the imported fixture)
    out = ROOT / "test-output" / "browser"
    out.mkdir(parents=True, exist_ok=True)
    seconds, loads = {}, []
    page = open_lab(browser, lab05, LAB)
    # The cells up to the dashboard: the one after it runs the lab's own runs.
    page.locator(".jp-Cell", has_text="for strategy in strategies").click()
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-above')")
    dashboard = page.locator(".jp-OutputArea-output", has=page.locator(".js-plotly-plot"))
    start = dashboard.locator("button.jupyter-button", has_text="Start")
    start.wait_for(timeout=120_000)
    page.get_by_text(IDLE).wait_for(timeout=60_000)
    box = dashboard.locator(".widget-inline-hbox", has_text="steps").locator("input")
    box.fill(str(STEPS))
    box.press("Enter")
    time.sleep(READING_S)

    def first_point(label: str, run: str, world_size: int) -> None:
        began = time.monotonic()
        start.click()
        page.wait_for_function(
            f"() => ({TRACES})(['x']).some(([name, n]) => name.startsWith('{run} ') && n >= 1)",
            timeout=180_000,
        )
        seconds[label] = round(time.monotonic() - began, 2)
        loads.append(os.getloadavg()[0])
        done = f"{run} dp/scratch gpt w{world_size} done after {STEPS} step(s)"
        page.get_by_text(done).wait_for(timeout=180_000)
        # The plot shows the steps the status line says, once the last paint has arrived
        # (a timeout here: they disagree).
        page.wait_for_function(
            f"() => ({TRACES})(['x']).some(([name, n]) => name.startsWith('{run} ') && n === {STEPS})",
            timeout=30_000,
        )

    first_point("warm ranks, 2", "#1", 2)
    ranks = dashboard.locator(".widget-dropdown", has_text="ranks").locator("select")
    ranks.select_option("4")
    first_point("after a change to 4 ranks", "#2", 4)
    forked = forked_ranks()
    first_point("warm ranks, 4", "#3", 4)

    # Runs up to the twentieth, one step each, on 2 ranks; then a longer one, watched.
    ranks.select_option("2")
    box.fill("1")
    box.press("Enter")
    for run in range(4, RUNS):
        start.click()
        page.get_by_text(f"#{run} dp/scratch gpt w2 done after 1 step(s)").wait_for(timeout=180_000)
    box.fill(str(REPAINT_STEPS))
    box.press("Enter")
    start.click()
    painted = page.evaluate(PAINTS, [f"#{RUNS} ", REPAINT_STEPS])
    assert len(painted) >= 4, f"the {RUNS}th run's line was painted {len(painted) - 1} times"
    label = f"repaint with {RUNS} runs"
    # From the first point on: before it, the ranks were starting the run.
    seconds[label] = round(max(b - a for a, b in itertools.pairwise(painted[1:])), 2)
    loads.append(os.getloadavg()[0])
    page.get_by_text(f"#{RUNS} dp/scratch gpt w2 done after {REPAINT_STEPS} step(s)").wait_for(
        timeout=180_000
    )
    crowded, overflow = page.evaluate(CROWDED), page.evaluate(OVERFLOW)
    page.close()
    bounds = {label: limit(label, load) for label, load in zip(seconds, loads, strict=True)}
    report = {"seconds": seconds, "bounds": bounds, "load_average": loads, "reading_s": READING_S}
    (out / "startup.json").write_text(json.dumps(report, indent=1))
    print(f"\nStart to first point: {seconds}, asserted within {bounds}, load average {loads}")
    assert len(forked) == 4, f"the 4 ranks were not forked from the fork server: {forked}"
    assert crowded == [] and overflow == [], f"with {RUNS} runs: {crowded + overflow}"
    slow = {label: s for label, s in seconds.items() if s > bounds[label]}
    assert not slow, f"Start to the first point took {slow} s, over {bounds} (load {loads})"
