"""pdlab.cost.costmodel against times worked out by hand (arithmetic written out, not recomputed)."""

from __future__ import annotations

import pytest

from pdlab.cost.costmodel import link_op_time, op_time, shared_medium_op_time
from pdlab.cost.topology import Link, Topology

MB = 1_000_000
LINK = Link("test", bandwidth=1e9, latency=10e-6)  # 1 GB/s, 10 µs a message

# (op, payload bytes, ranks) -> seconds on LINK, by hand: steps × 10 µs + bus bytes / 1e9.
BY_HAND = {
    # ring all-reduce on 4: 2·3 = 6 steps; bus bytes 2·3/4 · 8 MB = 12 MB -> 12 ms
    ("all_reduce", 8 * MB, 4): 6 * 10e-6 + 12e-3,
    # all-gather and reduce-scatter on 4: 3 steps; 3/4 · 8 MB = 6 MB -> 6 ms
    ("all_gather", 8 * MB, 4): 3 * 10e-6 + 6e-3,
    ("reduce_scatter", 8 * MB, 4): 3 * 10e-6 + 6e-3,
    # all-to-all, gather, scatter on 8: 7 steps; 7/8 · 8 MB = 7 MB -> 7 ms
    ("all_to_all", 8 * MB, 8): 7 * 10e-6 + 7e-3,
    ("gather", 8 * MB, 8): 7 * 10e-6 + 7e-3,
    ("scatter", 8 * MB, 8): 7 * 10e-6 + 7e-3,
    # broadcast and reduce on 4: a chain of 3 hops; the whole 8 MB through each link -> 8 ms
    ("broadcast", 8 * MB, 4): 3 * 10e-6 + 8e-3,
    ("reduce", 8 * MB, 4): 3 * 10e-6 + 8e-3,
    # send and recv: one message of 2 MB -> 2 ms
    ("send", 2 * MB, 2): 10e-6 + 2e-3,
    ("recv", 2 * MB, 2): 10e-6 + 2e-3,
    # barrier on 4: an empty all-reduce, 6 steps
    ("barrier", 0, 4): 6 * 10e-6,
    # two ranks: all-reduce bus bytes 2·1/2 · 8 MB = 8 MB
    ("all_reduce", 8 * MB, 2): 2 * 10e-6 + 8e-3,
    # one rank communicates with nobody
    ("all_reduce", 8 * MB, 1): 0.0,
}


def two_nodes_of_four() -> Topology:
    fast, slow = Link("fast", 100e9, 1e-6), Link("slow", 10e9, 5e-6)
    return Topology(2, 4, "h100-sxm", intra=fast, inter=slow)


def check_against_hand(time_of) -> None:
    """Assert ``time_of(op, payload, n, link)`` reproduces every hand-computed time."""
    for (op, payload, n), expected in BY_HAND.items():
        assert time_of(op, payload, n, LINK) == pytest.approx(expected, rel=1e-12, abs=1e-15), (
            op, payload, n,
        )  # fmt: skip


def test_every_op_matches_the_hand_computed_time():
    check_against_hand(link_op_time)


def test_the_check_fails_a_wrong_formula():
    """All-reduce costed as payload / bandwidth (forgetting the ring's 2(n-1)/n) is caught."""

    def payload_over_bandwidth(op, payload, n, link):
        if op == "all_reduce" and n > 1:
            return 2 * (n - 1) * link.latency + payload / link.bandwidth
        return link_op_time(op, payload, n, link)

    with pytest.raises(AssertionError):
        check_against_hand(payload_over_bandwidth)


def test_a_group_within_a_node_uses_the_intra_link_and_across_nodes_the_slowest():
    topo = two_nodes_of_four()
    # ranks 0-3 on node 0: 2·3 = 6 steps of 1 µs + 2·3/4 · 100 MB = 150 MB at 100 GB/s = 1.5 ms
    assert op_time("all_reduce", 100 * MB, [0, 1, 2, 3], topo) == pytest.approx(6e-6 + 1.5e-3)
    # ranks 0 and 4 on two nodes: 2 steps of 5 µs + 100 MB at 10 GB/s = 10 ms
    assert op_time("all_reduce", 100 * MB, [0, 4], topo) == pytest.approx(10e-6 + 10e-3)
    # the same given as a size and a node count
    assert op_time("all_reduce", 100 * MB, 2, topo, nodes=2) == pytest.approx(10e-6 + 10e-3)
    # all 8 ranks, ring through both links: 14 steps of 5 µs + 2·7/8 · 100 MB = 175 MB at 10 GB/s
    assert op_time("all_reduce", 100 * MB, list(range(8)), topo) == pytest.approx(70e-6 + 17.5e-3)


def test_hierarchical_all_reduce_splits_into_node_and_network_phases():
    topo = two_nodes_of_four()
    # reduce-scatter in node (4 ranks): 3 µs + 3/4 · 100 MB / 100 GB/s = 0.75 ms
    # all-reduce across 2 nodes of a 25 MB shard: 2·5 µs + 25 MB / 10 GB/s = 2.5 ms
    # all-gather in node: 3 µs + 0.75 ms
    expected = (3e-6 + 0.75e-3) + (10e-6 + 2.5e-3) + (3e-6 + 0.75e-3)
    got = op_time("all_reduce", 100 * MB, list(range(8)), topo, algorithm="hierarchical")
    assert got == pytest.approx(expected)
    assert got < op_time("all_reduce", 100 * MB, list(range(8)), topo)  # beats the flat ring


def test_bad_ops_and_groups_are_refused_with_the_fix():
    topo = Topology.parse("2x8 nvlink4 ib-ndr400")
    with pytest.raises(ValueError, match="unknown comm op 'allreduce'.*all_reduce"):
        link_op_time("allreduce", 1, 2, LINK)
    with pytest.raises(ValueError, match="rank 16 is not in"):
        op_time("all_reduce", 1, [0, 16], topo)
    with pytest.raises(ValueError, match="spans 1 to 2 nodes"):
        op_time("all_reduce", 1, 4, topo, nodes=3)
    with pytest.raises(ValueError, match="choose one of ring, hierarchical"):
        op_time("all_reduce", 1, 4, topo, algorithm="tree")


def test_an_op_is_priced_at_what_its_backends_algorithm_sends():
    """gloo sends more than a ring for some ops (its sockets show it: tests/test_traffic.py);
    given the backend, a link carries those bytes. Figures by hand, 1 MB on 1 MB/s."""
    link, s = Link("1MB/s", 1e6, 0.0), 1e6
    # A ring reduce-scatter sends (n-1)/n·S a rank; gloo's is an all-reduce, 2(n-1)/n·S.
    assert link_op_time("reduce_scatter", s, 4, link) == pytest.approx(0.75)
    assert link_op_time("reduce_scatter", s, 4, link, "gloo") == pytest.approx(1.5)
    # gloo broadcasts on a binomial tree: the root sends S to ⌈log2 n⌉ ranks.
    assert link_op_time("broadcast", s, 4, link, "gloo") == pytest.approx(2.0)
    assert link_op_time("broadcast", s, 8, link, "gloo") == pytest.approx(3.0)
    # An all-reduce is a ring on both; a send is its bytes.
    assert link_op_time("all_reduce", s, 4, link, "gloo") == pytest.approx(1.5)
    assert link_op_time("send", s, 2, link, "gloo") == pytest.approx(1.0)
    # One medium carries every rank's bytes: 4 ranks x 1.5 MB for gloo's reduce-scatter.
    assert shared_medium_op_time("reduce_scatter", s, 4, link, "gloo") == pytest.approx(6.0)
    assert shared_medium_op_time("reduce_scatter", s, 4, link) == pytest.approx(3.0)
    assert shared_medium_op_time("broadcast", s, 4, link, "gloo") == pytest.approx(3.0)


def test_this_machine_prices_ops_at_what_gloo_sends():
    """gloo runs a reduce-scatter as an all-reduce: on 2 ranks each sends the whole 8 MB
    (8 ms at 1 GB/s), not the ring's half (4 ms). "this-machine" is measured on gloo."""
    here = Topology(1, 2, "h100-sxm", intra=Link("here", 1e9, 0.0))
    assert op_time("reduce_scatter", 8 * MB, 2, here) == pytest.approx(4e-3)
    assert op_time("reduce_scatter", 8 * MB, 2, here, backend="gloo") == pytest.approx(8e-3)
