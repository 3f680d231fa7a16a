"""Every ```python and ```ipython block of README.md and docs/*.md runs, so that a renamed
function breaks a test, not a reader.

A page's blocks run in order in one namespace, like a notebook's cells. Pages other than
README.md and docs/cluster.md (which start and stop their own) find ``pdlab`` and a running
``cluster`` of 2 ranks there, the session's: their first lines say so. ```ipython blocks run
in an IPython shell (magics); other languages (bash, text, mermaid) are for reading only.
Run one block as ``pytest tests/test_docs.py -k "strategies.md:40"``: the blocks before it on
its page run first.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = ("python", "ipython")
READ_ONLY = ("bash", "text", "mermaid")
FENCE = re.compile(r"^```(\S*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
OWN_CLUSTER = ("README.md", "docs/cluster.md")  # pages that start their own cluster


def blocks(page: Path) -> list[tuple[str, int, str]]:
    """(language, line of the opening fence, code) of each fenced block on ``page``."""
    text = page.read_text()
    return [(m[1], text.count("\n", 0, m.start()) + 1, m[2]) for m in FENCE.finditer(text)]


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


CASES = [(page, i) for page in PAGES for i, block in enumerate(blocks(page)) if block[0] in RUN]


def test_every_block_says_how_to_treat_it():
    """An unlabelled block or an unknown language would be skipped silently."""
    for page in PAGES:
        for language, line, _ in blocks(page):
            assert language in RUN + READ_ONLY, f"{_name(page)}:{line}: ```{language}"


LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_links_reach_a_file_and_heading(page):
    """Relative links (``[x](other.md#part)``) name a file that exists and a heading in it."""
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # https:, chrome: ...
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{_name(page)} links to {target}: no such file"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", linked.read_text(), re.MULTILINE)
            assert anchor in map(_anchor, headings), (
                f"{_name(page)} links to {target}: no such heading"
            )


@pytest.fixture(scope="module")
def pages(cluster2, tmp_path_factory):
    """Each page's namespace and how many of its blocks ran, run in a scratch directory (the
    examples write traces, checkpoints and scripts)."""
    from IPython.core.interactiveshell import InteractiveShell

    import pdlab

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("docs"))
        state = {}
        for page in PAGES:
            shared = {} if _name(page) in OWN_CLUSTER else {"pdlab": pdlab, "cluster": cluster2}
            state[page] = {"namespace": {"__name__": "__main__", **shared}, "ran": 0}
        yield state
        # What a page that failed midway left running: its own cluster, or %pdlab start's.
        magics = InteractiveShell.instance().magics_manager.registry.get("PdlabMagics")
        left = [page["namespace"].get("cluster") for page in state.values()]
        for cluster in [*left, magics and magics.started]:
            if cluster is not None and cluster is not cluster2:
                cluster.shutdown()


@pytest.mark.parametrize(
    "page, index", CASES, ids=[f"{_name(p)}:{blocks(p)[i][1]}" for p, i in CASES]
)
def test_block_runs(pages, page, index, capsys):
    """The block runs without error, after the blocks before it on its page."""
    state = pages[page]
    for language, line, code in blocks(page)[state["ran"] : index + 1]:
        state["ran"] += 1
        if language == "ipython":
            from IPython.core.interactiveshell import InteractiveShell

            InteractiveShell.instance().run_cell(code).raise_error()
            # %pdlab prints its usage instead of raising when it can't read its line.
            assert "usage: %pdlab" not in capsys.readouterr().out, f"{_name(page)}:{line}"
        elif language == "python":
            # Blank lines put the code at its line in the page: tracebacks point there.
            source = "\n" * line + code
            exec(compile(source, _name(page), "exec"), state["namespace"])
