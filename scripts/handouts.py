"""Handouts: run every lab top to bottom (papermill) and save it as HTML with its outputs.

    python scripts/handouts.py                      # every lab, its default parameters
    python scripts/handouts.py 00 05 -p world_size=2 -p steps=5

Writes ``handouts/NAME.ipynb`` (executed) and ``handouts/NAME.html`` (git-ignored). A lab that
fails stops the run, with papermill's error naming the cell.
"""

from __future__ import annotations

import argparse
import ast
import time
from pathlib import Path

import papermill
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


def build(lab: Path, out: Path, parameters: dict[str, object]) -> Path:
    """Execute ``lab`` into ``out`` and export it as HTML beside it; returns the HTML's path."""
    executed = out / lab.name
    papermill.execute_notebook(
        lab, executed, parameters=parameters, cwd=lab.parent, progress_bar=False
    )
    html, _ = HTMLExporter(template_name="lab").from_filename(str(executed))
    page = out / f"{lab.stem}.html"
    page.write_text(html, encoding="utf-8")
    return page


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
