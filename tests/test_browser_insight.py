"""Rich output from ranks in a real browser: tests/notebooks/rich_output.ipynb in JupyterLab +
headless Chromium (the setup of tests/test_browser.py, pointed at that notebook). A
screenshot lands in ``test-output/browser/``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import test_browser
from tests.test_browser import browser, command, jupyterlab, open_lab  # noqa: F401 (browser: a fixture)

NOTEBOOK = Path(__file__).parent / "notebooks" / "rich_output.ipynb"

pytestmark = test_browser.pytestmark


@pytest.fixture(scope="module")
def rich_notebook(tmp_path_factory):
    """test_browser's JupyterLab, serving the rich-output notebook."""
    notebooks = {"rich_output": (NOTEBOOK, {"world_size": 2})}
    with jupyterlab(tmp_path_factory.mktemp("root"), notebooks) as server:
        yield server


def test_rank_displays_bars_widgets_and_tabs_show_in_jupyterlab(rich_notebook, browser):  # noqa: F811
    out = Path(__file__).resolve().parent.parent / "test-output" / "browser"
    out.mkdir(parents=True, exist_ok=True)
    page = open_lab(browser, rich_notebook, "rich_output")
    command(page, "notebook:run-all-cells")
    page.get_by_text("pdlab cluster stopped").wait_for(timeout=240_000)
    for rank in (0, 1):  # tqdm's bars, each one line at its end
        page.get_by_text(f"[rank {rank}] steps of rank {rank}: 100%").wait_for()
    tables = page.locator("table.dataframe").count()
    plots = page.locator(".js-plotly-plot").count()
    bar = page.locator(".widget-hprogress", has_text="rank 0 bar")
    bar_width = bar.locator(".progress-bar").evaluate("e => e.style.width")
    tab_titles = page.locator(".widget-tab .lm-TabBar-tab").all_inner_texts()
    page.locator(".widget-tab .lm-TabBar-tab", has_text="rank 1").click()
    page.get_by_text("hello from rank 1").wait_for(timeout=10_000)
    in_tab = page.locator(".widget-tab table.dataframe").filter(visible=True).count()
    page.screenshot(path=out / "rich_output.png", full_page=True)
    page.close()
    assert tables >= 3  # rank 0's and rank 1's, and the one in the tab shown
    assert plots == 2
    assert bar_width == "100%"  # the rank's last value reached the kernel's widget
    assert [t.strip() for t in tab_titles] == ["rank 0", "rank 1"]
    assert in_tab == 1
