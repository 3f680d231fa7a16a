"""Handouts: run every lab top to bottom (papermill) and save it as HTML with its outputs.

    python scripts/handouts.py                      # every lab, its default parameters
    python scripts/handouts.py 00 05 -p world_size=2 -p steps=5

Writes ``handouts/NAME.ipynb`` (executed) and ``handouts/NAME.html`` (git-ignored). A lab that
fails stops the run, with papermill's error naming the cell.

A handout is opened where there may be no network, so its HTML needs nothing from one: every
plotly figure is drawn by plotly.js inlined once in the page (``offline``); every formula is
MathML, which browsers draw themselves (``latex2mathml``, instead of MathJax from a CDN).
Widgets need a kernel: a note stands in for each, and a lab shows a live figure's last state
as a plain figure of its own (lab 05's last cell: ``dashboard.snapshot()``).
"""

from __future__ import annotations

import argparse
import ast
import re
import time
from pathlib import Path

import nbformat
import papermill
import plotly.graph_objects as go
import plotly.io as pio
from latex2mathml.converter import convert as mathml
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
WIDGET_NOTE = (
    "<p><i>An interactive widget was here: open the notebook in JupyterLab to use it.</i></p>"
)


def offline(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """``nb`` with every figure as HTML that needs no network (see the module docstring).

    plotly.js (some 4 MB) is inlined in the first figure only. A widget needs a kernel: a
    note stands in for it, and the saved widget state is dropped (rendering it would load the
    widget manager from a CDN).
    """
    nb.metadata.pop("widgets", None)
    inline = True
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if WIDGET_VIEW in data:
                del data[WIDGET_VIEW]
                data["text/html"] = WIDGET_NOTE
            elif PLOTLY in data:
                figure = go.Figure(data.pop(PLOTLY), skip_invalid=True)
                data["text/html"] = pio.to_html(figure, include_plotlyjs=inline, full_html=False)
                inline = False
    return nb


# $$display$$ or $inline$ TeX, outside code (`...` spans, ``` blocks: a shell's $VAR is no TeX).
# Inline math may wrap onto the next line of its paragraph, not past a blank line.
CODE_OR_MATH = re.compile(r"(```.*?```|`[^`\n]*`)|\$\$(.+?)\$\$|\$((?:[^$\n]|\n(?!\n))+?)\$", re.S)
TEMPLATES = Path(__file__).resolve().parent / "handout"


def math_as_mathml(nb: nbformat.NotebookNode) -> dict[str, str]:
    """Replace every formula in ``nb``'s markdown by a placeholder; returns placeholder ->
    its MathML. (Placed after markdown is rendered: markdown would read MathML's text.)"""
    formulas: dict[str, str] = {}

    def swap(match: re.Match) -> str:
        code, display, inline = match.groups()
        if code:
            return code
        key = f"PDLABMATH{len(formulas)}X"
        formulas[key] = mathml(display or inline, display="block" if display else "inline")
        return key

    for cell in nb.cells:
        if cell.cell_type == "markdown":
            cell.source = CODE_OR_MATH.sub(swap, cell.source)
    return formulas


def export(executed: Path, page: Path) -> Path:
    """The executed notebook at ``executed`` as an HTML page at ``page`` that needs no network."""
    nb = offline(nbformat.read(executed, as_version=4))
    formulas = math_as_mathml(nb)
    exporter = HTMLExporter(
        template_name="handout", extra_template_basedirs=[str(TEMPLATES.parent)]
    )
    html, _ = exporter.from_notebook_node(nb)
    for key, formula in formulas.items():
        html = html.replace(key, formula)
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
