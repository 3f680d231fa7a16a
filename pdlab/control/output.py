"""What the ranks print, shown in the kernel as whole lines prefixed ``[rank r]``, in the order
they were printed.

Ranks send their output in chunks as they come (native output too: gloo, C extensions),
stamped with the time the rank read them, so a line can arrive in pieces and a line printed
earlier on one rank can arrive after a later one from another. ``RankOutput`` keeps each
rank's and stream's unfinished line, holds complete lines for ``HOLD_S`` (long enough for
every connection to deliver what was printed by then), and shows them in time order. The
pieces of an unfinished line are joined once, when it ends, so one huge line costs time
linear in its length. Ranks on one machine share its clock; ranks attached from other hosts
are ordered as well as their clocks agree.

A line redrawn with ``\\r`` (a tqdm progress bar) is kept as its latest state only and shown
live as it changes. Where lines, displays and widgets go is the ``view``'s business
(``pdlab.control.rich_output``: the cell, or a tab a rank).
"""

from __future__ import annotations

import heapq
import itertools
import time

from pdlab.control import protocol
from pdlab.control.rich_output import Printed, View

HOLD_S = 0.05


class RankOutput:
    """Assembles chunks into lines per ``(rank, stream)``; hands them to ``view`` in time order."""

    def __init__(self) -> None:
        self._unfinished: dict[tuple[int, str], list[str]] = {}
        self._ready: list[tuple[float, int, int, str, str]] = []  # (at, seq, rank, stream, line)
        self._seq = itertools.count()  # keeps lines of equal stamps in arrival order
        self.view: View = Printed()

    def write(self, rank: int, stream: str, text: str, at: float | None = None) -> None:
        """Take a chunk the rank read at ``at`` (``time.time()``; now if None). A line is
        stamped when its end arrives: ``print`` writes a line whole; where a read split it,
        its end is when it was printed."""
        at = time.time() if at is None else at
        *complete, rest = text.split("\n")
        pieces = self._unfinished.setdefault((rank, stream), [])
        for line in complete:
            pieces.append(line)
            whole = "".join(pieces)
            pieces.clear()
            if "\r" in whole:
                self._show_until(at)  # the lines printed before the bar's last state
                self.view.progress(rank, stream, _latest(whole), done=True)
            else:
                heapq.heappush(self._ready, (at, next(self._seq), rank, stream, whole))
        if rest:
            pieces.append(rest)
            if "\r" in rest:  # keep the latest state only: a bar redraws thousands of times
                redrawn = "".join(pieces)
                pieces[:] = [redrawn[redrawn.rindex("\r") :]]
                self._show_until(at)
                self.view.progress(rank, stream, _latest(redrawn), done=False)

    def show(self, rank: int, message: protocol.Display | protocol.WidgetState) -> None:
        """A rank's ``display()`` of an object or a widget, after the lines printed before it."""
        self._show_until(float("inf"))
        self.view.show(rank, message)

    def release(self, hold: float = HOLD_S) -> None:
        """Show the complete lines stamped more than ``hold`` seconds ago, oldest first."""
        self._show_until(time.time() - hold)

    def flush(self) -> None:
        """Show everything, unfinished lines too (a call has ended: nothing more will join)."""
        for (rank, stream), pieces in list(self._unfinished.items()):
            if pieces:
                self.write(rank, stream, "\n")
        self._show_until(float("inf"))

    def _show_until(self, until: float) -> None:
        run: list[str] = []  # consecutive lines of one rank and stream, handed over together
        source = None
        while self._ready and self._ready[0][0] <= until:
            _, _, rank, stream, line = heapq.heappop(self._ready)
            if source != (rank, stream) and run:
                self.view.lines(*source, run)
                run = []
            source = rank, stream
            run.append(line)
        if run:
            self.view.lines(*source, run)


def _latest(line: str) -> str:
    """What a terminal shows of a line redrawn with ``\\r``: its last non-empty state."""
    return next((part for part in reversed(line.split("\r")) if part), "")
