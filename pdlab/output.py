"""What the ranks print, shown in the kernel as whole lines prefixed ``[rank r]``.

Ranks send their output in chunks as they come (native output too: gloo, C extensions), so a
line can arrive in pieces; ``RankOutput`` keeps each rank's and stream's unfinished line and
shows a line once it is complete. The pieces of an unfinished line are kept as a list and
joined once, when the line ends, so one huge line costs time linear in its length. A line
redrawn with ``\r`` (a tqdm progress bar) is kept as its latest state only and shown live
as it changes. Where lines, displays and widgets go is the ``view``'s business
(``pdlab.rich_output``: the cell, or a tab a rank).
"""

from __future__ import annotations

from pdlab import protocol
from pdlab.rich_output import Printed, View


class RankOutput:
    """Assembles chunks into lines per ``(rank, stream)`` and hands them to ``view``."""

    def __init__(self) -> None:
        self._unfinished: dict[tuple[int, str], list[str]] = {}
        self.view: View = Printed()

    def write(self, rank: int, stream: str, text: str) -> None:
        """Take a chunk; show every line it completes, and a redrawn line's latest state."""
        *complete, rest = text.split("\n")
        pieces = self._unfinished.setdefault((rank, stream), [])
        if complete:
            complete[0] = "".join(pieces) + complete[0]
            pieces.clear()
            if "\r" in complete[0]:
                self.view.progress(rank, stream, _latest(complete.pop(0)), done=True)
            if complete:
                self.view.lines(rank, stream, complete)
        if rest:
            pieces.append(rest)
            if "\r" in rest:  # keep the latest state only: a bar redraws thousands of times
                redrawn = "".join(pieces)
                pieces[:] = [redrawn[redrawn.rindex("\r") :]]
                self.view.progress(rank, stream, _latest(redrawn), done=False)

    def show(self, rank: int, message: protocol.Display | protocol.WidgetState) -> None:
        """A rank's ``display()`` of an object or a widget."""
        self.view.show(rank, message)

    def flush(self) -> None:
        """Show every unfinished line as it is (a call has ended: nothing more will join it)."""
        for (rank, stream), pieces in list(self._unfinished.items()):
            if pieces:
                self.write(rank, stream, "\n")


def _latest(line: str) -> str:
    """What a terminal shows of a line redrawn with ``\r``: its last non-empty state."""
    return next((part for part in reversed(line.split("\r")) if part), "")
