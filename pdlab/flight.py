"""Where every rank is: its recent communication, always recorded, and the answer to "where
are you now?", given without stopping it.

On a rank, ``install()`` starts a flight recorder (PyTorch's name for NCCL's ring buffer of
collectives): a ring of the last ``RING`` collectives and point-to-point ops this process
issued, each with its process group, c10d's per-group sequence number, bytes and shape, issue
and completion times, and the line of the user's code that issued it. It wraps the narrow
waist every eager ``torch.distributed`` call passes — the ``ProcessGroup`` methods
(``allreduce``, ``send``, ...) and ``Work.wait`` — and the functional collectives DTensor
issues, so any code run on a rank is recorded: a ``%%ranks`` cell, pdlab's strategies, FSDP2,
pipelining, DDP's comm hook. It costs a few microseconds an op and nothing on the other
(aten) ops of a step (benchmarks/README.md has the figures). What it cannot see are ops C++
issues by itself, like DDP's reducer without a comm hook; the sequence numbers come from
c10d's own counters, so those ops still count, and a gap between two records is theirs.

``locate()`` runs on the rank's reader thread while its main thread may be blocked in a
collective: the op the main thread waits in, else its Python stack, and the recent ops.

In the kernel, ``Locations`` holds one ``Location`` a rank and says in one sentence what went
wrong: who waits in which op, who never reached it and why, and ops that don't match.
"""

from __future__ import annotations

import functools
import linecache
import os
import sys
import sysconfig
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

RING = 1024  # ops kept per rank
RECENT = 32  # of them, sent with each answer
STACK = 6  # innermost frames of the user's code in an answer

# ---- what is reported --------------------------------------------------------------------


@dataclass(slots=True)
class Op:
    """One collective or point-to-point op a rank issued.

    As recorded, ``group`` is c10d's name of the group and ``shape`` the tensor's (size,
    dtype): formatting costs microseconds an op, so ``reported`` does it when asked.
    """

    op: str  # all_reduce, broadcast, send, ...
    group: str  # the group's label ("world", "dp", ...) in reports; c10d's name ("0") as recorded
    seq: int  # c10d's sequence number of the op in its group (compat.sequence_numbers)
    nbytes: int  # of the op's first tensor argument (the output, for gathers)
    shape: Any  # of that tensor: "[4, 8] float32" in reports
    start: float  # time.time() at issue
    end: float | None = None  # when a wait on it returned, else when first seen complete
    line: str = ""  # where the user's code issued it: "cell line 5", "train.py:42"
    handle: Any = field(default=None, repr=False)  # the Work (or tensor) until complete

    def name(self) -> str:
        """``all_reduce #3``."""
        return f"{self.op} #{self.seq}"


@dataclass
class Location:
    """Where one rank is. ``state``: waiting (blocked in ``op``), running (its code runs, at
    ``line``), finished (no call in progress; ``op`` is its last), dead, or unknown (it did
    not answer)."""

    rank: int
    state: str
    op: str | None = None
    group: str | None = None  # label: "world", "dp", "tp", ...
    seq: int | None = None
    line: str | None = None
    shape: str | None = None
    stack: list[str] = field(default_factory=list)  # innermost first: "cell line 5: x = f()"
    recent: list[Op] = field(default_factory=list)  # oldest first, groups as labels
    counts: dict[str, int] = field(default_factory=dict)  # ops issued per group label
    clock: float = 0.0  # the rank's time.time() when it answered

    def last_on(self, group: str) -> str:
        """The last op this rank issued on ``group``: ``all_reduce #2``, ``op #5`` when it was
        not recorded (C++ issued it), or ``no op``."""
        count = self.counts.get(group, 0)
        if count == 0:
            return "no op"
        op = next((o for o in self.recent if o.group == group and o.seq == count), None)
        return op.name() if op else f"op #{count}"

    def __str__(self) -> str:
        op = f"{self.op} #{self.seq} on {self.group!r}"
        if self.state == "waiting":
            return f"rank {self.rank}: waiting in {op} ({self.shape}), issued at {self.line}"
        if self.state == "running":
            last = f" (last op: {op})" if self.op else ""
            return f"rank {self.rank}: running at {self.line}{last}"
        last = f"; last op {op} at {self.line}" if self.op else ""
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
    lines = {p.line for p in places}
    if lines == {None} or lines == {""}:
        return ""
    if len(lines) == 1:
        return f" ({places[0].line})"
    return " (" + ", ".join(f"rank {p.rank} at {p.line}" for p in places) + ")"


def _elsewhere(place: Location, group: str, outcome: str | None) -> str:
    """Why ``place``'s rank is not waiting with the others on ``group``."""
    after = place.last_on(group)
    if place.state == "dead":
        return f"{_ranks([place.rank])} died"
    if place.state == "unknown":
        return f"{_ranks([place.rank])} did not answer"
    if place.state == "running":
        return f"{_ranks([place.rank])} is running{_lines([place])}, after {after}"
    return f"{_ranks([place.rank])} never reached it: it {outcome or 'finished'} after {after}"


def _waits_on(group: str, waiting: list[Location]) -> str:
    """What the ranks waiting on ``group`` wait in, naming ops or shapes that don't match."""
    by_seq: dict[int, list[Location]] = {}
    for p in waiting:
        by_seq.setdefault(p.seq, []).append(p)
    if len(by_seq) > 1:
        parts = ", ".join(f"{_ranks([p.rank])} in {p.op} #{p.seq}" for p in waiting)
        return f"ranks wait at different ops of group {group!r}: {parts}"
    seq = next(iter(by_seq))
    ops = {p.op for p in waiting}
    if len(ops) > 1:
        parts = ", ".join(
            f"{_ranks([p.rank for p in waiting if p.op == op])} in {op}" for op in sorted(ops)
        )
        return f"mismatched collectives at #{seq} on group {group!r}: {parts}"
    shapes = {p.shape for p in waiting}
    ranks = [p.rank for p in waiting]
    text = f"{_ranks(ranks)} wait{'s' if len(ranks) == 1 else ''} in {waiting[0].op} #{seq} on group {group!r}"
    if len(shapes) > 1:
        parts = ", ".join(f"rank {p.rank} {p.shape}" for p in waiting)
        return f"{text} with mismatched shapes: {parts}"
    return text + _lines(waiting)


def summarize(places: list[Location], outcomes: dict[int, str] | None = None) -> str:
    """One sentence: who waits in which op, who never reached it and why; else what each
    rank is doing. ``outcomes`` words a rank's end ("raised ValueError") instead of
    "finished"."""
    outcomes = outcomes or {}
    waiting = [p for p in places if p.state == "waiting"]
    clauses, told = [], {p.rank for p in waiting}
    for group in dict.fromkeys(p.group for p in waiting):
        mine = [p for p in waiting if p.group == group]
        clauses.append(_waits_on(group, mine))
        for p in places:
            if p.rank not in told and group in p.counts:
                clauses.append(_elsewhere(p, group, outcomes.get(p.rank)))
                told.add(p.rank)
    by_state: dict[tuple[str, str], list[Location]] = {}
    for p in places:
        if p.rank not in told:
            by_state.setdefault((p.state, outcomes.get(p.rank, "")), []).append(p)
    for (state, outcome), same in by_state.items():
        ranks = [p.rank for p in same]
        if state == "running":
            clauses.append(
                f"{_ranks(ranks)} {'is' if len(ranks) == 1 else 'are'} running{_lines(same)}"
            )
        else:
            verb = {"dead": "died", "unknown": "did not answer"}.get(state, "finished")
            clauses.append(f"{_ranks(ranks)} {outcome or verb}")
    return "; ".join(clauses)


# ---- the recorder (on a rank) ------------------------------------------------------------

_ring: deque[Op] = deque(maxlen=RING)
_pending: dict[int, Op] = {}  # id(handle) -> op not yet seen complete
_waiting: dict[int, Op] = {}  # thread ident -> the op it is blocked on
_installed = False

LIBRARY, PDLAB, USER = 0, 1, 2
_kinds: dict[str, int] = {}  # filename -> kind
_library_dirs: tuple[str, ...] = ()
_pdlab_dir = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _kind(filename: str) -> int:
    kind = _kinds.get(filename)
    if kind is None:
        if filename == __file__ or filename.startswith("<frozen "):
            kind = LIBRARY
        elif filename.startswith(_pdlab_dir):
            kind = PDLAB
        elif filename.startswith(_library_dirs) or "-packages" + os.sep in filename:
            kind = LIBRARY  # torch, the standard library, installed packages
        else:
            kind = USER
        _kinds[filename] = kind
    return kind


def line_of(filename: str, lineno: int) -> str:
    """``cell line 5`` for a ``%%ranks`` cell or a notebook function, else ``file.py:42``."""
    if filename.startswith("<pdlab-cell-") or os.sep + "ipykernel_" in filename:
        return f"cell line {lineno}"
    if filename.startswith(_pdlab_dir):
        return f"pdlab/{filename[len(_pdlab_dir) :]}:{lineno}"
    return f"{os.path.basename(filename)}:{lineno}"


_line_cache: dict[tuple[str, int], str] = {}  # line_of's answers: ops come from few lines


def _issuer(frame: Any) -> str:
    """The innermost frame of the user's code (else of pdlab's) on ``frame``'s stack."""
    fallback = None
    while frame is not None:
        kind = _kind(frame.f_code.co_filename)
        if kind == USER:
            break
        if kind == PDLAB and fallback is None:
            fallback = frame
        frame = frame.f_back
    frame = frame or fallback
    if frame is None:
        return ""
    key = (frame.f_code.co_filename, frame.f_lineno)
    line = _line_cache.get(key)
    if line is None:
        line = _line_cache[key] = line_of(*key)
    return line


def _first_tensor(args: tuple) -> Any:
    """The first tensor among ``args`` (looking into lists), or None."""
    for arg in args:
        while isinstance(arg, list | tuple) and arg:
            arg = arg[0]
        if hasattr(arg, "element_size"):
            return arg
    return None


def _issued(op: str, group: str, seq: int, args: tuple, start: float, line: str) -> Op:
    t = _first_tensor(args)
    if t is None:
        record = Op(op, group, seq, 0, None, start, None, line)
    else:
        nbytes = t.numel() * t.element_size()
        record = Op(op, group, seq, nbytes, (t.shape, t.dtype), start, None, line)
    _ring.append(record)
    return record


def _track(record: Op, handle: Any) -> None:
    """Keep ``record`` pending until a wait on ``handle`` (a Work or a tensor) returns or it
    is seen complete. Older ops are looked at first: a group's ops complete in order, so
    the look stops at the first one still running. (No Python callback on c10d's threads:
    on 2 ranks that doubled the cost of a small all-reduce.)"""
    for key, op in list(_pending.items()):
        if not _done(op):
            break
        _finish(op, key)
    record.handle = handle
    _pending[id(handle)] = record


def _finish(record: Op, key: int) -> None:
    """``record`` is complete: its handle (the key's) is dropped."""
    if _pending.get(key) is record:
        _pending.pop(key, None)
    if record.end is None:
        record.end = time.time()
    record.handle = None


def _done(record: Op) -> bool:
    handle = record.handle
    return record.end is not None or (hasattr(handle, "is_completed") and handle.is_completed())


def _record_method(original: Any, op: str) -> Any:
    @functools.wraps(original)
    def recorded(pg: Any, *args: Any, **kwargs: Any) -> Any:
        from pdlab import compat

        start, line = time.time(), _issuer(sys._getframe(1))
        work = original(pg, *args, **kwargs)
        record = _issued(op, pg.group_name, compat.sequence_number(pg), args, start, line)
        if work is not None:
            _track(record, work)
        return work

    return recorded


def _record_functional(original: Any, op: str) -> Any:
    @functools.wraps(original)
    def recorded(*args: Any, **kwargs: Any) -> Any:
        from pdlab import compat

        start, line = time.time(), _issuer(sys._getframe(1))
        before = compat.sequence_numbers()  # the group came in any of five forms: see which
        out = original(*args, **kwargs)
        after = compat.sequence_numbers()
        group = next((g for g, n in after.items() if n != before.get(g)), None)
        if group is not None:
            record = _issued(op, group, after[group], args, start, line)
            _track(record, getattr(out, "elem", out))  # an AsyncCollectiveTensor's tensor
        return out

    return recorded


def _record_wait(original: Any) -> Any:
    @functools.wraps(original)
    def wait(handle: Any, *args: Any, **kwargs: Any) -> Any:
        record = _pending.get(id(handle))
        if record is None:
            return original(handle, *args, **kwargs)
        me = threading.get_ident()
        _waiting[me] = record
        try:
            out = original(handle, *args, **kwargs)
        finally:
            _waiting.pop(me, None)
        _finish(record, id(handle))
        return out

    return wait


def install() -> None:
    """Start recording this process's collectives and point-to-point ops (idempotent)."""
    global _installed, _library_dirs
    if _installed:
        return
    import torch
    import torch.distributed as dist

    from pdlab import compat

    paths = sysconfig.get_paths()
    _library_dirs = tuple(
        d + os.sep for d in (os.path.dirname(torch.__file__), paths["stdlib"], paths["platstdlib"])
    )
    for method, op in compat.PROCESS_GROUP_OPS.items():
        if hasattr(dist.ProcessGroup, method):
            setattr(
                dist.ProcessGroup, method, _record_method(getattr(dist.ProcessGroup, method), op)
            )
    dist.Work.wait = _record_wait(dist.Work.wait)
    funcol = compat.functional_collectives()
    for function, op in compat.FUNCTIONAL_OPS.items():
        if hasattr(funcol, function):
            setattr(funcol, function, _record_functional(getattr(funcol, function), op))
    funcol.wait_tensor = _record_wait(funcol.wait_tensor)
    _installed = True


def ops() -> list[Op]:
    """The recorded ops, oldest first (groups as c10d names)."""
    return list(_ring)


# ---- where am I? (on a rank, from any thread) --------------------------------------------


def group_labels() -> dict[str, str]:
    """c10d's group names -> the labels reports use ("world", "dp", ...), one per group.

    pdlab's own names ("dp", "tp") where ``pdlab.comm`` is loaded; else "world" for the
    default group and the group's description or name for others. Two groups with one label
    (a DeviceMesh's copy of the world) are told apart by their c10d name.
    """
    import torch.distributed as dist

    from pdlab import compat

    comm = sys.modules.get("pdlab.comm")  # not imported for this: DTensor takes a second
    world = dist.group.WORLD.group_name
    labels = {}
    for name, pg in compat.process_groups().items():
        if comm is not None:
            labels[name] = comm.group_label(pg)
        else:
            labels[name] = "world" if name == world else pg.group_desc or name
    seen: dict[str, int] = {}
    for label in labels.values():
        seen[label] = seen.get(label, 0) + 1
    return {
        name: label if seen[label] == 1 or name == world else f"{label} (pg {name})"
        for name, label in labels.items()
    }


def reported(record: Op, labels: dict[str, str]) -> Op:
    """``record`` as reports carry it: its group's label, its shape as text, no handle."""
    shape = record.shape
    if isinstance(shape, tuple):
        size, dtype = shape
        shape = f"{list(size)} {str(dtype).removeprefix('torch.')}"
    group = labels.get(record.group, record.group)
    return replace(record, group=group, shape=shape or "", handle=None)


def _user_frames(frame: Any) -> list[str]:
    """The innermost ``STACK`` frames of the user's (else pdlab's) code, innermost first."""
    frames = []
    while frame is not None and len(frames) < STACK:
        code = frame.f_code
        if _kind(code.co_filename) != LIBRARY:
            source = linecache.getline(code.co_filename, frame.f_lineno).strip()
            where = line_of(code.co_filename, frame.f_lineno)
            frames.append(
                f"{where} in {code.co_name}: {source}" if source else f"{where} in {code.co_name}"
            )
        frame = frame.f_back
    return frames


def locate(main_thread: int, in_call: bool) -> Location:
    """Where this rank is now; safe from any thread while the main thread runs a call."""
    import torch.distributed as dist

    from pdlab import compat

    rank = dist.get_rank() if dist.is_initialized() else 0
    if not dist.is_initialized():
        return Location(rank, "running" if in_call else "finished", clock=time.time())
    labels = group_labels()
    recent = [reported(r, labels) for r in list(_ring)[-RECENT:]]
    frame = sys._current_frames().get(main_thread)
    waited = _waiting.get(main_thread)
    if (
        in_call
        and waited is None
        and frame is not None
        and _kind(frame.f_code.co_filename) == LIBRARY
    ):
        # Blocked inside torch but not in a wait we see (DDP's reducer waits in C++): the
        # oldest op still in flight is what it waits for.
        live = [o for o in list(_pending.values()) if not _done(o)]
        waited = min(live, key=lambda o: o.start) if live else None
    state = "finished" if not in_call else "waiting" if waited is not None else "running"
    last = reported(waited, labels) if waited is not None else recent[-1] if recent else None
    stack = _user_frames(frame) if in_call else []
    line = _issuer(frame) if state == "running" else last.line if last else None
    counts = {labels.get(name, name): n for name, n in compat.sequence_numbers().items()}
    return Location(
        rank,
        state,
        last.op if last else None,
        last.group if last else None,
        last.seq if last else None,
        line,
        last.shape if last else None,
        stack,
        recent,
        counts,
        time.time(),
    )
