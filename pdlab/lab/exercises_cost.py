"""Lab 07's exercise: an all-reduce's time on a link, worked out by hand.

    def all_reduce_time(payload_bytes, ranks, bandwidth, latency): ...   # you write this
    exercises_cost.check_all_reduce_time(all_reduce_time)                # PASS, or FAIL + hint
    exercises_cost.time_all_reduce(cluster, 2**20, "1Gbit/s")            # measured on the ranks

The reference is ``pdlab.cost.costmodel.link_op_time("all_reduce", ...)``: a ring all-reduce on
n ranks takes 2(n-1) steps, each paying the link's latency, and every rank sends (and
receives) 2(n-1)/n of the payload at the link's bandwidth. ``pdlab.lab.solutions.all_reduce_time`` is
the answer, written out. (A module of its own beside ``pdlab.lab.exercises``: the same
``report``, no ranks needed to check it.)
"""

from __future__ import annotations

import math
from collections.abc import Callable

from pdlab.cost.costmodel import link_op_time
from pdlab.cost.topology import Link, parse_link
from pdlab.lab.exercises import report

# (payload bytes, ranks, link): small messages (latency-bound) to large (bandwidth-bound).
CASES = [
    (4 * 2**10, 2, "25Gbit/s@5us"),
    (2**20, 4, "1Gbit/s@50us"),
    (835_072, 2, "100Mbit/s"),
    (2**30, 8, "nvlink4"),
    (100 * 2**20, 16, "ib-ndr400"),
]
RELATIVE_TOLERANCE = 1e-6


def _hint(got: float, payload: float, n: int, link: Link) -> str:
    """What a plausible mistake gives, recognised from the number that came back."""
    data = 2 * (n - 1) / n * payload / link.bandwidth
    steps = 2 * (n - 1) * link.latency
    mistakes = [
        (
            steps + payload / link.bandwidth,
            "every rank sends 2(n-1)/n of the payload, not all of it (a reduce-scatter, then "
            "an all-gather)",
        ),
        (data, "each of the 2(n-1) ring steps pays the latency once: add 2(n-1) x latency"),
        (data + link.latency, "the latency is paid per ring step, 2(n-1) of them, not once"),
        (steps + 8 * data, "bandwidth is already in bytes/s: don't multiply by 8"),
        (steps + data / 8, "bandwidth is already in bytes/s: don't divide by 8"),
        (steps + 2 * data, "2(n-1)/n already counts both halves (reduce-scatter and all-gather)"),
    ]
    for value, hint in mistakes:
        if math.isclose(got, value, rel_tol=RELATIVE_TOLERANCE):
            return hint
    return "time = 2(n-1) x latency + 2(n-1)/n x payload / bandwidth (pdlab.cost.costmodel)"


def check_all_reduce_time(all_reduce_time: Callable[[float, int, float, float], float]) -> bool:
    """Compare ``all_reduce_time(payload_bytes, ranks, bandwidth, latency)`` with the cost
    model on ``CASES``; print PASS, or FAIL with the first case it misses and a hint."""
    name = "all-reduce time"
    for payload, n, spec in CASES:
        link = parse_link(spec)
        want = link_op_time("all_reduce", payload, n, link)
        try:
            got = float(all_reduce_time(payload, n, link.bandwidth, link.latency))
        except NotImplementedError:
            return report(name, False, "not written yet", "a number of seconds", "NotImplementedError", "write all_reduce_time, then run this cell again")  # fmt: skip
        if not math.isclose(got, want, rel_tol=RELATIVE_TOLERANCE):
            case = f"{payload:,} bytes on {n} ranks over {link}"
            return report(name, False, case, f"{want:.6g} s", f"{got:.6g} s", _hint(got, payload, n, link))  # fmt: skip
    return report(name, True, f"{len(CASES)} cases, from 4 KiB on 25 Gbit/s to 1 GiB on NVLink")


def _timed_all_reduce(payload_bytes: int, link: str, repeats: int) -> float:
    """On every rank: the fastest of ``repeats`` all-reduces of ``payload_bytes`` on the
    emulated ``link`` (``pdlab.cost.emulation``, as ``pdlab.train(link=...)`` runs them)."""
    import time

    import torch
    import torch.distributed as dist

    from pdlab.cost.emulation import emulating
    from pdlab.measure.comm import CommMeter

    buffer = torch.zeros(payload_bytes // 4)
    dist.all_reduce(buffer)  # connections and allocations, outside the timing
    best = math.inf
    with emulating(link) as emulator:
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            with CommMeter(emulator=emulator):
                dist.all_reduce(buffer)
            best = min(best, time.perf_counter() - start)
    return best


def time_all_reduce(cluster, payload_bytes: int, link: str, repeats: int = 3) -> float:
    """Seconds one all-reduce of ``payload_bytes`` takes on ``cluster``'s ranks over the
    emulated ``link`` (the slowest rank's fastest try)."""
    return max(cluster.run(_timed_all_reduce, payload_bytes, link, repeats))
