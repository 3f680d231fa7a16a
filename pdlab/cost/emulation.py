"""Link emulation: the ranks' real ops, completing as late as they would on a slower link.

    pdlab.train(cluster, strategy="dp", link="100Mbit/s")         # a 100 Mbit/s link per rank
    pdlab.train(cluster, strategy="dp", link="100Mbit/s:shared")  # one 100 Mbit/s medium for all
    python -m pdlab run --strategy dp --world-size 2 --model gpt --link 25Gbit/s@5us

A link is what ``pdlab.cost.topology.parse_link`` reads (a preset such as ``nvlink4``, or a rate
with an optional latency), optionally followed by ``:shared``. The ops themselves run as
before over loopback (same bytes, same results); only their completion moves. For an op of a
step (everything ``pdlab.measure.comm.CommMeter`` records: c10d and functional collectives, p2p, and
DDP's buckets through its comm hook), with ``model`` its time on the link:

    ready = when the op really completed here (every participant had joined and the bytes
            had crossed loopback)
    start = max(ready, when this rank's link is done with the ops before it,
                a receive's: with the sends on their way out when it was issued)
    done  = start + model

``ready`` stands for "every participant is there": gloo (like NCCL) moves bytes only once both
ends of a transfer have posted it, so a collective or a send on the slow link would start no
earlier. The loopback transfer itself is counted on top of the model: it is mostly CPU work
(copies, the reduction's additions) that the slow link needs too. A rank's link carries one
op at a time (first ready, first served): DDP's buckets queue behind each other as they would
on the wire. Per rank, sends use the outgoing direction, receives the incoming one and
collectives both (links are full duplex); a receive waits for the sends on their way out
when it was issued, as gloo's receiver says it is ready on its outgoing direction (``_Link``);
the all-gather and all-to-all of two ranks, which gloo runs send first, carry their bytes in
after their bytes out, segment by segment (``SEND_FIRST``).

How ops complete late without blocking anyone who does not wait for them: an op's Work is
swapped for one made from a future that a timer thread completes at ``done`` (async ops,
isend, DDP's bucket futures, FSDP2's async collectives: the issuing thread carries on and
overlap with compute shows as on the link; sync ops wait on it like on the real Work). A
functional collective (DTensor) is held at its ``wait_tensor``, its ready time being when that
wait returned. Ops outside a training step (building a strategy, ``full_state_dict``) are not
emulated.

Each op's event (``pdlab.measure.comm.CommEvent``, a row of ``TrainResult.comm``) records
``model_seconds`` (its time on the link) and ``added_seconds`` (``done - ready`` as the timer
thread let it through: what the emulation added, queueing included). ``seconds -
added_seconds`` is what it took here, waiting for its peers included; where that exceeds
``model_seconds`` the emulated link is faster than this machine's transport and the op ran at
this machine's pace plus the model (``summary`` counts such ops).

``:shared`` is one medium that all ranks' bytes cross, as a loopback device throttled by the
kernel (``tc qdisc ... tbf``, benchmarks/emulation.py) is: an op takes the bytes *all* its
participants put on the medium divided by the rate (``costmodel.shared_medium_op_time``), and
the ops of all ranks in flight at once share the rate equally (``_Medium``; the ranks count
each other's on a ``_Board`` in /dev/shm, so all must run on one machine).
"""

from __future__ import annotations

import heapq
import itertools
import mmap
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from pdlab import compat
from pdlab.cost.costmodel import directions, link_bytes, link_op_time, shared_medium_op_time
from pdlab.cost.topology import Link, parse_link
from pdlab.training import loop

if TYPE_CHECKING:
    import pandas as pd

    from pdlab.measure.comm import CommEvent

SHARED = ":shared"
# gloo's all-gather and all-to-all post each send before the receive beside it
# (gloo/allgather.cc, gloo/alltoall.cc). On two ranks both are with the one peer, over one
# connection: a rank that comes second finds its peer's receives posted and sends at once, and
# each notice that it is ready to receive (NOTIFY_RECV_READY, gloo/transport/tcp/pair.cc)
# leaves behind the segment it sent just before, so the peer's segment k comes in once this
# rank's segment k is out (``_Link``'s rule for a receive, inside one op). With s segments a
# way (the all-to-all sends its block whole, the all-gather in two halves), the op takes
# (s + 1) / s of its bytes' time: 2x and 1.5x. Emulated full duplex, ep's step came out at
# 0.60 and zero3's at 0.77 of the same step on a NIC per rank (benchmarks.nic_per_rank, world
# 2). With more ranks the peers differ and the two directions overlap in part: not modelled.
SEND_FIRST = {"all_to_all": 1, "all_gather": 2}  # op -> segments a way
# A send whose receiver is waiting completes over loopback within this; one whose receiver
# comes later waits for it. Ring attention's 256 KB sends (world 2, gpt, 30 Mbit/s) took
# 0.5-1.9 ms at once, 3-6 ms in 3 of 96, and 18 ms or more when they waited; a pipeline's 64 KB
# 0.5-1.4 ms or 18 ms and more. A send read the wrong way moves a receive by at most the
# send's own time on the link: small on the fast links where waits are short.
AT_ONCE_S = 0.005
# Python hands the GIL between threads every 5 ms by default: a completion noticed by the
# timer or a gloo thread while the main thread computes could wait that long for it.
SWITCH_INTERVAL_S = 0.0005


@dataclass(frozen=True)
class EmulatedLink:
    """A link to emulate: one per rank (``shared=False``) or one medium all ranks share."""

    link: Link
    shared: bool = False

    def op_seconds(
        self, op: str, nbytes: float, group_size: int, backend: str | None = None
    ) -> float:
        """``op``'s time on this link; ``nbytes`` is the payload (for a recv: bytes received);
        ``backend``: whose algorithm's bytes it carries (``costmodel.link_bytes``). On a link
        per rank, gloo's ``SEND_FIRST`` ops between two ranks take (s + 1) / s of their bytes'
        time (s: their segments a way)."""
        if self.shared:
            return shared_medium_op_time(op, nbytes, group_size, self.link, backend)
        seconds = link_op_time(op, nbytes, group_size, self.link, backend)
        if backend == "gloo" and op in SEND_FIRST and group_size == 2:
            one_way = link_bytes(op, nbytes, group_size, backend) / self.link.bandwidth
            seconds += one_way / SEND_FIRST[op]
        return seconds


def parse(spec: str | EmulatedLink) -> EmulatedLink:
    """An ``EmulatedLink`` from ``"100Mbit/s"``, ``"25Gbit/s@5us:shared"``, ``"nvlink4"``, ...;
    ValueError naming the accepted forms otherwise."""
    if isinstance(spec, EmulatedLink):
        return spec
    text = str(spec).strip()
    shared = text.endswith(SHARED)
    try:
        return EmulatedLink(parse_link(text.removesuffix(SHARED)), shared)
    except ValueError as exc:
        if not str(exc).startswith("can't read link"):
            raise  # it was read: one of its values is wrong
        raise ValueError(
            f"{exc}; add ':shared' for one medium all ranks share ('100Mbit/s:shared')"
        ) from None


class _Timer:
    """Runs callbacks at ``time.perf_counter()`` deadlines, on one daemon thread."""

    def __init__(self) -> None:
        self._due: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()  # ties keep their order; callbacks are never compared
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="pdlab-link", daemon=True)
        self._thread.start()

    def at(self, deadline: float, callback: Callable[[], None]) -> None:
        with self._wake:
            if not self._closed:
                heapq.heappush(self._due, (deadline, next(self._order), callback))
                self._wake.notify()
                return
        # Closed (an op that really completed after its run ended): now, never strand a
        # waiter; on a thread of its own, as callers may hold locks the callback takes.
        threading.Thread(target=callback, daemon=True).start()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Run everything still pending now, then stop the thread."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._due or (not self._closed and self._due[0][0] > time.perf_counter()):
                    if self._closed and not self._due:
                        return
                    timeout = self._due[0][0] - time.perf_counter() if self._due else None
                    self._wake.wait(timeout)
                _, _, callback = heapq.heappop(self._due)
            callback()


def _forward(source: torch.futures.Future, target: torch.futures.Future) -> None:
    """Complete ``target`` as ``source`` completed: same value, or same error."""
    try:
        value = source.value()
    except Exception as exc:
        target.set_exception(exc)
    else:
        target.set_result(value)


class _Link:
    """A link per rank: each direction carries one op at a time, first ready first served
    (sends go out, receives come in, collectives use both).

    A receive issued after a send was on its way starts once that send is through. gloo moves
    a transfer's bytes only once its receiver has said it is ready, and that notice goes out on
    the receiver's link, queued behind the bytes it is already sending: a both-ways exchange
    whose ranks each send first takes twice its bytes / rate on a real NIC
    (``benchmarks.nic_per_rank``: 64 KB both ways 34.7 ms, receives first 18.5 ms, for 17.5
    ms of bytes). A send is on its way (here, over loopback) from its receiver's notice on:
    when it was ready (complete here) before the receive was issued, or, to the peer the
    receive is from, when it was issued before the receive and went out at once (ready within
    ``AT_ONCE_S`` of its issue: its receiver was waiting). The second is the rank that comes
    late to an exchange: its send is out before its receive is asked for, though loopback
    completes it just after, and the notice follows the whole send on their one connection.
    To another peer the notice takes another connection and waits only for what is queued
    in the NIC (a pipeline's middle stages at world 3: counting the whole send put GPipe's
    emulated step 12-14% over the real one).
    """

    def __init__(self, timer: _Timer):
        self._timer = timer
        self._free: dict[str, float] = {}  # direction -> perf_counter() when it is next free
        # (issued, ready, through, peer) of the sends not yet through
        self._sends: list[tuple[float, float, float, int]] = []
        self._lock = threading.Lock()

    def start(self, event: CommEvent, done: Callable[[], None], issued: float) -> None:
        ways = directions(event.op)
        with self._lock:
            now = time.perf_counter()
            start = max(now, *(self._free.get(d, 0.0) for d in ways))
            if event.op == "recv":
                ahead = [
                    end
                    for sent, ready, end, to in self._sends
                    if ready < issued or (to == event.peer and _at_once(sent, ready, issued))
                ]
                start = max([start, *ahead])
            end = start + event.model_seconds
            self._free.update(dict.fromkeys(ways, end))
            if event.op == "send":
                self._sends = [s for s in self._sends if s[2] > now]
                self._sends.append((issued, now, end, event.peer))
        self._timer.at(end, done)


def _at_once(sent: float, ready: float, asked: float) -> bool:
    """Whether a send issued at ``sent`` and ready at ``ready`` had gone out at once, before
    a receive was asked for at ``asked`` (``_Link``)."""
    return sent <= asked and ready - sent <= AT_ONCE_S


class _Board:
    """How many ops are on a shared medium, over all ranks of a run on this machine: a file
    in /dev/shm that every rank maps, a float64 a rank holding its share of the ops in flight
    (1/2 for each end of a send, 1/n for each of a collective's n ranks)."""

    def __init__(self, path: str, rank: int, world_size: int):
        with open(path, "r+b") as file:
            self._map = mmap.mmap(file.fileno(), 8 * world_size)
        self._slots = memoryview(self._map).cast("d")
        self._rank = rank

    @classmethod
    def create(cls, group: dist.ProcessGroup) -> _Board:
        """One board for ``group``'s ranks (a collective: each of them calls it). The file is
        gone once all have mapped it, so nothing is left behind, even by a crash."""
        rank, shm = dist.get_rank(group), "/dev/shm" if os.path.isdir("/dev/shm") else None
        path = [None]
        if rank == 0:
            fd, path[0] = tempfile.mkstemp(prefix="pdlab-medium-", dir=shm)
            os.ftruncate(fd, 8 * group.size())
            os.close(fd)
        dist.broadcast_object_list(path, src=dist.get_global_rank(group, 0), group=group)
        if not os.path.exists(path[0]):
            raise ValueError(
                "a ':shared' link is one machine's medium, but this rank runs on another "
                "machine than rank 0: emulate a link per rank (drop ':shared')"
            )
        board = cls(path[0], rank, group.size())
        dist.barrier(group)
        if rank == 0:
            os.unlink(path[0])
        return board

    def set(self, flows: float) -> None:
        self._slots[self._rank] = flows

    def total(self) -> float:
        return sum(self._slots)

    def close(self) -> None:
        self._slots.release()
        self._map.close()


class _Medium:
    """One medium for everything every rank sends or receives: the ops on it share its rate
    equally (processor sharing: what TCP flows through one qdisc roughly get), so two
    transfers at once both take twice as long, rather than one after the other.

    This rank tracks its own ops; with a ``board`` it counts those of all ranks (at world
    size 2 every transfer involves both ranks, so its own are all there are) and looks again
    every ``POLL_S`` while it has ops in flight, as others start and finish theirs."""

    POLL_S = 0.002

    def __init__(self, timer: _Timer, board: _Board | None = None):
        self._timer, self._board = timer, board
        self._left: dict[int, list] = {}  # op -> [seconds of work left at full rate, done, share]
        self._ids = itertools.count()
        self._since = 0.0  # when ``_left`` was last brought up to date
        self._version = 0  # of the pending wake-up; only the newest one acts
        self._lock = threading.Lock()

    def start(self, event: CommEvent, done: Callable[[], None], issued: float) -> None:
        share = 0.5 if event.op in ("send", "recv") else 1 / event.group_size
        with self._lock:
            self._update()
            self._left[next(self._ids)] = [event.model_seconds, done, share]
            self._wake_at_next_finish()

    def _flows(self) -> float:
        """Ops on the medium now, all ranks'."""
        return self._board.total() if self._board is not None else len(self._left)

    def _update(self) -> None:
        now, flows = time.perf_counter(), self._flows()
        for left in self._left.values():
            left[0] -= (now - self._since) / flows
        self._since = now

    def _wake_at_next_finish(self) -> None:
        if self._board is not None:
            self._board.set(sum(share for _, _, share in self._left.values()))
        self._version += 1
        if self._left:
            soonest = max(0.0, min(left for left, _, _ in self._left.values())) * self._flows()
            if self._board is not None:
                soonest = min(soonest, self.POLL_S)
            version = self._version
            self._timer.at(self._since + soonest, lambda: self._finish(version))

    def _finish(self, version: int) -> None:
        with self._lock:
            if version != self._version:  # an op started since: a later wake-up is due
                return
            self._update()
            closing = self._timer.closed  # then everything is through at once
            finished = [op for op, (left, *_) in self._left.items() if left <= 1e-9 or closing]
            callbacks = [self._left.pop(op)[1] for op in finished]
            self._wake_at_next_finish()
        for done in callbacks:
            done()


class Emulator:
    """One rank's side of an emulated link: when each op it issues completes.

    ``pdlab.measure.comm.CommMeter(emulator=...)`` calls it for every op it records; the training
    loop keeps one per run (``emulating``), so the link's queue carries across steps.
    """

    def __init__(
        self,
        emulated: EmulatedLink,
        group: dist.ProcessGroup | None = None,
        device: torch.device | None = None,
    ):
        """``group``: all ranks of the run, for a shared medium to count each other's ops
        (a collective: each of them builds its Emulator at once). ``device``: where the ops'
        tensors live (a future holding CUDA tensors must name its GPU)."""
        self.emulated = emulated
        # The bytes its algorithm sends are what the link carries (gloo: 2x a ring's
        # reduce-scatter, a broadcast's root ⌈log2 n⌉ copies).
        self.backend = dist.get_backend(group) if group is not None else None
        self._devices = [device] if device is not None and device.type == "cuda" else None
        self._timer = _Timer()
        self._board = _Board.create(group) if emulated.shared and group is not None else None
        if emulated.shared:
            self._link = _Medium(self._timer, self._board)
        else:
            self._link = _Link(self._timer)

    def price(self, event: CommEvent) -> None:
        """Set ``event.model_seconds``: its time on the link (a recv's: what it receives)."""
        nbytes = event.received_bytes if event.op == "recv" else event.payload_bytes
        event.model_seconds = self.emulated.op_seconds(
            event.op, nbytes, event.group_size, self.backend
        )

    def delay_future(
        self,
        event: CommEvent,
        future: torch.futures.Future,
        issued: float,
        stamp: Callable[[], None],
    ) -> torch.futures.Future:
        """A future completing like ``future`` but at the op's emulated time (module docstring),
        issued at ``issued`` (``perf_counter()``); ``stamp()`` (``pdlab.measure.comm`` timing
        the op) just before."""
        late = torch.futures.Future(devices=self._devices)

        def complete() -> None:
            stamp()  # before completing: whoever waits on ``late`` may read the event at once
            _forward(future, late)

        def ready(_: torch.futures.Future) -> None:
            try:
                future.value()
            except Exception:  # a failed op (a peer died) costs no link time: report it now
                complete()
            else:
                self._start(event, complete, issued)

        future.add_done_callback(ready)
        return late

    def delay_works(
        self,
        event: CommEvent,
        out: Any,
        tensors: list[torch.Tensor],
        issued: float,
        stamp: Callable[[], None],
    ) -> Any:
        """``out`` (an eager c10d op's result) with its boxed Work swapped for a late one.
        ``tensors``: what a Work without a future of its own completes with."""

        def late(boxed: torch.ScriptObject) -> torch.ScriptObject:
            future = compat.work_completion(compat.unbox_work(boxed), tensors, self._devices)
            return compat.work_from_future(self.delay_future(event, future, issued, stamp))

        return compat.tree_map_only(torch.ScriptObject, late, out)

    def hold(self, event: CommEvent) -> None:
        """Block until the op, just waited for here, completes on the link (functional ops)."""
        done = threading.Event()
        self._start(event, done.set, time.perf_counter())
        done.wait()

    def close(self) -> None:
        self._timer.close()
        if self._board is not None:
            self._board.close()

    def _start(self, event: CommEvent, done: Callable[[], None], issued: float) -> None:
        """The op, issued at ``issued`` (``perf_counter()``), is ready (really complete here):
        put it on the link; ``done()`` when it is through, having noted in
        ``event.added_seconds`` how long that took."""
        ready = time.perf_counter()

        def through() -> None:
            event.added_seconds = time.perf_counter() - ready
            done()

        self._link.start(event, through, issued)


@contextmanager
def emulating(
    spec: str | EmulatedLink | None,
    group: dist.ProcessGroup | None = None,
    device: torch.device | None = None,
) -> Iterator[Emulator | None]:
    """An ``Emulator`` for ``spec`` for the duration (None for None); ``group`` and ``device``
    as for ``Emulator`` (the ranks of ``group`` all enter together). On exit, ops still
    pending complete at once and the timer thread stops."""
    if spec is None:
        yield None
        return
    emulator, interval = Emulator(parse(spec), group, device), sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        yield emulator
    finally:
        sys.setswitchinterval(interval)
        emulator.close()


def held_back(events: pd.DataFrame) -> float:
    """Wall seconds during which at least one of ``events`` (one rank's) was being held back:
    the union of their ``[done - added_seconds, done]`` spans (queued ops overlap)."""
    from pdlab.measure.trace import length, union

    done = events.start + events.seconds
    return length(union(list(zip(done - events.added_seconds, done, strict=True))))


def summary(comm: pd.DataFrame) -> dict[str, float | int]:
    """What emulation did in a run, from its ``TrainResult.comm``: per step (the median over
    steps) the busiest rank's modelled seconds and the time its ops were held back; and how
    many ops took longer here (loopback, waiting for peers included) than on the link."""
    per_rank = comm.groupby(["step", "rank"])
    per_step = {
        "model_seconds_per_step": per_rank.model_seconds.sum(),
        "held_back_seconds_per_step": per_rank[["start", "seconds", "added_seconds"]].apply(
            held_back
        ),
    }
    medians = {k: float(v.groupby("step").max().median()) for k, v in per_step.items()}
    slower_here = (comm.seconds - comm.added_seconds > comm.model_seconds).sum()
    return {**medians, "ops": len(comm), "ops_slower_here": int(slower_here)}


def faster_than_here(comm: pd.DataFrame, link: str) -> str | None:
    """A warning when most of a run's ops took longer here than on the emulated ``link``:
    its step times then show this machine's transport, not the link."""
    counts = summary(comm) if len(comm) else {"ops": 0, "ops_slower_here": 0}
    if counts["ops_slower_here"] <= counts["ops"] / 2:
        return None
    return (
        f"the emulated link {link} is faster than this machine's transport: "
        f"{counts['ops_slower_here']} of {counts['ops']} ops took longer here than on it, and "
        f"ran at this machine's pace (plus the link's time). Step times show this machine, "
        f"not {link}; pdlab.cost.costmodel predicts the link itself."
    )


# The trainer's hook for ``link=`` (this module is the ``LinkEmulation`` it asks for).
loop.link_emulation = sys.modules[__name__]
