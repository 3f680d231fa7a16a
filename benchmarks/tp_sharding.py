"""A tp/torch run's first step after switching strategy: each rank sharding its own copy of
the model (``compat.parallelize_in_place``) against DTensor's default, scattering every
parameter from rank 0 (one collective a parameter).

    python benchmarks/tp_sharding.py [--repeats 5] [--world-size 4]

Each repeat starts fresh ranks, trains one dp/torch step (the training stack loaded), then
times the first 1-step ``pdlab.train(strategy="tp", impl="torch")``; the two ways alternate.
Prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pdlab


def scatter_from_rank_0() -> None:
    """On a rank: shard as DTensor does by default (the baseline)."""
    from torch.distributed.tensor.parallel import parallelize_module

    from pdlab import compat

    compat.parallelize_in_place = lambda module, mesh, plan: parallelize_module(module, mesh, plan)


def first_tp_run(world_size: int, baseline: bool) -> float:
    with pdlab.Cluster(world_size) as cluster:
        pdlab.train(cluster, strategy="dp", impl="torch", model="gpt", steps=1)
        if baseline:
            cluster.run(scatter_from_rank_0)
        start = time.perf_counter()
        pdlab.train(cluster, strategy="tp", impl="torch", model="gpt", steps=1)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--world-size", type=int, default=4)
    args = parser.parse_args()
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.repeats):
        for baseline in times:
            times[baseline].append(first_tp_run(args.world_size, baseline))
    scatter, in_place = (statistics.median(times[b]) for b in (True, False))
    print(
        f"first tp/torch 1-step run, gpt, world {args.world_size}, median of {args.repeats}: "
        f"scatter from rank 0 {scatter:.3f} s, each rank in place {in_place:.3f} s, "
        f"ratio {in_place / scatter:.2f}"
    )


if __name__ == "__main__":
    main()
