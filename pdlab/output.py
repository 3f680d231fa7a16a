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
"""

from __future__ import annotations

import heapq
import itertools
import sys
import time

HOLD_S = 0.05


class RankOutput:
    """Assembles chunks into lines per ``(rank, stream)``; prints them prefixed, in time order."""

    def __init__(self) -> None:
        self._unfinished: dict[tuple[int, str], list[str]] = {}
        self._ready: list[tuple[float, int, int, str, str]] = []  # (at, seq, rank, stream, line)
        self._seq = itertools.count()  # keeps lines of equal stamps in arrival order

    def write(self, rank: int, stream: str, text: str, at: float | None = None) -> None:
        """Take a chunk the rank read at ``at`` (``time.time()``; now if None). A line is
        stamped when its end arrives: ``print`` writes a line whole; where a read split it,
        its end is when it was printed."""
        at = time.time() if at is None else at
        *complete, rest = text.split("\n")
        pieces = self._unfinished.setdefault((rank, stream), [])
        for line in complete:
            pieces.append(line)
            heapq.heappush(self._ready, (at, next(self._seq), rank, stream, "".join(pieces)))
            pieces.clear()
        if rest:
            pieces.append(rest)

    def release(self, hold: float = HOLD_S) -> None:
        """Print the complete lines stamped more than ``hold`` seconds ago, oldest first."""
        self._print_until(time.time() - hold)

    def flush(self) -> None:
        """Print everything, unfinished lines too (a call has ended: nothing more will join)."""
        for (rank, stream), pieces in list(self._unfinished.items()):
            if pieces:
                self.write(rank, stream, "\n")
        self._print_until(float("inf"))

    def _print_until(self, until: float) -> None:
        streams = {"stdout": sys.stdout, "stderr": sys.stderr}
        written = set()
        while self._ready and self._ready[0][0] <= until:
            _, _, rank, stream, line = heapq.heappop(self._ready)
            streams[stream].write(f"[rank {rank}] {line}\n")
            written.add(stream)
        for stream in written:
            streams[stream].flush()
