"""What the flight recorder (pdlab.flight) costs a collective: the same small all-reduce loop on
ranks with the recorder on and off (``PDLAB_FLIGHT_RECORDER=0``), alternating.

    python benchmarks/flight.py [--ops 2000] [--repeats 3] [--world-size 2]

A small all-reduce is the worst case: its own cost is smallest. A training step issues a few
(DDP: one per gradient bucket) to a few dozen (tensor parallelism) of them.
"""

from __future__ import annotations

import argparse
import os
import statistics

import pdlab


def all_reduce_loop(ops: int) -> float:
    """Seconds per all-reduce of one float, over ``ops`` of them (after a warm-up)."""
    import time

    import torch
    import torch.distributed as dist

    t = torch.ones(1)
    for _ in range(50):
        dist.all_reduce(t)
    start = time.perf_counter()
    for _ in range(ops):
        dist.all_reduce(t)
    return (time.perf_counter() - start) / ops


def per_op_us(world_size: int, ops: int, recorder: bool) -> float:
    os.environ["PDLAB_FLIGHT_RECORDER"] = "1" if recorder else "0"  # the ranks inherit it
    with pdlab.Cluster(world_size) as cluster:
        return max(cluster.run(all_reduce_loop, ops)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--world-size", type=int, default=2)
    args = parser.parse_args()
    on, off = [], []
    for _ in range(args.repeats):
        on.append(per_op_us(args.world_size, args.ops, recorder=True))
        off.append(per_op_us(args.world_size, args.ops, recorder=False))
    on_us, off_us = statistics.median(on), statistics.median(off)
    print(
        f"all_reduce of 4 B, world {args.world_size}, median of {args.repeats} x {args.ops} ops: "
        f"recorder on {on_us:.1f} µs, off {off_us:.1f} µs, cost {on_us - off_us:+.1f} µs an op"
    )


if __name__ == "__main__":
    main()
