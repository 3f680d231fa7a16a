"""What ``pdlab.measure.wire.bytes_on_wire`` costs per call on a rank, and gloo's framing it measures.

    python benchmarks/wire.py [--calls 2000] [--size 1048576]

For world sizes 2 and 4: the median time of one call on each rank (with the number of TCP
sockets and descriptors it walked), then the bytes each rank sent beyond the payload in one
all-reduce of ``--size`` bytes (beyond the ring's 2(n-1)/n of it) and in one send from rank 0
to rank 1.
"""

from __future__ import annotations

import argparse

import pdlab


def cost_per_call(port: int, calls: int) -> tuple[float, int, int]:
    """Median µs of one reading on this rank, its TCP sockets and its descriptors."""
    import os
    import statistics
    import time

    from pdlab.measure import wire

    exclude = wire.connections_to(port)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        wire.bytes_on_wire(exclude)
        times.append(time.perf_counter() - start)
    fds = [int(n) for n in os.listdir("/proc/self/fd")]
    sockets = sum(wire.tcp_info(fd) is not None for fd in fds)
    return statistics.median(times) * 1e6, sockets, len(fds)


def reading(port: int, op: str = "", size: int = 0) -> tuple[int, int]:
    """This rank's counters, then (if asked) one ``op`` of ``size`` bytes."""
    import torch
    import torch.distributed as dist

    from pdlab.measure import wire

    counters = wire.bytes_on_wire(wire.connections_to(port))
    if op == "all_reduce":
        dist.all_reduce(torch.ones(size // 4))
    elif op == "send" and dist.get_rank() < 2:
        peer = 1 - dist.get_rank()
        (dist.send if dist.get_rank() == 0 else dist.recv)(torch.ones(size // 4), peer)
    return counters


def sent_over(cluster: pdlab.Cluster, op: str, size: int) -> list[int]:
    """Bytes each rank sent during ``op``, read again once every rank has returned."""
    before = cluster.run(reading, cluster.port, op, size)
    after = cluster.run(reading, cluster.port)
    return [a[0] - b[0] for a, b in zip(after, before, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--size", type=int, default=1 << 20)
    args = parser.parse_args()
    for world in (2, 4):
        with pdlab.Cluster(world) as cluster:
            costs = cluster.run(cost_per_call, cluster.port, args.calls)
            print(f"world {world}: per call " + ", ".join(f"{us:.0f} µs" for us, _, _ in costs)
                  + f" (rank 0..{world - 1}; {costs[0][1]} TCP sockets, {costs[0][2]} fds each)")  # fmt: skip
            ring = 2 * (world - 1) / world * args.size
            extra = [sent - ring for sent in sent_over(cluster, "all_reduce", args.size)]
            print(f"  all_reduce of {args.size:,} B: sent beyond 2(n-1)/n·S: {extra} B")
            sent = sent_over(cluster, "send", args.size)
            print(f"  send of {args.size:,} B from rank 0 to 1: rank 0 sent {sent[0] - args.size:+,} B beyond it, rank 1 {sent[1]:,} B")  # fmt: skip


if __name__ == "__main__":
    main()
