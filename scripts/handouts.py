"""Handouts: run every lab top to bottom (papermill) and save it as HTML with its outputs.

    python scripts/handouts.py                      # every lab, its default parameters
    python scripts/handouts.py 00 05 -p world_size=2 -p steps=5

Writes ``handouts/NAME.ipynb`` (executed) and ``handouts/NAME.html`` (git-ignored). A lab that
fails stops the run, with papermill's error naming the cell.

A handout is opened where there may be no network, so its HTML needs nothing from one: every
plotly figure is drawn by plotly.js inlined once in the page, and a widget holding a live
figure (the dashboard, lab 03's slider) shows its last state as a static figure, beside the
status lines it showed (``offline``). The interactive controls need a kernel: they are left out.
"""

from __future__ import annotations

import argparse
import ast
import base64
import copy
import time
from pathlib import Path

import nbformat
import numpy as np
import papermill
import plotly.graph_objects as go
import plotly.io as pio
from nbconvert import HTMLExporter

ROOT = Path(__file__).resolve().parent.parent
LABS = ROOT / "labs"


def parameter(text: str) -> tuple[str, object]:
    """``name=value``; the value as a Python literal (``2``, ``['dp']``), else as a string."""
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected name=value, got {text!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


PLOTLY = "application/vnd.plotly.v1+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def _decoded(model: dict) -> dict:
    """A saved widget model's state with its binary buffers put back: a FigureWidget sends
    its numeric arrays as bytes, saved apart from the state (base64) with the path to their
    place, where the state keeps only their ``dtype`` and ``shape``."""
    state = copy.deepcopy(model.get("state", {}))
    for buffer in model.get("buffers", []):
        *holder_path, key, _ = buffer["path"]  # [..., "y", "buffer"]
        holder = state
        for step in holder_path:
            holder = holder[step]
        spec = holder[key]
        raw = base64.b64decode(buffer["data"])
        holder[key] = np.frombuffer(raw, dtype=spec["dtype"]).reshape(spec["shape"]).tolist()
    return state


def _widget_parts(model_id: str, state: dict) -> list[dict]:
    """The figures (plotly's ``data``/``layout``) and HTML texts in the widget ``model_id`` and
    its children, in order, from a notebook's saved widget state."""
    model = _decoded(state.get(model_id, {}))
    if "_widget_data" in model:  # a plotly FigureWidget
        return [{"data": model["_widget_data"], "layout": model.get("_widget_layout", {})}]
    if model.get("_model_name") == "HTMLModel":
        return [{"html": model.get("value", "")}] if model.get("value") else []
    return [
        part
        for child in model.get("children", [])
        for part in _widget_parts(child.removeprefix("IPY_MODEL_"), state)
    ]


def offline(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """``nb`` with every figure as HTML that needs no network (see the module docstring).

    plotly.js (some 4 MB) is inlined in the first figure only; the saved widget state is
    dropped, since rendering it would load the widget manager from a CDN.
    """
    state = nb.metadata.pop("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    inline = True
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if PLOTLY in data:
                parts = [data.pop(PLOTLY)]
            elif WIDGET_VIEW in data:
                parts = _widget_parts(data.pop(WIDGET_VIEW)["model_id"], state)
            else:
                continue
            html = []
            for part in parts:
                if "html" in part:
                    html.append(part["html"])
                    continue
                figure = go.Figure(part["data"], part["layout"], skip_invalid=True)
                html.append(pio.to_html(figure, include_plotlyjs=inline, full_html=False))
                inline = False
            data["text/html"] = "\n".join(html)
    return nb


def export(executed: Path, page: Path) -> Path:
    """The executed notebook at ``executed`` as an HTML page at ``page`` that needs no network."""
    nb = offline(nbformat.read(executed, as_version=4))
    html, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    page.write_text(html, encoding="utf-8")
    return page


def build(lab: Path, out: Path, parameters: dict[str, object]) -> Path:
    """Execute ``lab`` into ``out`` and export it as HTML beside it; returns the HTML's path."""
    executed = out / lab.name
    papermill.execute_notebook(
        lab, executed, parameters=parameters, cwd=lab.parent, progress_bar=False
    )
    return export(executed, out / f"{lab.stem}.html")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("labs", nargs="*", help="name prefixes, e.g. 00 05 (default: every lab)")
    parser.add_argument("-p", dest="parameters", type=parameter, action="append", default=[])
    parser.add_argument("--out", type=Path, default=ROOT / "handouts")
    args = parser.parse_args(argv)
    labs = sorted(LABS.glob("*.ipynb"))
    chosen = [lab for lab in labs if not args.labs or lab.name.startswith(tuple(args.labs))]
    if not chosen:
        parser.error(f"no lab matches {args.labs}: labs are {[lab.stem for lab in labs]}")
    args.out.mkdir(parents=True, exist_ok=True)
    for lab in chosen:
        began = time.monotonic()
        page = build(lab, args.out, dict(args.parameters))
        size = page.stat().st_size / 1e6
        print(f"{page}: {size:.1f} MB, {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
