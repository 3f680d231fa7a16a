"""Communication accounting: every collective and point-to-point op a rank issues, in bytes.

``CommMeter`` is a ``TorchDispatchMode``. Every ``torch.distributed`` call (``all_reduce``,
``send``, ``all_gather_into_tensor``, ...) reaches the dispatcher as a ``c10d`` op, and DTensor
redistributions as ``_c10d_functional`` ops, so strategies just call ``torch.distributed``
and the meter sees it — scratch code, DTensor, FSDP2 and pipelining alike (checked on gloo,
torch 2.13). Code whose communication must be counted by hand (DDP's comm hook) calls
``record`` and issues the op inside ``unmetered()`` so nothing is counted twice.

Conventions (nccl-tests, doc/PERFORMANCE.md), for a group of N ranks:

- payload S, per rank per op = the buffer the op is about: all_reduce, broadcast, reduce:
  the tensor; all_gather, gather: the gathered (full) output; reduce_scatter, scatter,
  all_to_all: the full input; send: the tensor, counted once, at the sender (a recv records
  0 bytes, for its time only; so does a barrier).
- bus bytes, per rank = what one rank's link carries on an optimal algorithm:
  all_reduce 2(N-1)/N·S (ring: reduce-scatter then all-gather); all_gather, reduce_scatter,
  all_to_all, gather, scatter (N-1)/N·S; broadcast, reduce S; send S.
- a step's ``comm_bytes`` is the payload summed over all ranks; ``bus_bytes`` likewise.
- sent and received bytes, per rank = what this rank's link carries out and in on the
  algorithm its backend runs (``traffic``): the bytes that cost time on a link, and what
  ``pdlab.measure.wire`` measures on gloo's sockets, up to gloo's message headers.
- ``seconds``: issue to completion: a collective's Work future (gloo's reduce-scatter has
  none: a thread waits on it), DTensor ops until their ``wait_tensor``. Gloo p2p Works have
  no future, so a send/recv's seconds are only the time to issue it (the wait comes later),
  except on an emulated link, which waits for them, and for recvs in a meter that times
  them (``CommMeter(time_receives=True)``).
- ``busy``: the seconds the metering thread had computed (run or waited for a core, not
  slept: ``pdlab.measure.busy``) since the meter was entered, when the op was issued;
  ``done_busy``: the same when it completed. A rank that blocked on the op computed nothing
  in between; one that went on computing (torch's looped pipeline schedules post a recv long
  before the stage that needs it) shows how far. ``peer``: the global rank a send goes to or
  a recv comes from (-1 for collectives). ``pdlab.predict`` replays a step from these.

A meter given an emulator (``CommMeter(emulator=...)``, ``pdlab.cost.emulation``) also makes every
op it records complete as late as it would on the emulated link, and notes by how much.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from pdlab import compat
from pdlab.compat import TorchDispatchMode, tree_flatten
from pdlab.measure.busy import BusyClock


class LinkModel(Protocol):
    """What a meter asks of a model of a slower link (``CommMeter(emulator=...)``).

    Measurement defines this hook and knows no link model: ``pdlab.cost.emulation.Emulator``,
    a layer above, fills it in.
    """

    def price(self, event: CommEvent) -> None:
        """Set ``event.model_seconds``: the op's time on the link."""

    def delay_future(
        self, event: CommEvent, future: Any, issued: float, stamp: Callable[[], None]
    ) -> Any:
        """A future completing when the link would have delivered ``future``'s op, having
        called ``stamp()`` (which times the op) just before."""

    def delay_works(
        self, event: CommEvent, out: Any, tensors: Any, issued: float, stamp: Callable[[], None]
    ) -> Any:
        """``out`` (a c10d op's works) completing when the link would have; ``stamp`` as above."""

    def hold(self, event: CommEvent) -> None:
        """Block until the link would have delivered ``event`` (a functional op's wait)."""


@dataclass
class CommEvent:
    """One op on one rank: its group, payload and bus bytes (see the module docstring)."""

    op: str
    group: str
    group_size: int
    payload_bytes: int
    bus_bytes: float
    seconds: float = 0.0
    start: float = 0.0  # time.time() at issue
    busy: float = 0.0  # the rank's compute seconds in this step before the op was issued
    done_busy: float = -1.0  # ... when it completed (-1: not seen: a send on gloo)
    peer: int = -1  # send/recv: the other rank (global); collectives: -1
    tag: int = 0  # send/recv: the tag a recv matches its send by (two streams between a pair)
    model_seconds: float = 0.0  # its time on the emulated link (pdlab.cost.emulation), else 0
    added_seconds: float = 0.0  # how much later than here the emulated link completed it
    sent_bytes: float = 0.0  # this rank's link, out and in (``traffic``)
    received_bytes: float = 0.0
    rank: int | None = None  # the rank that issues it (None: a formula that doesn't say)


def bus_bytes(op: str, payload_bytes: int, group_size: int) -> float:
    """Bytes one rank's link carries for ``op`` with payload S on ``group_size`` ranks."""
    n = group_size
    if op == "all_reduce":
        return payload_bytes * 2 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter", "all_to_all", "gather", "scatter"):
        return payload_bytes * (n - 1) / n
    if op in ("broadcast", "reduce", "send"):
        return float(payload_bytes)
    if op in ("recv", "barrier"):
        return 0.0
    raise ValueError(f"unknown comm op {op!r}")


def tree_children(position: int, n: int) -> int:
    """Ranks that the rank ``position`` places from the root sends to in a binomial tree of
    ``n``: in round k every rank that has the data (positions below 2^k) sends it 2^k on."""
    return sum(1 for k in range(n.bit_length()) if position < 2**k and position + 2**k < n)


def traffic(
    op: str, nbytes: int, group_size: int, position: int = 0, backend: str = "gloo"
) -> tuple[float, float]:
    """``(sent, received)``: the bytes one rank's link carries out and in for ``op``, on the
    algorithm ``backend`` runs, without message headers.

    ``nbytes`` is the op's payload (a recv's: the tensor it receives); ``position`` is this
    rank's place from the root, ``(group rank - root) mod n``, for rooted ops. gloo, as its
    sockets count it (``tests/test_traffic.py`` checks each op at 2 and 4 ranks; 3 and 5 were
    measured once, by hand): ring all-reduce
    and all-gather; its reduce-scatter *is* an all-reduce (each rank keeps its slice, so it
    costs twice a ring reduce-scatter); a binomial-tree broadcast (the root sends S to
    ⌈log2 n⌉ ranks); reduce as a ring reduce-scatter, then every slice to the root. Other
    backends (NCCL) take nccl-tests' ring: reduce-scatter (n-1)/n·S, a chain for broadcast
    and reduce. Not measured here: NCCL moves its bytes outside TCP.
    """
    n, s = group_size, float(nbytes)
    ring = (n - 1) / n * s
    gloo = backend == "gloo"
    if op == "send":
        return s, 0.0
    if op == "recv":
        return 0.0, s
    if op == "barrier":
        return 0.0, 0.0
    if op == "all_reduce" or (op == "reduce_scatter" and gloo):
        return 2 * ring, 2 * ring
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return ring, ring
    root = position == 0
    if op == "gather":  # S is the gathered output: n inputs of S/n
        return (0.0, ring) if root else (s / n, 0.0)
    if op == "scatter":
        return (ring, 0.0) if root else (0.0, s / n)
    if op == "broadcast" and gloo:
        return tree_children(position, n) * s, 0.0 if root else s
    if op == "broadcast":  # a chain from the root: all but the last pass S on
        return (s if position < n - 1 else 0.0), (0.0 if root else s)
    if op == "reduce" and gloo:
        return (ring, 2 * ring) if root else (ring + s / n, ring)
    if op == "reduce":  # the broadcast's chain, run backwards
        return (0.0 if root else s), (s if position < n - 1 else 0.0)
    raise ValueError(f"unknown comm op {op!r}")


# The backend whose algorithms ``event`` sizes the formulas' traffic for (``algorithms``).
_formula_backend: contextvars.ContextVar[str] = contextvars.ContextVar("backend", default="gloo")


@contextmanager
def algorithms(backend: str) -> Iterator[None]:
    """Formulas (``event``) called inside size sent and received bytes for ``backend``."""
    token = _formula_backend.set(backend)
    try:
        yield
    finally:
        _formula_backend.reset(token)


def event(
    op: str,
    nbytes: int,
    group: str,
    group_size: int,
    rank: int | None = None,
    position: int = 0,
    backend: str | None = None,
) -> CommEvent:
    """An analytic event, as ``expected_comm`` formulas list them, issued by ``rank``.

    ``nbytes``: the tensor's bytes; a recv's payload is 0 (a transfer counts once, at the
    sender) but it receives ``nbytes``. ``position``: see ``traffic``. ``backend``: whose
    algorithms size the traffic (default: ``algorithms``'s).
    """
    payload = 0 if op == "recv" else nbytes
    sent, received = traffic(op, nbytes, group_size, position, backend or _formula_backend.get())
    return CommEvent(
        op,
        group,
        group_size,
        payload,
        bus_bytes(op, payload, group_size),
        sent_bytes=sent,
        received_bytes=received,
        rank=rank,
    )


def on_ranks(events: list[CommEvent], ranks: Iterable[int]) -> list[CommEvent]:
    """``events`` issued by each of ``ranks`` (a formula that is the same on every rank)."""
    return [replace(e, rank=r) for r in ranks for e in events]


def totals(events: Iterable[CommEvent]) -> dict[tuple[str, str], tuple[int, float]]:
    """``{(op, group): (payload_bytes, bus_bytes)}`` summed; zero-byte events (recv) left out."""
    sums: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.payload_bytes:
            sums[e.op, e.group][0] += e.payload_bytes
            sums[e.op, e.group][1] += e.bus_bytes
    return {k: (p, b) for k, (p, b) in sums.items()}


# ---- group names -------------------------------------------------------------------------

_group_names: dict[str, str] = {}  # ProcessGroup.group_name -> "dp", "tp", ...


def name_group(pg: dist.ProcessGroup, name: str) -> None:
    """Report ops on ``pg`` under ``name`` ("dp", "tp", "pp", ...)."""
    _group_names[pg.group_name] = name


def group_label(pg: dist.ProcessGroup | None) -> str:
    """The name ops on ``pg`` are reported under: registered, else "world" (all ranks) or
    the DeviceMesh dim."""
    pg = pg or dist.group.WORLD
    if pg.group_name in _group_names:
        return _group_names[pg.group_name]
    if pg.size() == dist.get_world_size():  # WORLD, or a copy (torch 2.11's 1-D DeviceMesh)
        return "world"
    # DeviceMesh describes its groups as "mesh_<dim>".
    return pg.group_desc.removeprefix("mesh_") if pg.group_desc else pg.group_name


# ---- what each op carries ----------------------------------------------------------------

# op name -> (reported op, argument holding the payload, payload scales with group size).
_C10D_OPS = {
    "allreduce_": ("all_reduce", "tensors", False),
    "allreduce_coalesced_": ("all_reduce", "tensors", False),
    "broadcast_": ("broadcast", "tensors", False),
    "reduce_": ("reduce", "tensors", False),
    "allgather_": ("all_gather", "output_tensors", False),
    "_allgather_base_": ("all_gather", "output_tensor", False),
    "allgather_coalesced_": ("all_gather", "output_lists", False),
    "allgather_into_tensor_coalesced_": ("all_gather", "outputs", False),
    "reduce_scatter_": ("reduce_scatter", "input_tensors", False),
    "_reduce_scatter_base_": ("reduce_scatter", "input_tensor", False),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", "inputs", False),
    "alltoall_": ("all_to_all", "input_tensors", False),
    "alltoall_base_": ("all_to_all", "input", False),
    "gather_": ("gather", "input_tensors", True),  # only the root holds the output
    "scatter_": ("scatter", "output_tensors", True),  # only the root holds the input
    "send": ("send", "tensors", False),
    "recv_": ("recv", "tensors", False),  # payload 0: counted at the sender
    "recv_any_source_": ("recv", "tensors", False),
    "barrier": ("barrier", None, False),
    "monitored_barrier_": ("barrier", None, False),
}
_FUNCTIONAL_OPS = {
    "all_reduce": ("all_reduce", "input", False),
    "all_reduce_": ("all_reduce", "input", False),
    "all_reduce_coalesced": ("all_reduce", "inputs", False),
    "all_reduce_coalesced_": ("all_reduce", "inputs", False),
    "all_gather_into_tensor": ("all_gather", "input", True),
    "all_gather_into_tensor_out": ("all_gather", "input", True),
    "all_gather_into_tensor_coalesced": ("all_gather", "inputs", True),
    "reduce_scatter_tensor": ("reduce_scatter", "input", False),
    "reduce_scatter_tensor_out": ("reduce_scatter", "input", False),
    "reduce_scatter_tensor_coalesced": ("reduce_scatter", "inputs", False),
    "broadcast": ("broadcast", "input", False),
    "broadcast_": ("broadcast", "input", False),
    "all_to_all_single": ("all_to_all", "input", False),
    "isend": ("send", "tensor", False),
    "irecv": ("recv", "tensor", False),
}


COMM_NAMESPACES = ("c10d", "_c10d_functional")
_ASYNC_COLLECTIVE_TENSOR = compat.async_collective_tensor()


def _nbytes(x: Any) -> int:
    return sum(
        t.numel() * t.element_size() for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)
    )


def measured(
    op: str, nbytes: int, pg: dist.ProcessGroup, root: int | None = None, received: int = 0
) -> CommEvent:
    """The event of an op this rank issued on ``pg`` (``root``: its group rank, rooted ops).

    ``received`` adds bytes received beside sending ``nbytes`` (a batch of p2p ops)."""
    n = pg.size()
    position = (pg.rank() - root) % n if root is not None else 0
    e = event(op, nbytes, group_label(pg), n, dist.get_rank(), position, dist.get_backend(pg))
    return replace(e, received_bytes=e.received_bytes + received) if received else e


def _moved(t: torch.Tensor, splits: list[int], pg: dist.ProcessGroup) -> float:
    """The bytes of an ``all_to_all_single`` buffer that cross the link: all but this rank's
    own split, which stays in place (no split sizes: ``n`` equal splits)."""
    rows = t.shape[0] if t.dim() else 0
    if not rows:
        return 0.0
    mine = splits[pg.rank()] if splits else rows // pg.size()
    return _nbytes(t) * (rows - mine) / rows


def _describe(func: Any, args: tuple, kwargs: dict) -> CommEvent | None:
    """The event for a c10d op call (not yet timed), or None if ``func`` isn't communication."""
    table = {"c10d": _C10D_OPS, "_c10d_functional": _FUNCTIONAL_OPS}.get(func.namespace, {})
    name = compat.op_name(func)
    if name == "batch_p2p_ops":  # (op_list, peer_list, tag_list, tensors, group_name)
        op_list, _, _, tensors, group_arg = args
        pg = compat.process_group(group_arg)
        sizes = {o: 0 for o in ("isend", "irecv")}
        for o, t in zip(op_list, tensors, strict=True):
            sizes[o] += _nbytes(t)
        return measured("send", sizes["isend"], pg, received=sizes["irecv"])
    if name not in table:
        return None
    op, tensor_arg, scales = table[name]
    bound = dict(zip(compat.op_arguments(func), args, strict=False)) | kwargs
    pg = compat.process_group(bound.get("process_group", bound.get("group_name")))
    nbytes = _nbytes(bound[tensor_arg]) * (pg.size() if scales else 1) if tensor_arg else 0
    e = measured(op, nbytes, pg, bound.get("root_rank", bound.get("src")))
    if name == "alltoall_base_":  # uneven splits (expert parallelism): sizes from the splits
        e.sent_bytes = _moved(bound["input"], bound["input_split_sizes"], pg)
        e.received_bytes = _moved(bound["output"], bound["output_split_sizes"], pg)
    if (peer := bound.get("dst", bound.get("src"))) is not None:
        e.peer = dist.get_global_rank(pg, peer)
        e.tag = int(bound.get("tag") or 0)
    return e


# ---- the meter ---------------------------------------------------------------------------

_active: list[CommMeter] = []  # all threads: DDP's hook may run on an autograd thread
_paused = threading.local()


def _stamp(event: CommEvent, t0: float, clock: BusyClock, *_: Any) -> None:
    """Note that ``event``'s op, issued at ``t0`` (``perf_counter()``), has completed."""
    event.seconds = time.perf_counter() - t0
    with contextlib.suppress(OSError):  # the thread has exited: not known
        event.done_busy = clock()


def _stamped(event: CommEvent, t0: float, clock: BusyClock, future: torch.futures.Future) -> Any:
    _stamp(event, t0, clock)
    return future.value()  # what the Work's result() gives


def _time_until_done(
    event: CommEvent, t0: float, clock: BusyClock, future: torch.futures.Future
) -> None:
    future.add_done_callback(functools.partial(_stamp, event, t0, clock))


def _timed(
    event: CommEvent,
    t0: float,
    meter: CommMeter,
    tensors: list[torch.Tensor],
    boxed: torch.ScriptObject,
) -> torch.ScriptObject:
    """An eager op's Work, timed until it completes: by its future's callback (gloo runs it
    as it completes the Work, before the Work's ``wait()`` returns). Gloo's send and recv
    have none: launch-timed (the module's docstring), unless ``meter.time_receives``. Its
    reduce-scatter has none either, and its ``wait()`` copies the result out (an all-reduce
    underneath) each time it is called. For those a thread waits on the Work once
    (``compat.work_completion``), and the caller gets a Work that completes once it is timed."""
    work = compat.unbox_work(boxed)
    try:
        _time_until_done(event, t0, meter.clock, work.get_future())
        return boxed
    except RuntimeError:  # "getFuture not implemented"
        if event.op == "send" or (event.op == "recv" and not meter.time_receives):
            return boxed
    timed = functools.partial(_stamped, event, t0, meter.clock)
    return compat.work_from_future(compat.work_completion(work, tensors).then(timed))


def record(op: str, nbytes: int, group: dist.ProcessGroup | None = None, future: Any = None) -> Any:
    """Count an op by hand in every active meter (for code outside the dispatcher).

    ``future`` (optional) completes with the op; the event is timed until then. Returns the
    future to hand on in its place: ``future`` itself, or on an emulated link a later one.
    """
    if not _active:
        return future
    pg = group or dist.group.WORLD
    e = measured(op, nbytes, pg)
    clock = _active[0].clock
    e.start, e.busy, t0 = time.time(), clock(), time.perf_counter()
    emulator = next((m.emulator for m in _active if m.emulator is not None), None)
    if future is not None and emulator is not None:
        emulator.price(e)
        future = emulator.delay_future(e, future, t0, functools.partial(_stamp, e, t0, clock))
    elif future is not None:
        _time_until_done(e, t0, clock, future)
    for meter in _active:
        meter.events.append(e)
    return future


@contextmanager
def unmetered() -> Iterator[None]:
    """Ops issued inside are not counted (they were counted with ``record``)."""
    _paused.on = True
    try:
        yield
    finally:
        _paused.on = False


def _storage(t: torch.Tensor) -> int:
    """What a functional collective's output and its views share (c10d waits by storage too)."""
    return t.untyped_storage().data_ptr()


class _Mode(TorchDispatchMode):
    def __init__(self, meter: CommMeter):
        super().__init__()
        self.meter = meter
        self.waiting: dict[int, tuple[torch.Tensor, CommEvent, float]] = {}  # by storage

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # A functional collective's result waits (wait_tensor) when an op first uses it:
        # let the wrapper do that with this mode still on, so the wait is seen here.
        if _ASYNC_COLLECTIVE_TENSOR in types:
            return NotImplemented
        if func.namespace not in COMM_NAMESPACES:  # the hot path: every aten op comes here
            return func(*args, **kwargs)
        # Let DTensor desugar into plain ops first (we see those); other subclasses (the
        # FakeTensors DTensor's sharding propagation runs on) just run.
        if DTensor in types:
            return NotImplemented
        e = None if getattr(_paused, "on", False) else _describe(func, args, kwargs)
        clock = self.meter.clock
        busy, start, t0 = clock(), time.time(), time.perf_counter()
        out = func(*args, **kwargs)
        if compat.is_wait_tensor(func):
            self._finish(args[0])
        if e is None:
            return out
        e.start, e.seconds, e.busy = start, time.perf_counter() - t0, busy
        self.meter.events.append(e)
        if func.namespace == "_c10d_functional":  # timed (and emulated) at its wait_tensor
            for t in tree_flatten(out)[0]:
                self.waiting[_storage(t)] = (t, e, t0)
        if (emulator := self.meter.emulator) is not None:
            emulator.price(e)
            if func.namespace == "c10d":
                stamp = functools.partial(_stamp, e, t0, clock)
                return emulator.delay_works(e, out, args[0], t0, stamp)
            return out
        # Eager ops return a boxed Work: timed until it completes.
        tensors = [t for t in tree_flatten(args[0])[0] if isinstance(t, torch.Tensor)]
        return compat.tree_map_only(torch.ScriptObject, functools.partial(_timed, e, t0, self.meter, tensors), out)  # fmt: skip

    def _finish(self, tensor: torch.Tensor) -> None:
        if (pending := self.waiting.pop(_storage(tensor), None)) is not None:
            _, e, t0 = pending
            if self.meter.emulator is not None:
                self.meter.emulator.hold(e)
            _stamp(e, t0, self.meter.clock)  # waited for here: done_busy is where


class CommMeter:
    """Records every communication op issued inside ``with CommMeter() as m:`` in ``m.events``.

    Async ops finish their timing when they complete; read ``events`` after waiting on them.
    """

    def __init__(
        self,
        dispatch: bool = True,
        names: dict[dist.ProcessGroup, str] | None = None,
        emulator: LinkModel | None = None,
        time_receives: bool = False,
    ) -> None:
        """``names`` labels groups for this meter only (``{tp_group: "tp"}``): one group can
        be "dp" in one run and "pp" in the next (a mesh dim spanning all ranks is the world).

        ``time_receives``: time gloo's recvs to completion too, through a thread that waits on
        each (they have no future; without it they are launch-timed, as sends are): for
        schedules that post a recv well before they wait for it.

        ``dispatch=False`` collects only ``record``-ed events: for code that counts all its
        own communication (DDP's comm hook), it spares every other op the dispatch mode's
        Python round trip (the mode costs a few microseconds per op, each op).

        ``emulator`` (``pdlab.cost.emulation.emulating``) delays every op recorded here."""
        self.events: list[CommEvent] = []
        self.busy = 0.0  # after the block: the entering thread's compute seconds inside it
        self.clock: BusyClock | None = None  # while entered
        self.emulator = emulator
        self.time_receives = time_receives
        self._mode = _Mode(self) if dispatch else None
        self._names = {pg.group_name: name for pg, name in (names or {}).items()}
        self._outer_names: dict[str, str | None] = {}

    def __enter__(self) -> CommMeter:
        self._outer_names = {k: _group_names.get(k) for k in self._names}
        _group_names.update(self._names)
        self.clock = BusyClock()
        _active.append(self)
        if self._mode is not None:
            self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode.waiting.clear()
        _active.remove(self)
        self.busy = self.clock()
        self.clock.close()
        for key, name in self._outer_names.items():
            if name is None:
                del _group_names[key]
            else:
                _group_names[key] = name
