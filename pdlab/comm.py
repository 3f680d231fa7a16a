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
- ``seconds``: issue to completion where the backend reports completion (a Work future:
  gloo and NCCL collectives; DTensor ops until their ``wait_tensor``). Gloo p2p Works have no
  future, so a send/recv's seconds are only the time to issue it (the wait comes later),
  except on an emulated link, which waits for them.
- ``busy``: the seconds the metering thread had computed (run or waited for a core, not
  slept: ``pdlab.busy``) since the meter was entered, when the op was issued; ``peer``: the
  global rank a send goes to or a recv comes from (-1 for collectives). ``pdlab.predict``
  replays a step from these.

A meter given an emulator (``CommMeter(emulator=...)``, ``pdlab.emulation``) also makes every
op it records complete as late as it would on the emulated link, and notes by how much.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from pdlab import compat
from pdlab.busy import BusyClock
from pdlab.compat import TorchDispatchMode, tree_flatten

if TYPE_CHECKING:
    from pdlab.emulation import Emulator


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
    peer: int = -1  # send/recv: the other rank (global); collectives: -1
    model_seconds: float = 0.0  # its time on the emulated link (pdlab.emulation), else 0
    added_seconds: float = 0.0  # how much later than here the emulated link completed it


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


def event(op: str, payload_bytes: int, group: str, group_size: int) -> CommEvent:
    """An analytic event, as ``expected_comm`` formulas list them."""
    return CommEvent(op, group, group_size, payload_bytes, bus_bytes(op, payload_bytes, group_size))


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
    "recv_": ("recv", None, False),
    "recv_any_source_": ("recv", None, False),
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
    "irecv": ("recv", None, False),
}


COMM_NAMESPACES = ("c10d", "_c10d_functional")
_ASYNC_COLLECTIVE_TENSOR = compat.async_collective_tensor()


def _nbytes(x: Any) -> int:
    return sum(
        t.numel() * t.element_size() for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)
    )


def _describe(func: Any, args: tuple, kwargs: dict) -> CommEvent | None:
    """The event for a c10d op call (not yet timed), or None if ``func`` isn't communication."""
    table = {"c10d": _C10D_OPS, "_c10d_functional": _FUNCTIONAL_OPS}.get(func.namespace, {})
    name = compat.op_name(func)
    if name == "batch_p2p_ops":  # (op_list, peer_list, tag_list, tensors, group_name)
        op_list, _, _, tensors, group_arg = args
        pg = compat.process_group(group_arg)
        sent = sum(_nbytes(t) for o, t in zip(op_list, tensors, strict=True) if o == "isend")
        return CommEvent("send", group_label(pg), pg.size(), sent, float(sent))
    if name not in table:
        return None
    op, payload_arg, scales = table[name]
    bound = dict(zip(compat.op_arguments(func), args, strict=False)) | kwargs
    pg = compat.process_group(bound.get("process_group", bound.get("group_name")))
    payload = _nbytes(bound[payload_arg]) * (pg.size() if scales else 1) if payload_arg else 0
    e = CommEvent(op, group_label(pg), pg.size(), payload, bus_bytes(op, payload, pg.size()))
    if (peer := bound.get("dst", bound.get("src"))) is not None:
        e.peer = dist.get_global_rank(pg, peer)
    return e


# ---- the meter ---------------------------------------------------------------------------

_active: list[CommMeter] = []  # all threads: DDP's hook may run on an autograd thread
_paused = threading.local()


def _time_until_done(event: CommEvent, t0: float, future: torch.futures.Future) -> None:
    def done(_: torch.futures.Future) -> None:
        event.seconds = time.perf_counter() - t0

    future.add_done_callback(done)


def record(op: str, nbytes: int, group: dist.ProcessGroup | None = None, future: Any = None) -> Any:
    """Count an op by hand in every active meter (for code outside the dispatcher).

    ``future`` (optional) completes with the op; the event is timed until then. Returns the
    future to hand on in its place: ``future`` itself, or on an emulated link a later one.
    """
    if not _active:
        return future
    pg = group or dist.group.WORLD
    e = CommEvent(op, group_label(pg), pg.size(), nbytes, bus_bytes(op, nbytes, pg.size()))
    e.start, e.busy, t0 = time.time(), _active[0].clock(), time.perf_counter()
    emulator = next((m.emulator for m in _active if m.emulator is not None), None)
    if future is not None and emulator is not None:
        emulator.price(e, nbytes)
        future = emulator.delay_future(e, future, t0)
    elif future is not None:
        _time_until_done(e, t0, future)
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
        busy, start, t0 = self.meter.clock(), time.time(), time.perf_counter()
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
            emulator.price(e, _nbytes(args[0]) if e.op == "recv" else e.payload_bytes)
            if func.namespace == "c10d":
                return emulator.delay_works(e, out, args[0], t0)  # it times them
            return out
        for w in tree_flatten(out)[0]:
            if isinstance(w, torch.ScriptObject):  # eager ops return a boxed Work
                # Gloo p2p Works raise "getFuture not implemented": those stay launch-timed.
                with contextlib.suppress(RuntimeError):
                    _time_until_done(e, t0, compat.work_future(w))
        return out

    def _finish(self, tensor: torch.Tensor) -> None:
        if (pending := self.waiting.pop(_storage(tensor), None)) is not None:
            _, e, t0 = pending
            if self.meter.emulator is not None:
                self.meter.emulator.hold(e)
            e.seconds = time.perf_counter() - t0


class CommMeter:
    """Records every communication op issued inside ``with CommMeter() as m:`` in ``m.events``.

    Async ops finish their timing when they complete; read ``events`` after waiting on them.
    """

    def __init__(
        self,
        dispatch: bool = True,
        names: dict[dist.ProcessGroup, str] | None = None,
        emulator: Emulator | None = None,
    ) -> None:
        """``names`` labels groups for this meter only (``{tp_group: "tp"}``): one group can
        be "dp" in one run and "pp" in the next (a mesh dim spanning all ranks is the world).

        ``dispatch=False`` collects only ``record``-ed events: for code that counts all its
        own communication (DDP's comm hook), it spares every other op the dispatch mode's
        Python round trip (the mode costs a few microseconds per op, each op).

        ``emulator`` (``pdlab.emulation.emulating``) delays every op recorded here."""
        self.events: list[CommEvent] = []
        self.busy = 0.0  # after the block: the entering thread's compute seconds inside it
        self.clock: BusyClock | None = None  # while entered
        self.emulator = emulator
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
