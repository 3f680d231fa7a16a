"""Where every rank is, in words: the records a rank's flight recorder reports
(``pdlab.measure.flight``) and the one sentence the kernel makes of them.

``Location`` is one rank's answer; ``Locations`` (what ``Cluster.where()`` returns and what
``CallTimeout.where`` / ``RankError.where`` hold) prints as a sentence — who waits in which
op, who never reached it and why, which collectives or shapes don't match — then a line a
rank. Nothing here imports torch: the kernel reads these without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

P2P = ("send", "recv")  # the two sides of a send share a sequence number but not an op
SAME_SHAPE = ("all_reduce", "broadcast", "reduce", "all_gather", "reduce_scatter")


@dataclass(slots=True)
class Op:
    """One collective or point-to-point op a rank issued."""

    op: str  # all_reduce, broadcast, send, ...
    group: str  # the group's label ("world", "dp", ...); c10d's name ("0") as recorded
    seq: int  # c10d's sequence number of the op in its group (compat.sequence_numbers)
    nbytes: int  # of the op's first tensor argument (the output, for gathers)
    shape: str  # of that tensor: "[4, 8] float32"
    start: float  # time.time() at issue
    end: float | None = None  # when a wait on it returned, else when first seen complete
    line: str = ""  # where the user's code issued it: "cell line 5", "train.py:42"
    handle: Any = field(default=None, repr=False)  # on the rank: its Work (or tensor)
    box: int = field(default=-1, repr=False)  # on the rank: its offset in the black box

    def name(self) -> str:
        """``all_reduce #3``."""
        return f"{self.op} #{self.seq}"


@dataclass
class Location:
    """Where one rank is. ``state``: waiting (blocked in ``op``), running (its code runs, at
    ``line``), finished (no call in progress; ``op`` is its last), dead (``op``: its last,
    from its black box, when it left one), or unknown (it did not answer)."""

    rank: int
    state: str
    op: str | None = None
    group: str | None = None  # label: "world", "dp", "tp", ...
    seq: int | None = None
    line: str | None = None
    shape: str | None = None
    stack: list[str] = field(default_factory=list)  # innermost first: "cell line 5 in f: x()"
    recent: list[Op] = field(default_factory=list)  # oldest first, groups as labels
    counts: dict[str, int] = field(default_factory=dict)  # ops issued per group label
    groups: dict[str, str] = field(default_factory=dict)  # c10d group name -> label
    clock: float = 0.0  # the rank's time.time() when it answered
    # Ops issued per group label when the call began (the kernel knows; empty if it doesn't).
    before: dict[str, int] = field(default_factory=dict)

    def last_on(self, group: str) -> str:
        """The last op this rank issued on ``group``: ``all_reduce #2``, ``op #5`` when it was
        not recorded (C++ issued it, as DDP's reducer does), or ``no op``; then how many of
        the group's ops this call issued, counted from its start, when that is known."""
        count = self.counts.get(group, 0)
        op = next((o for o in self.recent if o.group == group and o.seq == count), None)
        last = "no op" if count == 0 else op.name() if op else f"op #{count}"
        if group not in self.before:
            return last
        return f"{last} ({count - self.before[group]} in this call)"

    def __str__(self) -> str:
        op = f"{self.op} #{self.seq} on {self.group!r}"
        if self.state == "waiting":
            return f"rank {self.rank}: waiting in {op} ({self.shape}), issued at {self.line}"
        if self.state == "running":
            last = f" (last op: {op})" if self.op else ""
            return f"rank {self.rank}: running at {self.line}{last}"
        last = f"; last op {op} ({self.shape}) at {self.line}" if self.op else ""
        return f"rank {self.rank}: {self.state}{last}"


class Locations(list):
    """One ``Location`` a rank; prints as a sentence, then a line a rank."""

    def summary(self, outcomes: dict[int, str] | None = None) -> str:
        return summarize(self, outcomes)

    def __str__(self) -> str:
        return "\n".join([self.summary(), *(f"  {place}" for place in self)])

    __repr__ = __str__


def _ranks(ranks: list[int]) -> str:
    """ "rank 1", "ranks 0 and 2", "ranks 0, 2 and 3"."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    return "ranks " + ", ".join(map(str, ranks[:-1])) + f" and {ranks[-1]}"


def _lines(places: list[Location]) -> str:
    lines = [p.line for p in places if p.line]
    if not lines:
        return ""
    if len(set(lines)) == 1:
        return f" ({lines[0]})"
    return " (" + ", ".join(f"rank {p.rank} at {p.line}" for p in places if p.line) + ")"


def mismatch(places: list[Location]) -> str | None:
    """The first op the ranks' recent ops disagree on: one rank in all_reduce where another is
    in broadcast at the same sequence number of a group, or the same collective on tensors
    of different shapes. None if they agree."""
    at: dict[tuple[str, int], dict[int, Op]] = {}
    for place in places:
        for op in place.recent:
            if op.op not in P2P:
                at.setdefault((op.group, op.seq), {})[place.rank] = op
    for (group, seq), ops in sorted(at.items(), key=lambda item: item[0][1]):
        names = sorted({op.op for op in ops.values()})
        if len(names) > 1:
            parts = ", ".join(
                f"{_ranks(sorted(r for r, op in ops.items() if op.op == name))} in {name}"
                for name in names
            )
            return f"mismatched collectives at #{seq} on group {group!r}: {parts}"
        if names[0] in SAME_SHAPE and len({op.shape for op in ops.values()}) > 1:
            parts = ", ".join(f"rank {r} {op.shape}" for r, op in sorted(ops.items()))
            return f"mismatched shapes in {names[0]} #{seq} on group {group!r}: {parts}"
    return None


def _dead(place: Location) -> str:
    """A dead rank, and the op its black box says it died in or after."""
    if place.op is None:
        return f"{_ranks([place.rank])} died"
    last = place.recent[-1] if place.recent else None
    within = "in" if last is not None and last.end is None else "after"
    return f"{_ranks([place.rank])} died {within} {place.op} #{place.seq}{_lines([place])}"


def _elsewhere(place: Location, group: str, outcome: str | None) -> str:
    """Why ``place``'s rank is not waiting with the others on ``group``."""
    who = _ranks([place.rank])
    if place.state == "dead":
        return _dead(place)
    if place.state == "unknown":
        return f"{who} did not answer"
    if place.state == "running":
        return f"{who} is running{_lines([place])}, after {place.last_on(group)}"
    return f"{who} never reached it: it {outcome or 'finished'} after {place.last_on(group)}"


def summarize(places: list[Location], outcomes: dict[int, str] | None = None) -> str:
    """One sentence: which ops don't match; who waits in which op, who never reached it and
    why; else what each rank is doing. ``outcomes`` words a rank's end ("raised ValueError")
    instead of "finished"."""
    outcomes = outcomes or {}
    disagreement = mismatch(places)
    clauses = [disagreement] if disagreement else []
    waiting = [p for p in places if p.state == "waiting"]
    told = {p.rank for p in waiting}
    for group in dict.fromkeys(p.group for p in waiting):
        same_op: dict[tuple[str, int], list[Location]] = {}
        for p in waiting:
            if p.group == group:
                same_op.setdefault((p.op, p.seq), []).append(p)
        for (op, seq), same in same_op.items():
            ranks = [p.rank for p in same]
            waits = "waits" if len(ranks) == 1 else "wait"
            clauses.append(
                f"{_ranks(ranks)} {waits} in {op} #{seq} on group {group!r}{_lines(same)}"
            )
        for p in places:
            if p.rank not in told and group in p.counts:
                clauses.append(_elsewhere(p, group, outcomes.get(p.rank)))
                told.add(p.rank)
    by_state: dict[tuple[str, str, str], list[Location]] = {}
    for p in places:
        if p.rank in told:
            continue
        if p.state == "dead":
            clauses.append(_dead(p))
        else:
            last = f" after {p.last_on(p.group)}" if p.group and p.state == "finished" else ""
            by_state.setdefault((p.state, outcomes.get(p.rank, ""), last), []).append(p)
    for (state, outcome, last), same in by_state.items():
        ranks = [p.rank for p in same]
        if state == "running":
            are = "is" if len(ranks) == 1 else "are"
            clauses.append(f"{_ranks(ranks)} {are} running{_lines(same)}")
        else:
            verb = "did not answer" if state == "unknown" else "finished"
            clauses.append(f"{_ranks(ranks)} {outcome or verb}{last}")
    return "; ".join(clauses)
