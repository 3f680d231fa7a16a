"""How long each op pdlab meters takes on a link: latency + bus bytes / bandwidth.

The α-β model of NCCL-tests (doc/PERFORMANCE.md) and NCCL's own tuner (src/graph/tuning.cc):
an op on a group of n ranks sends its *bus bytes* (``pdlab.measure.comm.bus_bytes``: 2(n-1)/n·S for a
ring all-reduce, (n-1)/n·S for all-gather, reduce-scatter, all-to-all, gather and scatter,
S for broadcast, reduce and send) through each rank's link at the link's bandwidth per
direction, and pays the link's latency once per ring step:

    time = steps(op, n) · latency + bus_bytes(op, S, n) / bandwidth

| op | steps | why |
|---|---|---|
| all_reduce, barrier | 2(n-1) | ring reduce-scatter then all-gather; a barrier is an empty all-reduce |
| all_gather, reduce_scatter | n-1 | one ring pass |
| all_to_all, gather, scatter | n-1 | n-1 pairwise exchanges (gather/scatter: the root's link serialises them) |
| broadcast, reduce | n-1 | a pipelined chain: the last rank is n-1 hops away |
| send, recv | 1 | one message |

``recv`` costs what the matching ``send`` costs (pass the bytes received: the meter records a
recv with 0 payload). One rank alone, or an empty message with no latency, costs 0.

A group whose ranks span nodes goes at the pace of its slowest link: the smaller bandwidth
and the larger latency of ``intra`` and ``inter`` (a ring through both is limited by its
slowest hop). ``algorithm="hierarchical"`` instead runs an all-reduce as reduce-scatter
inside each node, all-reduce across nodes (each rank its 1/g shard, g ranks a node) and
all-gather inside each node; other ops always use the ring.

On the GPU presets' named links and devices (``nvlink4``, ``ib-ndr400``, ``h100-sxm``...) the
collectives NCCL tunes (all-reduce, all-gather, reduce-scatter, broadcast, reduce) take NCCL's
own model instead, with its choice of ring, tree or NVLS and of LL, LL128 or Simple by
message size (``pdlab.cost.nccl``); ``algorithm="hierarchical"`` keeps the α-β phases above.

The two entry points, for link emulation and the step-time predictor:

    op_time(op, payload_bytes, group, topology, nodes=1, algorithm="ring") -> seconds
        group: the op's global ranks (their nodes come from the topology), or its size with
        ``nodes`` = how many nodes it spans (ranks spread evenly over them).
    link_op_time(op, payload_bytes, group_size, link, backend=None) -> seconds
        every rank pair joined by this one link: what ``--link 100Mbit/s`` means on one machine.
    shared_medium_op_time(op, payload_bytes, group_size, link, backend=None) -> seconds
        all ranks' bytes cross one medium of ``link``'s rate (``--link 100Mbit/s:shared``; a
        loopback device throttled by the kernel): the op's bytes from every rank, in turn.
    ``backend``: price what that backend's algorithm really sends (``comm.traffic``; emulation
    on gloo ranks), not the ring's bytes (None: NCCL's model, the GPU presets).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pdlab import checks
from pdlab.cost import nccl
from pdlab.cost.topology import Link, Topology
from pdlab.measure.comm import bus_bytes, traffic

OPS = (
    "all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce", "all_to_all",
    "gather", "scatter", "send", "recv", "barrier",
)  # fmt: skip
ALGORITHMS = ("ring", "hierarchical")


def ring_steps(op: str, group_size: int) -> int:
    """Messages on the critical path of ``op`` on ``group_size`` ranks (the table above)."""
    n = group_size
    if op in ("all_reduce", "barrier"):
        return 2 * (n - 1)
    if op in ("send", "recv"):
        return 1
    if op in OPS:
        return n - 1
    raise ValueError(f"unknown comm op {op!r}: choose one of {', '.join(OPS)}")


def wire_bytes(op: str, payload_bytes: float, group_size: int) -> float:
    """Bytes through one rank's link: the bus bytes (a recv receives what the send sent)."""
    if op == "barrier":
        return 0.0
    return bus_bytes("send" if op == "recv" else op, payload_bytes, group_size)


def _alpha_beta(op: str, group_size: int, link: Link, nbytes: Callable[[], float]) -> float:
    """Latency per ring step plus ``nbytes()`` at the link's bandwidth; 0 on one rank."""
    steps = ring_steps(op, group_size)  # an unknown op fails even on one rank
    if checks.whole(group_size, "group_size") == 1:
        return 0.0
    return steps * link.latency + nbytes() / link.bandwidth


def link_bytes(op: str, payload_bytes: float, group_size: int, backend: str | None = None) -> float:
    """Bytes through the busiest rank's link, out or in, for ``op``: on ``backend``'s own
    algorithm (``comm.traffic``: gloo runs a reduce-scatter as an all-reduce, a broadcast as a
    binomial tree), or the ring's ``wire_bytes`` without one (NCCL's model)."""
    if backend is None:
        return wire_bytes(op, payload_bytes, group_size)
    positions = range(group_size)  # rooted ops differ by a rank's place from the root
    return max(max(traffic(op, payload_bytes, group_size, p, backend)) for p in positions)


def link_op_time(
    op: str, payload_bytes: float, group_size: int, link: Link, backend: str | None = None
) -> float:
    """Seconds ``op`` takes on ``group_size`` ranks all joined by ``link`` (its busiest rank's
    bytes: ``link_bytes``)."""
    return _alpha_beta(
        op, group_size, link, lambda: link_bytes(op, payload_bytes, group_size, backend)
    )


def directions(op: str) -> tuple[str, ...]:
    """What of a rank's full-duplex link an op occupies: a send goes out, a recv comes in, a
    collective uses both directions (the emulator and the predictor share this rule)."""
    return {"send": ("out",), "recv": ("in",)}.get(op, ("out", "in"))


def slowest(a: Link, b: Link) -> Link:
    """The link a ring through both ``a`` and ``b`` behaves like."""
    return Link(f"{a.name}+{b.name}", min(a.bandwidth, b.bandwidth), max(a.latency, b.latency))


def group_span(group: Sequence[int] | int, topology: Topology, nodes: int = 1) -> tuple[int, int]:
    """``(size, nodes spanned)`` of a group given as global ranks or as a size."""
    if isinstance(group, int):
        size = checks.whole(group, "group size")
        if not 1 <= nodes <= min(size, topology.nodes):
            raise ValueError(
                f"a group of {size} ranks on {topology.nodes} node(s) spans 1 to "
                f"{min(size, topology.nodes)} nodes, got nodes={nodes}"
            )
        return size, nodes
    ranks = list(group)
    if len(set(ranks)) != len(ranks) or not ranks:
        raise ValueError(f"a group lists distinct global ranks, got {ranks}")
    return len(ranks), len({topology.node_of(r) for r in ranks})


def op_time(
    op: str,
    payload_bytes: float,
    group: Sequence[int] | int,
    topology: Topology,
    *,
    nodes: int = 1,
    algorithm: str = "ring",
    backend: str | None = None,
) -> float:
    """Seconds ``op`` with ``payload_bytes`` (pdlab.measure.comm's payload convention) takes on
    ``group`` (global ranks, or a size spanning ``nodes`` nodes) of ``topology``; ``backend``:
    at the bytes its algorithm sends (``link_bytes``; "this-machine", measured on gloo)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
    size, spanned = group_span(group, topology, nodes)
    inter = topology.inter.name if topology.inter else None
    if algorithm == "ring" and op in nccl.COLLECTIVES and nccl.models(topology.intra.name, inter, topology.device.name):  # fmt: skip
        return nccl.collective_time(op, payload_bytes, size, spanned, topology.intra.name, inter, topology.device.name)  # fmt: skip
    if spanned == 1:
        return link_op_time(op, payload_bytes, size, topology.intra, backend)
    assert topology.inter is not None  # Topology requires one when nodes > 1
    if algorithm == "ring" or op != "all_reduce":
        return link_op_time(op, payload_bytes, size, slowest(topology.intra, topology.inter), backend)  # fmt: skip
    per_node = size // spanned
    if per_node * spanned != size:
        raise ValueError(
            f"hierarchical all-reduce needs the same number of ranks on each node: {size} "
            f"ranks over {spanned} nodes. Use algorithm='ring'."
        )
    inside = link_op_time("reduce_scatter", payload_bytes, per_node, topology.intra)
    across = link_op_time("all_reduce", payload_bytes / per_node, spanned, topology.inter)
    return inside + across + link_op_time("all_gather", payload_bytes, per_node, topology.intra)


def medium_bytes(
    op: str, payload_bytes: float, group_size: int, backend: str | None = None
) -> float:
    """Bytes all ``group_size`` ranks together put on a medium they share for ``op``: what
    every rank sends on ``backend``'s algorithm (``comm.traffic``); without one, every rank's
    ``wire_bytes`` for the ring collectives (all-reduce 2(n-1)·S, all-gather, reduce-scatter,
    all-to-all (n-1)·S), S from each of n-1 ranks for broadcast and reduce, the root's
    (n-1)/n·S for gather and scatter. One message for send and recv."""
    wire = wire_bytes(op, payload_bytes, group_size)
    if backend is not None and op not in ("send", "recv"):
        return sum(traffic(op, payload_bytes, group_size, p, backend)[0] for p in range(group_size))
    if op in ("send", "recv", "barrier", "gather", "scatter"):
        return wire  # one message, or everything through the root's link
    if op in ("broadcast", "reduce"):
        return (group_size - 1) * wire
    return group_size * wire


def shared_medium_op_time(
    op: str, payload_bytes: float, group_size: int, link: Link, backend: str | None = None
) -> float:
    """Seconds ``op`` takes when its ranks' bytes all cross one medium of ``link``'s rate."""
    return _alpha_beta(
        op, group_size, link, lambda: medium_bytes(op, payload_bytes, group_size, backend)
    )
