"""What the flight recorder (pdlab.measure.flight) costs a collective: a small all-reduce loop on the
same ranks, the recorder on and off in alternating blocks (``flight.install``/``uninstall``,
with its black box), so that the machine's load falls on both alike.

    python benchmarks/flight.py [--world-size 2] [--ops 200] [--blocks 30]

A small all-reduce is the worst case: its own cost is smallest. A training step issues a few
(DDP: one a gradient bucket) to a few dozen (tensor parallelism) of them.
"""

from __future__ import annotations

import argparse
import statistics

import pdlab


def alternate(ops: int, blocks: int, black_box: str) -> dict[str, float]:
    """On every rank: µs an all-reduce of one float takes, recorder on and off, and the CPU
    time of this thread it takes (median and minimum over ``blocks`` blocks of ``ops``)."""
    import time

    import torch
    import torch.distributed as dist

    from pdlab.measure import flight

    t, times = torch.ones(1), {"on": [], "off": [], "on cpu": [], "off cpu": []}
    for _ in range(blocks):
        for mode in ("on", "off"):
            flight.uninstall()
            if mode == "on":
                flight.install(black_box)
            dist.barrier()
            start, cpu = time.perf_counter(), time.thread_time()
            for _ in range(ops):
                dist.all_reduce(t)
            times[mode].append((time.perf_counter() - start) / ops * 1e6)
            times[f"{mode} cpu"].append((time.thread_time() - cpu) / ops * 1e6)
    flight.uninstall()
    flight.install(black_box)  # as the rank started
    return {f"{m} {f.__name__}": f(v) for m, v in times.items() for f in (statistics.median, min)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--ops", type=int, default=200)
    parser.add_argument("--blocks", type=int, default=30)
    args = parser.parse_args()
    with pdlab.Cluster(args.world_size) as cluster:
        box = pdlab.measure.flight.black_box_path(cluster._resources.local.tmpdir, 0) + "-bench"
        per_rank = cluster.run(lambda: alternate(args.ops, args.blocks, f"{box}{pdlab.rank()}"))
    rank0 = per_rank[0]  # every rank times the same ops
    print(
        f"all_reduce of 4 B, world {args.world_size}, {args.blocks} alternating blocks of "
        f"{args.ops} ops: recorder on {rank0['on median']:.1f} µs (min {rank0['on min']:.1f}), "
        f"off {rank0['off median']:.1f} µs (min {rank0['off min']:.1f}); cost "
        f"{rank0['on median'] - rank0['off median']:+.1f} µs median, "
        f"{rank0['on min'] - rank0['off min']:+.1f} µs min; this thread's CPU time "
        f"{rank0['on cpu median']:.1f} µs on, {rank0['off cpu median']:.1f} µs off"
    )


if __name__ == "__main__":
    main()
