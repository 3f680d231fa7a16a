"""Step time on a cluster you choose, predicted from a run: ``pdlab.predict(result, topology)``.

    result = pdlab.train(cluster, strategy="dp", impl="torch", model="gpt", steps=20)
    calibration = pdlab.cost.calibration.calibrate(cluster)    # this machine's link and matmuls
    pdlab.predict(result, calibration=calibration)        # this machine (or the run's --link)
    pdlab.predict(result, "100Mbit/s", calibration=calibration)   # this machine, a slow link
    pdlab.predict(result, "8xH100")                       # the run's FLOPs on 8 H100s

One row a step, like ``result.steps``: ``compute``, ``exposed_comm`` and ``bubble`` of the
rank that finishes last (they add up to its time), ``step_time``, ``samples_per_s``, ``mfu``,
``comm`` (that rank's link time, hidden or not) and ``critical_rank``.

How: each rank's step is replayed as the run did it — the compute between its ops, every op
it issued (exact bytes, group, peer), in the measured order — with each op's time from
``pdlab.cost.costmodel`` on the topology and the waits each strategy really does. The replay is
a small discrete-event simulation (``replay``): a collective starts when its last member
issues it, a recv completes when its send's transfer does, and a rank blocked on an op
waits for it. ``Assumptions`` lists every assumption; it is the one place they live.
"""

from __future__ import annotations

import functools
import heapq
import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import pandas as pd

from pdlab import checks
from pdlab.cost import emulation
from pdlab.cost.calibration import Calibration, Ranks, this_machine
from pdlab.cost.costmodel import directions, link_op_time, op_time
from pdlab.cost.emulation import SHARED, EmulatedLink
from pdlab.cost.topology import THIS_MACHINE, Device, Topology
from pdlab.measure.flops import FlopCounter
from pdlab.measure.trace import overlap, union
from pdlab.training import registry
from pdlab.training.data import load_dataset
from pdlab.training.layout import DIMS, Layout
from pdlab.training.models import loss_fn
from pdlab.training.parallel.base import meta_model
from pdlab.training.registry import layout_for

if TYPE_CHECKING:
    from pdlab.training.config import TrainConfig
    from pdlab.training.loop import TrainResult


@dataclass(frozen=True)
class Assumptions:
    """Everything the predictor assumes, in one place.

    Compute
    - On this machine (``Topology.this_machine(cluster)``, or a link its ranks emulate), a
      rank's compute between two of its ops is what it measured then: its busy seconds
      (``pdlab.measure.busy``: running, or waiting for a core — contention included).
    - On any other device, each rank's measured compute keeps its shape (where its ops fall)
      and is rescaled to ``flops / (peak[dtype] · efficiency) + kernels · op_overhead``: the
      FLOPs and kernel count of the rank's first step (``pdlab.measure.flops``), the device's dense
      peak for ``dtype`` (by default the run's precision, fp32 or bf16; "tf32" asks "what if").
    - ``mfu``: the model's FLOPs for one global batch in one process (``model_flops``,
      no recompute) over step time × ranks × peak. On this machine the peak is its measured
      matmul rate (NaN without a calibration).

    Communication
    - On a topology an op takes ``pdlab.cost.costmodel.op_time`` for its exact payload on its
      group's ranks, placed on it (rank r on node r // gpus_per_node; the run's ranks take
      the first GPUs), with ``algorithm`` ("ring" or "hierarchical"). On a link this
      machine's ranks emulate, the link's time as ``pdlab.cost.emulation`` computes it, plus,
      given a calibration, this machine's own (emulation delays an op after it really
      completed here).
    - Each rank has a full-duplex link per level (intra-node, inter-node; with ":shared",
      one medium for all ranks). A collective occupies both directions of each member's link on the level
      its group spans, a send the sender's outgoing and the receiver's incoming direction.
      A link carries one op at a time, first posted first served (DDP's buckets queue);
      different links, and different ranks' links, don't slow each other.
    - A collective starts when its last member has posted it and its links are free; a send
      when its receiver has posted the recv too (gloo and NCCL move bytes only then), and
      the receiver's sends that had begun by then are through (gloo's receiver says it is
      ready behind them). Every rank involved has it back at its end.

    Schedule: every op where and when the run issued it; a rank waits for an op
    - right after issuing it, unless listed below (TP's all-reduces, ZeRO's gathers and
      reduce-scatters, the parameter server's sends and receives, every recv);
    - gradient buckets (all-reduces on the dp group: DDP, scratch dp, the hybrids, ZeRO-1
      torch's DDP) are asynchronous and queue; the rank waits for them all right after
      issuing the last: what finishes after backward is exposed;
    - pipeline sends (pp group) are asynchronous, waited at the end of the step (pdlab's
      ``StageLink``, torch's GPipe) or, in torch's 1F1B, together with the next send or recv
      it fuses them with; receives block, so a stage waits for its input (the bubble)
      through the measured order of forward and backward micro-batches, with p2p time on
      each edge; the ring's sends (cp group) likewise, and its receives block where they are
      issued: the overlap of a block's transfer with the previous block's compute is not
      modelled (an upper bound);
    - torch's looped pipeline schedules (``Strategy.receives_ahead``: interleaved,
      zero-bubble, ZBV) post each receive well before the stage that needs it; a rank waits
      for it where its run saw it complete (``done_busy``: a rank blocked there had computed
      nothing since; one that computed on needed it no earlier, so this is a lower bound);
    - FSDP2 (zero2 and zero3 torch): on CPU ranks its collectives are synchronous (no streams:
      ``async_op=False``) and replayed so. On a GPU target it prefetches: each all-gather
      is issued as soon as the previous one is waited for and is waited for where the run
      did, overlapping the compute between; reduce-scatters are waited at the end.

    Not modelled: the memory traffic of compute, contention between links, stragglers other
    than the measured compute, the time to start a rank's step: every rank starts at 0, unless
    ``staggered``, on this machine: each rank starts its step as far after the first as it
    did in the run (``TrainResult.ranks.began``). Ranks sharing too
    few cores begin steps milliseconds apart, and the first waits for the last in its first
    collective: a wait no op's transfer explains (``pdlab.cost.calibration.under_load`` and
    the band it tops).
    """

    efficiency: float = 0.5  # of the device's dense peak: what the planner assumes too
    dtype: str | None = None  # None: the run's precision
    op_overhead: float = 10e-6  # s a kernel, PyTorch eager on a GPU: an assumption
    algorithm: str = "ring"
    staggered: bool = False

    def __post_init__(self) -> None:
        checks.number(self.efficiency, "efficiency (a fraction of peak)", above=0, most=1)
        checks.number(self.op_overhead, "op_overhead", least=0, unit="seconds per kernel")


# The top of this machine's band (with a calibration ``under_load`` gives): the ranks begin
# their steps as far apart as they did in the run.
BAND_TOP = Assumptions(staggered=True)


# ---- the replay -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Compute:
    seconds: float


@dataclass(frozen=True)
class Issue:
    """Post op ``key`` from this rank. ``ranks``: every rank that posts it — a collective's
    members, or ``(sender, receiver)`` of a send and its recv. It starts once all have."""

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

    began: float = 0.0
    finish: float = 0.0
    compute: float = 0.0
    exposed_comm: float = 0.0
    bubble: float = 0.0
    comm: float = 0.0  # seconds its links carried its ops, hidden or not
    transfers: list[tuple[float, float]] = field(default_factory=list)
    blocked: list[tuple[float, float]] = field(default_factory=list)


def duplex(issue: Issue) -> list[Hashable]:
    """The links an op occupies when every rank has its own full-duplex link: a send the
    sender's outgoing and the receiver's incoming direction, a collective both of every member."""
    if issue.op == "send":
        sender, receiver = issue.ranks
        return [(sender, d) for d in directions("send")] + [(receiver, d) for d in directions("recv")]  # fmt: skip
    return [(rank, d) for rank in issue.ranks for d in directions(issue.op)]


def replay(
    programs: dict[int, Sequence[Instruction]],
    seconds: Callable[[Issue], float],
    links: Callable[[Issue], list[Hashable]] = duplex,
    starts: dict[int, float] | None = None,
) -> dict[int, RankTime]:
    """Run every rank's program from time 0, or from ``starts[rank]`` (a discrete-event
    simulation); a rank's step time is its ``finish - began``.

    An op starts when every rank in its ``ranks`` has posted it and every link it occupies
    (``links(issue)``) is done with earlier ops, a send also when its receiver's sends that
    began before it posted the receive (to this sender: or as it did, posted before) are
    through; it takes ``seconds(issue)``. A rank at ``Wait(key)`` resumes when that op has
    ended. RuntimeError if the ranks wait on each other for ever (programs that don't match).
    """
    time = {rank: (starts or {}).get(rank, 0.0) for rank in programs}
    pc = dict.fromkeys(programs, 0)
    out = {rank: RankTime(began=time[rank]) for rank in programs}
    posted: dict[Hashable, dict[int, float]] = defaultdict(dict)
    payload: dict[Hashable, float] = defaultdict(float)  # a recv posts 0: its send the bytes
    ended: dict[Hashable, float] = {}
    free: dict[Hashable, float] = defaultdict(float)  # link -> when its last op ends
    order: dict[Hashable, dict[int, int]] = defaultdict(dict)  # where in its program a rank posted
    sending: dict[int, list[tuple[float, float, int, int]]] = defaultdict(list)  # rank -> its sends

    def start(issue: Issue) -> None:
        issue = replace(issue, payload=payload[issue.key])
        occupied = links(issue)
        begin = max([*posted[issue.key].values(), *(free[link] for link in occupied)])
        if issue.op == "send":
            # The receiver says it is ready behind what it was already sending (gloo's
            # notice, as ``pdlab.cost.emulation._Link`` has it): its sends that began before
            # it asked, and one to this sender that began as it asked, posted before (it came
            # late, its peer waiting: the send went first). Its sends that this replay starts
            # later, though they began earlier, are not seen: ranks run in turn.
            sender, receiver = issue.ranks
            asked, nth = posted[issue.key][receiver], order[issue.key][receiver]
            ahead = [
                end
                for was, end, n, to in sending[receiver]
                if was < asked or (was == asked and n < nth and to == sender)
            ]
            begin = max([begin, *ahead])
        end = ended[issue.key] = begin + seconds(issue)
        if issue.op == "send":
            sender, receiver = issue.ranks
            sending[sender].append((begin, end, order[issue.key][sender], receiver))
        free.update(dict.fromkeys(occupied, end))
        for rank in set(issue.ranks) & set(out):
            out[rank].transfers.append((begin, end))
            out[rank].comm += end - begin

    while any(pc[r] < len(programs[r]) for r in programs):
        progressed = False
        for rank, program in programs.items():
            while pc[rank] < len(program):
                step, now = program[pc[rank]], time[rank]
                if isinstance(step, Compute):
                    time[rank] += step.seconds
                    out[rank].compute += step.seconds
                elif isinstance(step, Issue):
                    posted[step.key][rank], order[step.key][rank] = now, pc[rank]
                    payload[step.key] = max(payload[step.key], step.payload)
                    if len(posted[step.key]) == len(step.ranks):
                        start(step)
                elif step.key not in ended:
                    break  # blocked: a rank has yet to post this op
                elif ended[step.key] > now:
                    out[rank].blocked.append((now, ended[step.key]))
                    time[rank] = ended[step.key]
                pc[rank] += 1
                progressed = True
        if not progressed:
            stuck = {r: programs[r][pc[r]] for r in programs if pc[r] < len(programs[r])}
            raise RuntimeError(f"the replay deadlocked: ranks wait for ops never posted: {stuck}")
    for rank, timing in out.items():
        timing.finish = time[rank]
        timing.exposed_comm = overlap(union(timing.transfers), timing.blocked)
        timing.bubble = sum(b - a for a, b in timing.blocked) - timing.exposed_comm
    return out


# ---- from a run to programs -------------------------------------------------------------------

BLOCKING, BUCKETS, AT_END, WITH_NEXT, PREFETCH, AS_SEEN = (
    "blocking", "buckets", "at end", "with the next", "prefetch", "as seen"
)  # fmt: skip


def wait_rule(strategy: str, impl: str, op: str, group: str, gpu: bool) -> str:
    """When a rank waits for one of its ops (``Assumptions``, "Schedule")."""
    if op == "all_reduce" and group == "dp":
        return BUCKETS
    if op == "recv" and impl in registry.get(strategy).receives_ahead:
        return AS_SEEN
    if op == "send" and group in ("pp", "cp"):  # torch's 1F1B fuses each send with the next recv
        return WITH_NEXT if (strategy, impl) == ("pp-1f1b", "torch") else AT_END
    if strategy in ("zero2", "zero3") and impl == "torch" and gpu:  # FSDP2
        return PREFETCH if op == "all_gather" else AT_END
    return BLOCKING


def group_ranks(layout: Layout, group: str, rank: int) -> tuple[int, ...]:
    """The global ranks of ``rank``'s ``group`` (one of the layout's ``DIMS``, or "world")."""
    if group == "world":
        return tuple(range(layout.world_size))
    if group not in DIMS:
        raise ValueError(
            f"can't place an op of group {group!r} on the ranks: the replay knows pdlab's "
            f"groups, {', '.join(DIMS)} and world (name others with CommMeter(names=...))"
        )
    return layout.group_ranks(rank, group)


def _posted(e, rank: int, layout: Layout, counts: dict[Hashable, int]) -> Issue:
    """What ``rank`` posts for its event ``e``: a collective keyed by its group and how many
    ops that group has had; a send or recv by its (sender, receiver) pair, its tag and its
    count there, as gloo and NCCL match them: two streams between the same ranks (the
    interleaved pipeline's activations and gradients) pair by tag, each in order (a recv
    posts 0 bytes: its send carries them)."""
    if e.op in ("send", "recv"):
        if e.peer < 0:
            raise ValueError(
                f"rank {rank}'s {e.op} on {e.group!r} was recorded without its peer: the "
                "replay can't pair it (batched p2p ops are not replayed)"
            )
        pair = (rank, int(e.peer)) if e.op == "send" else (int(e.peer), rank)
        stream = (*pair, int(getattr(e, "tag", 0)))
        counts[stream] += 1
        return Issue(("p2p", *stream, counts[stream]), "send", e.payload_bytes, pair)
    members = group_ranks(layout, e.group, rank)
    counts[members] += 1
    return Issue((members, counts[members]), e.op, e.payload_bytes, members)


def program(
    events: pd.DataFrame,
    busy: float,
    rule: Callable[[str, str], str],
    layout: Layout,
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
    with_next: list[Hashable] = []  # sends waited for once the next p2p op is posted
    prefetch_at = None  # where the next all-gather is posted: after the last one's wait
    seen: list[tuple[float, float, int, Hashable]] = []  # AS_SEEN: (busy, time) done, key
    done = 0.0

    def compute_to(at: float) -> None:
        nonlocal done
        steps.append(Compute(max(0.0, at - done) * scale))
        done = max(done, at)

    def waits_seen_by(at: float, wall: float) -> None:
        """The AS_SEEN ops that had completed when the rank's compute reached ``at``, its
        clock ``wall``: waited for there, in the order they completed."""
        while seen and seen[0][:2] <= (at, wall):
            seen_busy, _, _, key = heapq.heappop(seen)
            compute_to(min(seen_busy, busy))
            steps.append(Wait(key))

    for i, (e, kind) in enumerate(zip(events.itertuples(), kinds, strict=True)):
        waits_seen_by(e.busy, e.start)
        compute_to(e.busy)
        issue = _posted(e, rank, layout, counts)
        if kind == PREFETCH and prefetch_at is not None:
            steps.insert(prefetch_at, issue)
        else:
            steps.append(issue)
        if e.op in ("send", "recv"):
            steps += [Wait(k) for k in with_next]
            with_next = []
        if kind == AS_SEEN and e.done_busy >= 0:
            # Where it completed: a rank blocked there computed nothing since (its wait);
            # one that computed on needed it no earlier (a lower bound of its wait).
            heapq.heappush(seen, (max(e.busy, e.done_busy), e.start + e.seconds, i, issue.key))
        elif kind in (BLOCKING, PREFETCH, AS_SEEN):
            steps.append(Wait(issue.key))
            prefetch_at = len(steps) if kind == PREFETCH else prefetch_at
        elif kind == BUCKETS:
            buckets.append(issue.key)
            steps += [Wait(k) for k in buckets] if i == last_bucket else []
        else:
            (with_next if kind == WITH_NEXT else at_end).append(issue.key)
    waits_seen_by(math.inf, math.inf)
    compute_to(busy)
    return steps + [Wait(k) for k in at_end + with_next]


# ---- predict ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where a run is predicted: what each op costs, which links it occupies, the device."""

    name: str
    seconds: Callable[[Issue], float]
    links: Callable[[Issue], list[Hashable]]
    device: Device | None
    measured: bool  # compute: the run's own (this machine), or its FLOPs on ``device``


def on_topology(topology: Topology, algorithm: str = "ring", backend: str | None = None) -> Target:
    """Ranks placed on ``topology``: ``costmodel.op_time``; each rank a full-duplex link per
    level (intra-node, inter-node), an op on the level its ranks span; with
    ``shared_inter``, one inter-node link a node, shared by its ranks. ``backend``: price ops
    at what its algorithms send (this machine's gloo: a reduce-scatter as an all-reduce)."""

    def seconds(issue: Issue) -> float:
        ranks = list(issue.ranks)
        return op_time(issue.op, issue.payload, ranks, topology, algorithm=algorithm, backend=backend)  # fmt: skip

    def links(issue: Issue) -> list[Hashable]:
        if len({topology.node_of(r) for r in issue.ranks}) == 1:
            return [(*link, "intra") for link in duplex(issue)]
        if topology.shared_inter:  # every rank of a node behind its one port
            return list(dict.fromkeys(("nic", topology.node_of(r), d) for r, d in duplex(issue)))
        return [(*link, "inter") for link in duplex(issue)]

    return Target(topology.name, seconds, links, topology.device, measures_here(topology))


def on_link(
    emulated: EmulatedLink, calibration: Calibration | None = None, backend: str = "gloo"
) -> Target:
    """This machine's ranks over an emulated link, as ``pdlab.cost.emulation`` runs them: an op
    takes its time on the link plus, given a ``calibration``, this machine's own (emulation
    delays an op after it really completed here). ``:shared``: one medium for every op of
    every rank, one op at a time (emulation shares its rate between the ops in flight: the
    same total time, another order). Every op is priced at the bytes ``backend``'s algorithm
    sends, on the emulated link and this machine's own (``costmodel.link_bytes``)."""
    transport = calibration.link if calibration else None

    def seconds(issue: Issue) -> float:
        n = len(issue.ranks)
        here = link_op_time(issue.op, issue.payload, n, transport, backend) if transport else 0.0
        return emulated.op_seconds(issue.op, issue.payload, n, backend) + here

    def links(issue: Issue) -> list[Hashable]:
        return ["medium"] if emulated.shared else duplex(issue)

    name = f"{THIS_MACHINE} over {emulated.link.name}{SHARED if emulated.shared else ''}"
    return Target(name, seconds, links, calibration.topology.device if calibration else None, True)


def measures_here(topology: Topology) -> bool:
    """Whether ``topology``'s device is this machine, so compute is the run's own."""
    return topology.device.name.startswith(THIS_MACHINE)


def resolve(
    target: Target | Topology | str | None,
    config: TrainConfig,
    cluster: Ranks | None = None,
    calibration: Calibration | None = None,
    algorithm: str = "ring",
    backend: str = "gloo",
) -> Target:
    """``predict``'s ``target`` as a ``Target`` (see ``predict``); ``backend``: the run's, whose
    algorithms' bytes an emulated link carries."""
    if isinstance(target, Target):
        return target
    if target is None and config.world_size == 1:  # nothing to communicate: compute alone
        device = calibration.topology.device if calibration else None
        return Target(THIS_MACHINE, lambda issue: 0.0, duplex, device, True)
    if target is None:
        target = config.link or THIS_MACHINE
    if isinstance(target, str) and target.strip().lower() == THIS_MACHINE:
        target = this_machine(cluster, calibration)
    if isinstance(target, EmulatedLink):
        return on_link(target, calibration, backend)
    try:
        topology = Topology.parse(target)
    except ValueError as not_a_topology:
        try:
            return on_link(emulation.parse(target), calibration, backend)
        except ValueError:
            raise ValueError(
                f"{not_a_topology}; or a link this machine's ranks emulate ('100Mbit/s', "
                f"'25Gbit/s@5us:shared'; pdlab.cost.emulation)"
            ) from None
    if config.world_size > topology.world_size:
        raise ValueError(
            f"the run has {config.world_size} ranks but {topology.name!r} only "
            f"{topology.world_size} GPUs: predict on a topology with at least {config.world_size}"
        )
    return on_topology(topology, algorithm, backend if measures_here(topology) else None)


def _target_compute(flops: float, kernels: float, device: Device, assume: Assumptions) -> float:
    """Seconds a rank's step of ``flops`` in ``kernels`` ops takes on ``device``."""
    return flops / (device.peak(assume.dtype) * assume.efficiency) + kernels * assume.op_overhead


def predict(
    result: TrainResult,
    target: Target | Topology | str | None = None,
    *,
    cluster: Ranks | None = None,
    calibration: Calibration | None = None,
    assumptions: Assumptions | None = None,
) -> pd.DataFrame:
    """Per step of ``result``: its predicted time on ``target`` and where the time goes.

    ``target``: a ``Topology`` or anything ``Topology.parse`` reads ("this-machine" needs
    ``cluster=`` or ``calibration=``); or a link this machine's ranks emulate
    ("100Mbit/s", "1GB/s@10us:shared": ``pdlab.cost.emulation``); by default the link the run
    emulated, else this machine; or a ``Target`` of your own. ``calibration`` (``pdlab.cost.calibration.calibrate``): this
    machine's transport, added to an emulated link's ops as emulation does, and its
    matmul rate for MFU. See the module docstring and ``Assumptions``.
    """
    from pdlab.training.loop import TrainResult

    if not isinstance(result, TrainResult):
        raise TypeError(
            f"predict takes a run's result, e.g. predict(pdlab.train(cluster, ...)), "
            f"got {type(result).__name__}"
        )
    assume = assumptions or Assumptions()
    config = result.config
    if assume.dtype is None:
        assume = replace(assume, dtype=config.precision)
    where = resolve(target, config, cluster, calibration, assume.algorithm, result.backend)
    layout = layout_for(config.strategy, config.world_size)

    def rule(op: str, group: str) -> str:
        return wait_rule(config.strategy, config.impl, op, group, gpu=not where.measured)

    ops = dict(tuple(result.comm.groupby(["step", "rank"])))
    no_ops = result.comm.iloc[:0]
    device = where.device
    peak = device.peak_flops.get(assume.dtype, float("nan")) if device else float("nan")
    flops = model_flops(config)
    rows = []
    for step, ranks in result.ranks.groupby("step"):
        programs = {}
        for r in ranks.itertuples():
            target_busy = r.busy if where.measured else _target_compute(r.flops, r.kernels, device, assume)  # fmt: skip
            events = ops.get((step, r.rank), no_ops)
            programs[r.rank] = program(events, r.busy, rule, layout, r.rank, target_busy / r.busy)
        starts = staggered_starts(ranks) if assume.staggered and where.measured else None
        times = step_replay(programs, where.seconds, where.links, starts)
        critical = max(times, key=lambda rank: times[rank].finish - times[rank].began)
        t = times[critical]
        step_time = t.finish - t.began
        rows.append(
            {
                "step": step,
                "compute": t.compute,
                "exposed_comm": t.exposed_comm,
                "bubble": t.bubble,
                "comm": t.comm,
                "step_time": step_time,
                "samples_per_s": config.batch_size / step_time,
                "mfu": flops / (step_time * config.world_size * peak),
                "critical_rank": critical,
            }
        )
    table = pd.DataFrame(rows)
    table.attrs.update(target=where.name, assumptions=assume)
    return table


def step_replay(
    programs: dict[int, Sequence[Instruction]],
    seconds: Callable[[Issue], float],
    links: Callable[[Issue], list[Hashable]] = duplex,
    starts: dict[int, float] | None = None,
) -> dict[int, RankTime]:
    """``replay`` of one step, staggered by ``starts``, but never a shorter step (the longest
    ``finish - began``) than with every rank starting at 0: a rank that began late and then
    met peers that had waited for it shortens its own window only (seen under load: a dp
    run's band top 8-24% under its line in 2 of 4 steps, in CI and in 1 of 7 runs here)."""
    times = replay(programs, seconds, links, starts)
    if starts:
        together = replay(programs, seconds, links)
        if _longest(together) > _longest(times):
            return together
    return times


def _longest(times: dict[int, RankTime]) -> float:
    return max(t.finish - t.began for t in times.values())


def staggered_starts(ranks: pd.DataFrame) -> dict[int, float]:
    """Seconds after the first rank that each rank of one step's ``ranks`` rows began it
    (``began``: the wall clock, which ranks of one host share)."""
    if "began" not in ranks:
        raise ValueError(
            "this run has no step start times (TrainResult.ranks.began): run it again to "
            "predict it staggered"
        )
    first = ranks.began.min()
    return {int(r.rank): float(r.began - first) for r in ranks.itertuples()}


@functools.lru_cache(maxsize=64)  # a dashboard predicts a run's new steps at every repaint
def model_flops(config) -> int:
    """FLOPs of one forward and backward of ``config``'s model on one global batch, in one
    process (the meta device: shapes only, nothing computed); without recompute, whose extra
    forward is work MFU doesn't count."""
    x, y = load_dataset(config.model, config.seed, block_size=config.seq_len).batch(
        0, config.batch_size
    )
    model = meta_model(replace(config, recompute="none"))
    with FlopCounter() as counter:
        loss_fn(model(x.to("meta")), y.to("meta")).backward()
    return counter.flops
