"""Rich output from ranks: displays, progress bars, widgets and tabs, in a notebook and out."""

from __future__ import annotations

from pathlib import Path

import nbformat
import papermill
import pytest

from pdlab.control import protocol
from pdlab.control.output import RankOutput
from pdlab.control.rich_output import Tabs, View, mirror

NOTEBOOK = Path(__file__).parent / "notebooks" / "rich_output.ipynb"


def outputs_of(cell) -> list[dict]:
    return [dict(o) for o in cell.get("outputs", [])]


def cell_with(nb, text: str):
    return next(c for c in nb.cells if text in c.source)


def widget_models(nb) -> dict[str, dict]:
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    return {model_id: model for model_id, model in state.items()}


def test_rich_output_from_ranks_under_papermill(tmp_path):
    out = tmp_path / "rich_output.ipynb"
    papermill.execute_notebook(NOTEBOOK, out, parameters={"world_size": 2}, progress_bar=False)
    nb = nbformat.read(out, as_version=4)

    # Each rank's display under its label, in the order they arrived.
    frames = [o["data"] for o in outputs_of(cell_with(nb, "pd.DataFrame"))]
    pairs = {
        label["text/plain"]: shown for label, shown in zip(frames[::2], frames[1::2], strict=True)
    }
    assert sorted(pairs) == ["[rank 0]", "[rank 1]"]
    for rank in (0, 1):
        table = pairs[f"[rank {rank}]"]["text/html"]
        assert "<table" in table and f"<td>{rank}</td>\n      <td>{rank**2}</td>" in table

    figures = [o["data"] for o in outputs_of(cell_with(nb, "go.Figure"))]
    plotted = [d["application/vnd.plotly.v1+json"] for d in figures[1::2]]
    titles = sorted(f["layout"]["title"]["text"] for f in plotted)
    assert titles == ["figure of rank 0", "figure of rank 1"]

    bars = [o["data"]["text/plain"] for o in outputs_of(cell_with(nb, "tqdm("))]
    assert sorted(b.split(":")[0] for b in bars) == [
        "[rank 0] steps of rank 0",
        "[rank 1] steps of rank 1",
    ]
    assert all("100%" in b and "20/20" in b for b in bars)  # one line a bar, at its end

    models = widget_models(nb)
    shown = [o["data"] for o in outputs_of(cell_with(nb, "IntProgress"))]
    progress_id = next(d for d in shown if "application/vnd.jupyter.widget-view+json" in d)[
        "application/vnd.jupyter.widget-view+json"
    ]["model_id"]
    progress = models[progress_id]
    assert progress["model_name"] == "IntProgressModel"
    assert (progress["state"]["value"], progress["state"]["max"]) == (10, 10)  # its last change

    tabs_view = next(
        o["data"]["application/vnd.jupyter.widget-view+json"]["model_id"]
        for o in outputs_of(cell_with(nb, "--tabs"))
    )
    tab = models[tabs_view]["state"]
    assert tab["titles"] == ["rank 0", "rank 1"]
    for rank, child in enumerate(tab["children"]):
        outputs = models[child.removeprefix("IPY_MODEL_")]["state"]["outputs"]
        assert outputs[0]["text"] == f"hello from rank {rank}\n"
        assert "<table" in outputs[1]["data"]["text/html"]
        assert outputs[2]["text"] == f"Out: {rank * 10}\n"

    html = [o["data"].get("text/html", "") for o in outputs_of(cell_with(nb, "cluster.run"))]
    assert "<b>bold from rank 1</b>" in html


# ---- in the kernel, without a notebook ---------------------------------------------------------


class Recorded(View):
    def __init__(self):
        self.shown = []

    def lines(self, rank, stream, lines):
        self.shown += [("line", rank, line) for line in lines]

    def progress(self, rank, stream, text, done):
        self.shown.append(("done" if done else "bar", rank, text))


def test_a_redrawn_line_is_kept_as_its_latest_state():
    output = RankOutput()
    output.view = view = Recorded()
    output.write(1, "stderr", "before\n\r 0%|")
    output.write(1, "stderr", "  | 0/3\r 33%|#")
    for i in range(10_000):  # many redraws, one line: only the latest is kept
        output.write(1, "stderr", f"\r{i}")
    output.write(1, "stderr", "\r100%|###| 3/3\nafter\n")
    output.flush()  # lines are held briefly, to be shown in the order the ranks printed them
    assert view.shown[0] == ("line", 1, "before")
    assert view.shown[1:3] == [("bar", 1, " 0%|"), ("bar", 1, " 33%|#")]
    assert view.shown[-2:] == [("done", 1, "100%|###| 3/3"), ("line", 1, "after")]
    assert len(output._unfinished[1, "stderr"]) == 0


def test_a_plain_kernel_prints_a_bar_once_finished(capsys):
    output = RankOutput()
    output.write(0, "stdout", "\r 50%")
    output.write(0, "stdout", "\r100%")
    assert capsys.readouterr().out == ""
    output.flush()  # the call ended without a newline
    assert capsys.readouterr().out == "[rank 0] 100%\n"


def test_tabs_replace_a_bar_in_place():
    tabs = Tabs([0, 1])
    tabs.lines(1, "stdout", ["hi"])
    tabs.progress(1, "stderr", "10%", done=False)
    tabs.progress(1, "stderr", "90%", done=False)
    tabs.progress(1, "stderr", "100%", done=True)
    tabs.progress(1, "stderr", "again", done=False)  # a new bar after the first ended
    texts = [o["text"] for o in tabs.outputs[1].outputs]
    assert texts == ["hi\n", "100%\n", "again\n"]
    assert tabs.outputs[0].outputs == ()


def test_display_outside_a_rank_prints(capsys):
    import pdlab

    pdlab.display({"a": 1})  # no rank, no notebook: plain print
    assert capsys.readouterr().out == "{'a': 1}\n"


def test_only_widgets_are_mirrored():
    state = protocol.WidgetState("m1", "ipywidgets", "IntProgress", {"value": 3, "max": 5})
    widget, new = mirror(7, state)
    assert new and (widget.value, widget.max) == (3, 5)
    again, new = mirror(7, protocol.WidgetState("m1", "ipywidgets", "IntProgress", {"value": 5}))
    assert again is widget and not new and widget.value == 5
    with pytest.raises(TypeError, match="not a widget"):
        mirror(7, protocol.WidgetState("m2", "subprocess", "Popen", {}))
