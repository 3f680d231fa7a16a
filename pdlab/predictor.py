"""Step time on a cluster you choose, predicted from a run: ``pdlab.predict(result, topology)``.

    result = pdlab.train(cluster, strategy="dp", impl="torch", model="gpt", steps=20)
    pdlab.predict(result, pdlab.Topology.this_machine(cluster))   # this machine's compute
    pdlab.predict(result, "8xH100")                                # the run's FLOPs on H100s
    pdlab.predict(result, here("100Mbit/s", 2))                    # this machine, a slow link

One row a step, like ``result.steps``: ``compute``, ``exposed_comm`` and ``bubble`` of the
rank that finishes last (they add up to its time), ``step_time``, ``samples_per_s``, ``mfu``,
``comm`` (that rank's link time, hidden or not) and ``critical_rank``.

How: each rank's step is replayed as the run did it — the compute between its ops, every op
it issued (exact bytes, group, peer), in the measured order — with each op's time from
``pdlab.costmodel`` on the topology and the waits each strategy really does. The replay is
a small discrete-event simulation (``replay``): a collective starts when its last member
issues it, a recv completes when its send's transfer does, and a rank blocked on an op
waits for it. ``Assumptions`` lists every assumption; it is the one place they live.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pdlab.costmodel import op_time
from pdlab.parallel.registry import layout_for
from pdlab.topology import THIS_MACHINE, Device, Link, Topology, parse_link

if TYPE_CHECKING:
    from pdlab.cluster import Cluster
    from pdlab.training import TrainResult


@dataclass(frozen=True)
class Assumptions:
    """Everything the predictor assumes, in one place.

    Compute
    - On a topology whose device is this machine (``Topology.this_machine(cluster)`` or
      ``here(...)``), a rank's compute between two of its ops is what it measured then: its
      busy seconds (``pdlab.busy``: running, or waiting for a core — contention included).
    - On any other device, each rank's measured compute keeps its shape (where its ops fall)
      and is rescaled to ``flops / (peak[dtype] · efficiency) + kernels · op_overhead``: the
      FLOPs and kernel count of the rank's first step (``pdlab.flops``), the device's dense
      peak for ``dtype`` (pdlab trains in fp32; "tf32" or "bf16" ask "what if").
    - ``mfu``: the model's FLOPs for one global batch in one process (``flops.model_flops``,
      no recompute) over step time × ranks × peak. On this machine the peak is its measured
      matmul rate (NaN without a calibration).

    Communication
    - An op takes ``pdlab.costmodel.op_time`` for its exact payload on its group's ranks,
      placed on the topology (rank r on node r // gpus_per_node; the run's ranks take the
      first GPUs), with ``algorithm`` ("ring" or "hierarchical").
    - Ops on one process group run one at a time, in issue order (gloo and NCCL queue them).
      Different groups, and sends between different pairs of ranks (each direction), run
      side by side without slowing each other (each has its own link).
    - A collective starts when its last member has issued it and the group's previous op is
      done; every member has it back at its end. A send starts when issued (no handshake);
      the matching recv completes when that transfer does.

    Schedule: every op where and when the run issued it; a rank waits for an op
    - right after issuing it, unless listed below (TP's all-reduces, ZeRO's gathers and
      reduce-scatters, the parameter server's sends and receives, every recv);
    - gradient buckets (all-reduces on the dp group: DDP, scratch dp, the hybrids, ZeRO-1
      torch's DDP) are asynchronous and queue; the rank waits for them all right after
      issuing the last: what finishes after backward is exposed;
    - pipeline sends (pp group) are asynchronous, waited at the end of the step; their
      receives block, so a stage waits for its input (the bubble) through the measured
      order of forward and backward micro-batches, with p2p time on each edge;
    - FSDP2 (zero3 torch): on CPU ranks its collectives are synchronous (no streams:
      ``async_op=False``) and replayed so. On a GPU target it prefetches: each all-gather
      is issued as soon as the previous one is waited for and is waited for where the run
      did, overlapping the compute between; reduce-scatters are waited at the end.

    Not modelled: the memory traffic of compute, contention between links, stragglers other
    than the measured compute, the time to start a rank's step (every rank starts at 0).
    """

    efficiency: float = 0.5  # of the device's dense peak: what the planner assumes too
    dtype: str = "fp32"
    op_overhead: float = 10e-6  # s a kernel, PyTorch eager on a GPU: an assumption
    algorithm: str = "ring"

    def __post_init__(self) -> None:
        if not 0 < self.efficiency <= 1:
            raise ValueError(f"efficiency is a fraction of peak in (0, 1], got {self.efficiency!r}")
        if not self.op_overhead >= 0:
            raise ValueError(f"op_overhead is seconds per kernel >= 0, got {self.op_overhead!r}")


# ---- the replay -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Compute:
    seconds: float


@dataclass(frozen=True)
class Issue:
    """Start op ``key``. ``ranks``: a collective's members, or ``(sender, receiver)`` of a
    send; the receiving side of a send issues nothing and only waits."""

    key: Hashable
    op: str
    payload: float
    ranks: tuple[int, ...]


@dataclass(frozen=True)
class Wait:
    key: Hashable


Instruction = Compute | Issue | Wait


@dataclass
class RankTime:
    """One rank's replayed step: when it finished and what its time went to."""

    finish: float = 0.0
    compute: float = 0.0
    exposed_comm: float = 0.0
    bubble: float = 0.0
    comm: float = 0.0  # seconds its links were busy, hidden or not
    transfers: list[tuple[float, float]] = field(default_factory=list)
    blocked: list[tuple[float, float]] = field(default_factory=list)


def _union_overlap(
    intervals: list[tuple[float, float]], windows: list[tuple[float, float]]
) -> float:
    """Seconds of ``windows`` (disjoint) covered by the union of ``intervals``."""
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return sum(max(0.0, min(b, e) - max(a, s)) for a, b in windows for s, e in merged)


def replay(
    programs: dict[int, Sequence[Instruction]], seconds: Callable[[Issue], float]
) -> dict[int, RankTime]:
    """Run every rank's program from time 0; ``seconds(issue)`` is an op's transfer time.

    A collective's key is issued by every rank in its ``ranks``; it starts when the last has
    and its channel (the key's ``channel``: the group) is free. A send (``op == "send"``) is
    issued by its sender alone and starts at once, after earlier sends on its pair. A rank
    reaching ``Wait(key)`` resumes when that op has ended.
    """
    time = dict.fromkeys(programs, 0.0)
    pc = dict.fromkeys(programs, 0)
    out = {rank: RankTime() for rank in programs}
    arrived: dict[Hashable, dict[int, float]] = defaultdict(dict)
    ended: dict[Hashable, float] = {}
    free: dict[Hashable, float] = defaultdict(float)  # channel -> when its last op ends

    def start(key: Hashable, issue: Issue, at: float) -> None:
        channel = issue.ranks if issue.op != "send" else ("p2p", *issue.ranks)
        begin = max(at, free[channel])
        free[channel] = ended[key] = begin + seconds(issue)
        for rank in issue.ranks:
            if rank in out:
                out[rank].transfers.append((begin, ended[key]))
                out[rank].comm += ended[key] - begin

    while any(pc[r] < len(programs[r]) for r in programs):
        progressed = False
        for rank, program in programs.items():
            while pc[rank] < len(program):
                step, now = program[pc[rank]], time[rank]
                if isinstance(step, Compute):
                    time[rank] += step.seconds
                    out[rank].compute += step.seconds
                elif isinstance(step, Issue):
                    arrived[step.key][rank] = now
                    members = step.ranks[:1] if step.op == "send" else step.ranks
                    if len(arrived[step.key]) == len(members):
                        start(step.key, step, max(arrived[step.key].values()))
                elif step.key not in ended:
                    break  # blocked: another rank has yet to issue this op
                else:
                    if ended[step.key] > now:
                        out[rank].blocked.append((now, ended[step.key]))
                        time[rank] = ended[step.key]
                pc[rank] += 1
                progressed = True
        if not progressed:
            stuck = {r: programs[r][pc[r]] for r in programs if pc[r] < len(programs[r])}
            raise RuntimeError(f"the replay deadlocked: ranks wait for ops never issued: {stuck}")
    for rank, timing in out.items():
        timing.finish = time[rank]
        waited = sum(b - a for a, b in timing.blocked)
        timing.exposed_comm = _union_overlap(timing.transfers, timing.blocked)
        timing.bubble = waited - timing.exposed_comm
    return out


# ---- from a run to programs -------------------------------------------------------------------

BLOCKING, BUCKETS, AT_END, PREFETCH = "blocking", "buckets", "at end", "prefetch"


def wait_rule(strategy: str, impl: str, op: str, group: str, gpu: bool) -> str:
    """When a rank waits for one of its ops (``Assumptions``, "Schedule")."""
    if op == "all_reduce" and group == "dp":
        return BUCKETS
    if op == "send" and group == "pp":
        return AT_END
    if (strategy, impl) == ("zero3", "torch") and gpu:
        return PREFETCH if op == "all_gather" else AT_END
    return BLOCKING


def group_ranks(layout, group: str, rank: int) -> tuple[int, ...]:
    """The global ranks of ``rank``'s ``group`` ("dp", "pp", "tp" or "world") in ``layout``."""
    if group == "world":
        return tuple(range(layout.world_size))
    grid = np.arange(layout.world_size).reshape(layout.dp, layout.pp, layout.tp)
    axis = ("dp", "pp", "tp").index(group)
    coords = list(layout.coords(rank))
    coords[axis] = slice(None)
    return tuple(int(r) for r in grid[tuple(coords)])


def program(
    events: pd.DataFrame,
    busy: float,
    rule: Callable[[str, str], str],
    layout,
    rank: int,
    scale: float = 1.0,
) -> list[Instruction]:
    """One rank's step: its ``events`` (issue order, with ``busy`` stamps and ``peer``),
    ``busy`` its compute over the whole step, ``scale`` what a second of it becomes."""
    steps: list[Instruction] = []
    counts: dict[Hashable, int] = defaultdict(int)
    kinds = [rule(e.op, e.group) for e in events.itertuples()]
    last_bucket = max((i for i, kind in enumerate(kinds) if kind == BUCKETS), default=-1)
    buckets: list[Hashable] = []
    at_end: list[Hashable] = []
    prefetch_at = None  # where the next all-gather is issued: after the last one's wait
    done = 0.0
    for i, (e, kind) in enumerate(zip(events.itertuples(), kinds, strict=True)):
        steps.append(Compute(max(0.0, e.busy - done) * scale))
        done = max(done, e.busy)
        if e.op in ("send", "recv"):
            if e.peer < 0:
                raise ValueError(
                    f"rank {rank}'s {e.op} on {e.group!r} was recorded without its peer: "
                    "the replay can't pair it (batched p2p ops are not replayed)"
                )
            pair = (rank, int(e.peer)) if e.op == "send" else (int(e.peer), rank)
            counts[pair] += 1
            key: Hashable = ("p2p", *pair, counts[pair])
            if e.op == "recv":
                steps.append(Wait(key))
                continue
            issue = Issue(key, "send", e.payload_bytes, pair)
        else:
            members = group_ranks(layout, e.group, rank)
            counts[members] += 1
            key = (members, counts[members])
            issue = Issue(key, e.op, e.payload_bytes, members)
        if kind == PREFETCH and prefetch_at is not None:
            steps.insert(prefetch_at, issue)
        else:
            steps.append(issue)
        if kind in (BLOCKING, PREFETCH):
            steps.append(Wait(key))
            prefetch_at = len(steps) if kind == PREFETCH else prefetch_at
        elif kind == BUCKETS:
            buckets.append(key)
            steps += [Wait(k) for k in buckets] if i == last_bucket else []
        else:
            at_end.append(key)
    steps.append(Compute(max(0.0, busy - done) * scale))
    return steps + [Wait(k) for k in at_end]


# ---- predict ----------------------------------------------------------------------------------


def measures_here(topology: Topology) -> bool:
    """Whether ``topology``'s device is this machine, so compute is the run's own."""
    return topology.device.name.startswith(THIS_MACHINE)


def here(link: str | Link, world_size: int, device: Device | None = None) -> Topology:
    """This machine's ranks, every pair joined by ``link`` (what ``--link`` emulates): compute
    from the run's measured spans. ``device``: a calibrated one (``Topology.this_machine``)
    gives MFU too."""
    link = parse_link(link)
    device = device or Device(f"{THIS_MACHINE}: measured compute", {}, 0.0, "the run's own")
    return Topology(1, world_size, device, link, None, f"{THIS_MACHINE} over {link.name}")


def _target_compute(flops: float, kernels: float, topology: Topology, assume: Assumptions) -> float:
    """Seconds a rank's step of ``flops`` in ``kernels`` ops takes on ``topology``'s device."""
    peak = topology.device.peak(assume.dtype)
    return flops / (peak * assume.efficiency) + kernels * assume.op_overhead


def predict(
    result: TrainResult,
    topology: Topology | str,
    *,
    cluster: Cluster | None = None,
    assumptions: Assumptions | None = None,
) -> pd.DataFrame:
    """Per step of ``result``: its predicted time on ``topology`` and where the time goes.

    ``topology``: a ``Topology``, anything ``Topology.parse`` reads ("this-machine" with
    ``cluster=``), or ``here(link, world_size)``. See the module docstring and
    ``Assumptions``.
    """
    from pdlab.flops import model_flops

    assume = assumptions or Assumptions()
    topo = Topology.parse(topology, cluster)
    config = result.config
    if config.world_size > topo.world_size:
        raise ValueError(
            f"the run has {config.world_size} ranks but {topo.name!r} only "
            f"{topo.world_size} GPUs: predict on a topology with at least {config.world_size}"
        )
    layout = layout_for(config.strategy, config.world_size)
    measured = measures_here(topo)

    def rule(op: str, group: str) -> str:
        return wait_rule(config.strategy, config.impl, op, group, gpu=not measured)

    def seconds(issue: Issue) -> float:
        return op_time(issue.op, issue.payload, list(issue.ranks), topo, algorithm=assume.algorithm)

    ops = dict(tuple(result.comm.groupby(["step", "rank"])))
    no_ops = result.comm.iloc[:0]
    peak = topo.device.peak_flops.get(assume.dtype, float("nan"))
    flops = model_flops(config)
    rows = []
    for step, ranks in result.ranks.groupby("step"):
        programs = {}
        for r in ranks.itertuples():
            target = r.busy if measured else _target_compute(r.flops, r.kernels, topo, assume)
            events = ops.get((step, r.rank), no_ops)
            programs[r.rank] = program(events, r.busy, rule, layout, r.rank, target / r.busy)
        times = replay(programs, seconds)
        critical = max(times, key=lambda rank: times[rank].finish)
        t = times[critical]
        rows.append(
            {
                "step": step,
                "compute": t.compute,
                "exposed_comm": t.exposed_comm,
                "bubble": t.bubble,
                "comm": t.comm,
                "step_time": t.finish,
                "samples_per_s": config.batch_size / t.finish,
                "mfu": flops / (t.finish * config.world_size * peak),
                "critical_rank": critical,
            }
        )
    table = pd.DataFrame(rows)
    table.attrs.update(topology=str(topo), assumptions=assume)
    return table
