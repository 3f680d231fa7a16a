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

Each rank also keeps its last ``BOX_SLOTS`` ops in a black box: a small file (mmap) in the
cluster's private temp dir, which the kernel reads when the rank has died (killed, or aborted
by gloo on a collective mismatch) to say what it died in.

``pdlab.measure.where`` has the records (``Op``, ``Location``) and the sentence made of them.
"""

from __future__ import annotations

import functools
import linecache
import math
import mmap
import os
import struct
import sys
import sysconfig
import threading
import time
from collections import deque
from dataclasses import replace
from typing import Any

from pdlab.measure.where import Location, Op

RING = 1024  # ops kept per rank
RECENT = 32  # of them, sent with each answer
STACK = 6  # innermost frames of the user's code in an answer
BOX_SLOTS, SLOT_BYTES = 64, 256  # the black box: the last ops, a fixed-size slot each

# ---- the recorder (on a rank) ------------------------------------------------------------

_ring: deque[Op] = deque(maxlen=RING)
_pending: dict[int, Op] = {}  # id(handle) -> op not yet seen complete
_waiting: dict[int, Op] = {}  # thread ident -> the op it is blocked on
_installed = False

LIBRARY, PDLAB, USER = 0, 1, 2
_kinds: dict[str, int] = {}  # filename -> kind
# The standard library and torch (installed under site-packages, or a source checkout).
_library = tuple(sysconfig.get_paths()[key] + os.sep for key in ("stdlib", "platstdlib"))
_pdlab_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # pdlab/


def _kind(filename: str) -> int:
    kind = _kinds.get(filename)
    if kind is None:
        if filename == __file__ or filename.startswith("<frozen "):
            kind = LIBRARY
        elif filename.startswith(_pdlab_dir):
            kind = PDLAB
        elif filename.startswith(_library) or "-packages" + os.sep in filename:
            kind = LIBRARY  # the standard library, torch, installed packages
        else:
            kind = USER
        _kinds[filename] = kind
    return kind


def is_user_code(filename: str) -> bool:
    """Whether ``filename`` is the user's: not the standard library, an installed package
    or pdlab."""
    return _kind(filename) == USER


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


_shapes: dict[tuple, str] = {}  # (size, dtype) -> "[4, 8] float32": a step repeats its shapes


def _issued(op: str, group: str, seq: int, args: tuple, start: float, line: str) -> Op:
    t = _first_tensor(args)
    nbytes, shape = 0, ""
    if t is not None:
        nbytes, key = t.numel() * t.element_size(), (t.shape, t.dtype)
        shape = _shapes.get(key)
        if shape is None:
            shape = _shapes[key] = f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}"
    record = Op(op, group, seq, nbytes, shape, start, None, line)
    _ring.append(record)
    if _box is not None:
        _box.write(record)
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
        if _box is not None:
            _box.update(record)
    record.handle = None


def _withdraw(record: Op) -> None:
    """Forget ``record``: its op was never issued."""
    _ring.remove(record)
    if _box is not None:
        record.seq = -1  # a void slot
        _box.update(record)


def _done(record: Op) -> bool:
    handle = record.handle
    return record.end is not None or (hasattr(handle, "is_completed") and handle.is_completed())


def _record_method(original: Any, op: str) -> Any:
    @functools.wraps(original)
    def recorded(pg: Any, *args: Any, **kwargs: Any) -> Any:
        # Recorded before it is issued: a rank that gloo aborts inside the op (a size
        # mismatch) leaves it in its black box. The next number is its, mostly: c10d's says.
        start, line = time.time(), _issuer(sys._getframe(1))
        record = _issued(op, pg.group_name, compat.sequence_number(pg) + 1, args, start, line)
        try:
            work = original(pg, *args, **kwargs)
        except BaseException:  # refused (bad arguments): never issued
            _withdraw(record)
            raise
        seq = compat.sequence_number(pg)
        if seq != record.seq:
            record.seq = seq
            if _box is not None:
                _box.update(record)
        if work is not None:
            _track(record, work)
        return work

    return recorded


def _record_functional(original: Any, op: str) -> Any:
    @functools.wraps(original)
    def recorded(*args: Any, **kwargs: Any) -> Any:
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


# ---- the black box ----------------------------------------------------------------------------

_SLOT = struct.Struct("<qqdd")  # seq, nbytes, start, end (NaN: not complete); then text
_COUNT = struct.Struct("<q")  # ops written so far: the file's first 8 bytes


def black_box_path(directory: str, rank: int) -> str:
    """Where rank ``rank`` keeps its black box, in a cluster's private temp dir."""
    return os.path.join(directory, f"flight-{rank}")


class BlackBox:
    """The last ``BOX_SLOTS`` ops in a file: a shared mapping outlives the process, so the
    kernel can read it after a SIGKILL or an abort."""

    def __init__(self, path: str):
        size = _COUNT.size + BOX_SLOTS * SLOT_BYTES
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.count = 0
        self.lock = threading.Lock()  # DDP's comm hook may record from an autograd thread

    def write(self, record: Op) -> None:
        text = f"{record.op}\x1f{record.group}\x1f{record.shape}\x1f{record.line}".encode()
        text = text[: SLOT_BYTES - _SLOT.size - 1] + b"\0"
        with self.lock:
            record.box = at = _COUNT.size + self.count % BOX_SLOTS * SLOT_BYTES
            _SLOT.pack_into(self.map, at, record.seq, record.nbytes, record.start, math.nan)
            self.map[at + _SLOT.size : at + _SLOT.size + len(text)] = text
            self.count += 1
            _COUNT.pack_into(self.map, 0, self.count)

    def update(self, record: Op) -> None:
        """Its sequence number and end time now, unless a newer op has taken its slot."""
        with self.lock:
            start = _SLOT.unpack_from(self.map, record.box)[2]
            if start == record.start:
                end = math.nan if record.end is None else record.end
                _SLOT.pack_into(self.map, record.box, record.seq, record.nbytes, start, end)


def read_black_box(path: str) -> list[Op]:
    """A black box's ops, oldest first (groups as c10d names); [] if there is none."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return []
    if len(data) < _COUNT.size:
        return []
    count = _COUNT.unpack_from(data)[0]
    ops = []
    for i in range(max(0, count - BOX_SLOTS), count):
        at = _COUNT.size + i % BOX_SLOTS * SLOT_BYTES
        seq, nbytes, start, end = _SLOT.unpack_from(data, at)
        if seq < 0:
            continue  # withdrawn
        text = data[at + _SLOT.size : at + SLOT_BYTES].partition(b"\0")[0].decode(errors="replace")
        op, group, shape, line = (*text.split("\x1f", 3), "", "", "")[:4]
        ops.append(Op(op, group, seq, nbytes, shape, start, None if math.isnan(end) else end, line))
    return ops


def dead(rank: int, ops: list[Op], labels: dict[str, str]) -> Location:
    """A dead rank's ``Location`` from its black box's ops, groups labelled by ``labels``
    (a live rank's: group names are the same on every rank)."""
    recent = [replace(op, group=labels.get(op.group, op.group)) for op in ops]
    if not recent:
        return Location(rank, "dead")
    last = recent[-1]
    counts = {op.group: op.seq for op in recent}
    return Location(rank, "dead", last.op, last.group, last.seq, last.line, last.shape,
                    recent=recent, counts=counts)  # fmt: skip


_box: BlackBox | None = None
compat: Any = None  # pdlab.compat, imported by install (it imports torch)


_replaced: list[tuple[Any, str, Any]] = []  # (owner, name, what it held): uninstall puts back


def _replace(owner: Any, name: str, recorder: Any, *args: Any) -> None:
    """``owner.name`` (a method of a pybind class, or a module's function) wrapped in
    ``recorder``; the attribute as ``owner`` held it is kept (a pybind method fetched
    through the class is a plain function: set back, it would not bind ``self``)."""
    _replaced.append((owner, name, vars(owner)[name]))
    setattr(owner, name, recorder(getattr(owner, name), *args))


def install(black_box: str | None = None) -> None:
    """Start recording this process's collectives and point-to-point ops (idempotent); keep
    the last ones in a black box file at ``black_box`` too, if given."""
    global _installed, _box, compat, _library
    if _installed:
        return
    import torch
    import torch.distributed as dist

    _library += (os.path.dirname(torch.__file__) + os.sep,)

    from pdlab import compat

    if black_box is not None:
        _box = BlackBox(black_box)
    for method, op in compat.PROCESS_GROUP_OPS.items():
        if method in vars(dist.ProcessGroup):
            _replace(dist.ProcessGroup, method, _record_method, op)
    _replace(dist.Work, "wait", _record_wait)
    funcol = compat.functional_collectives()
    for function, op in compat.FUNCTIONAL_OPS.items():
        if hasattr(funcol, function):
            _replace(funcol, function, _record_functional, op)
    _replace(funcol, "wait_tensor", _record_wait)
    _installed = True


def uninstall() -> None:
    """Stop recording (``benchmarks/flight.py`` compares with and without)."""
    global _installed, _box
    while _replaced:
        owner, name, held = _replaced.pop()
        setattr(owner, name, held)
    _pending.clear()
    _box, _installed = None, False


def ops() -> list[Op]:
    """The recorded ops, oldest first (groups as c10d names)."""
    return list(_ring)


# ---- where am I? (on a rank, from any thread) --------------------------------------------


def group_labels() -> dict[str, str]:
    """c10d's group names -> the labels reports use ("world", "dp", ...), one per group.

    pdlab's own names ("dp", "tp") where ``pdlab.measure.comm`` is loaded; else "world" for the
    default group and the group's description or name for others. Two groups with one label
    (a DeviceMesh's copy of the world) are told apart by their c10d name.
    """
    import torch.distributed as dist

    from pdlab import compat

    comm = sys.modules.get("pdlab.measure.comm")  # not imported for this: DTensor takes a second
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
    """``record`` as reports carry it: its group's label, no handle."""
    return replace(record, group=labels.get(record.group, record.group), handle=None, box=-1)


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
    for _ in range(3):  # one moment: look again if the main thread issued an op meanwhile
        issued = compat.sequence_numbers()
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
        if compat.sequence_numbers() == issued:
            break
    state = "finished" if not in_call else "waiting" if waited is not None else "running"
    last = reported(waited, labels) if waited is not None else recent[-1] if recent else None
    stack = _user_frames(frame) if in_call else []
    line = _issuer(frame) if state == "running" else last.line if last else None
    counts = {labels.get(name, name): n for name, n in issued.items()}
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
        labels,
        time.time(),
    )
