"""What the ranks print, shown in the kernel as whole lines prefixed ``[rank r]``.

Ranks send their output in chunks as they come (native output too: gloo, C extensions), so a
line can arrive in pieces; ``RankOutput`` keeps each rank's and stream's unfinished line and
prints a line once it is complete. The pieces of an unfinished line are kept as a list and
joined once, when the line ends, so one huge line costs time linear in its length.
"""

from __future__ import annotations

import sys


class RankOutput:
    """Assembles chunks into lines per ``(rank, stream)`` and prints them prefixed."""

    def __init__(self) -> None:
        self._unfinished: dict[tuple[int, str], list[str]] = {}

    def write(self, rank: int, stream: str, text: str) -> None:
        """Take a chunk; print every line it completes."""
        *complete, rest = text.split("\n")
        pieces = self._unfinished.setdefault((rank, stream), [])
        if complete:
            complete[0] = "".join(pieces) + complete[0]
            pieces.clear()
            out = sys.stderr if stream == "stderr" else sys.stdout
            out.write("".join(f"[rank {rank}] {line}\n" for line in complete))
            out.flush()
        if rest:
            pieces.append(rest)

    def flush(self) -> None:
        """Print every unfinished line as it is (a call has ended: nothing more will join it)."""
        for (rank, stream), pieces in list(self._unfinished.items()):
            if pieces:
                self.write(rank, stream, "\n")
